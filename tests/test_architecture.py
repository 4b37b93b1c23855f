"""The package's imports run one way: from the command line down to the losses, never back up, never in a circle.

Every `import` of every module counts, including those inside functions (lazy imports are still dependencies).
docs/architecture.md describes the layers; this is its check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "siglip"

# Bottom to top. A module may import from its own layer or a lower one.
LAYERS = [
    ("errors", ["siglip.errors"]),
    ("losses", ["siglip.kernels", "siglip.collectives", "siglip.tiled", "siglip.softmax", "siglip.ring",
                "siglip.loss"]),
    ("towers and files", ["siglip.model", "siglip.tokenizer", "siglip.prompts", "siglip.checkpoint", "siglip.optim",
                          "siglip.plots"]),
    ("data", ["siglip.data"]),
    ("siglip 2 recipe", ["siglip.siglip2"]),
    ("evaluation", ["siglip.evaluate"]),
    ("training", ["siglip.train"]),
    ("measuring and studies", ["siglip.bench", "siglip.experiments"]),
    ("command line", ["siglip.cli", "siglip.__main__"]),
]
# Imported by nothing outside themselves: the command line reaches them by name, through importlib.
APART = ("siglip.bench", "siglip.experiments")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The siglip modules `path` imports anywhere in its body (absolute or relative)."""
    name, found = module_name(path), set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}     # `from siglip import ring`
    # `from siglip import ring` also yields the bare package, whose __init__ imports nothing: only submodules count
    return {target for target in found if target.startswith("siglip.")}


def package_graph() -> dict[str, set[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "__init__.py"}
    graph = {}
    for name, path in modules.items():
        # `from siglip.data import Sample` names a module or a name in one: keep the longest module it resolves to
        targets = set()
        for target in imports_of(path):
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                targets.add(target)
        graph[name] = targets
    return graph


def layer_of(module: str) -> int:
    best, level = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, level = len(prefix), index
    if level is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS here and to docs/architecture.md")
    return level


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(graph.items()):
        for target in sorted(targets):
            if layer_of(target) > layer_of(source):
                problems.append(f"{source} ({LAYERS[layer_of(source)][0]}) imports {target} "
                                f"({LAYERS[layer_of(target)][0]}), a higher layer")
            for apart in APART:
                inside = lambda module, apart=apart: module == apart or module.startswith(apart + ".")  # noqa: E731
                if inside(target) and not inside(source):
                    problems.append(f"{source} imports {target}: nothing outside {apart} may import it")
    return problems


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the list of modules along it (depth-first search)."""
    found, state = [], {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                found.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return found


def test_no_module_imports_a_higher_layer():
    problems = upward_imports(package_graph())
    assert not problems, "\n".join(problems)


def test_no_import_circles():
    found = circles(package_graph())
    assert not found, "\n".join(" -> ".join(circle) for circle in found)


@pytest.mark.parametrize("source,target", [
    ("siglip.loss", "siglip.model"),             # a loss that knows about towers
    ("siglip.data.loader", "siglip.train.step"),  # data that knows about training
    ("siglip.train.loop", "siglip.bench.memory"),  # training that leans on a benchmark
])
def test_the_check_catches_an_upward_import(source, target):
    graph = package_graph()
    graph[source] = graph[source] | {target}
    assert any(f"{source} " in problem and target in problem for problem in upward_imports(graph))


def test_the_check_catches_a_circle():
    graph = {"siglip.ring": {"siglip.tiled"}, "siglip.tiled": {"siglip.kernels"}, "siglip.kernels": {"siglip.ring"}}
    assert circles(graph) == [["siglip.kernels", "siglip.ring", "siglip.tiled", "siglip.kernels"]]
