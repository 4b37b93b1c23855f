"""The documentation's commands run as written.

README.md and docs/*.md show shell blocks (fenced code blocks without a language, or sh/bash/shell/console).
Every `siglip` command in them must name a real subcommand and only flags its parser has, and, unless it is a
synopsis with placeholders (`[--steps N]`, `SOURCE`), parse as written; every `make` target must exist; every
repository file the pages point to (links, `src/...` paths, `siglip.module.name`s, `--config configs/...`) must
exist. The cheap commands (the export walk-through of docs/data.md) are also run, and the README's loss snippet is
executed and must give what it says.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from siglip import cli

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_LANGUAGES = {"", "sh", "bash", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*([,.][A-Z0-9_.]*)*$")      # SOURCE, MODEL_DIR, N,N,...
REPO_PATH = re.compile(r"^(src|tests|docs|configs|\.ci)/[\w./-]*$")
MODULE_NAME = re.compile(r"^siglip(\.\w+)+$")


@dataclass
class Command:
    page: Path
    line: int
    words: list[str]
    """The command's words, environment assignments removed (`OMP_NUM_THREADS=1 siglip ...` -> `siglip ...`)."""

    def __str__(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}: {shlex.join(self.words)}"


def shell_commands(page: Path) -> list[Command]:
    """Each command line of the page's shell blocks, continuation lines joined, comments and heredoc bodies dropped.
    Lines that are a command's output (a table, an error message) are not commands and are skipped."""
    text = page.read_text(encoding="utf-8")
    commands = []
    for block in FENCE.finditer(text):
        if block.group(1).lower() not in SHELL_LANGUAGES:
            continue
        first_line = text.count("\n", 0, block.start(2)) + 1
        lines, index, heredoc = block.group(2).splitlines(), 0, None
        while index < len(lines):
            start, line = index, lines[index]
            index += 1
            if heredoc is not None:
                heredoc = None if line.strip() == heredoc else heredoc
                continue
            while line.endswith("\\") and index < len(lines):
                line, index = line[:-1] + " " + lines[index].strip(), index + 1
            marker = re.search(r"<<-?\s*'?(\w+)'?", line)
            if marker:
                heredoc, line = marker.group(1), line[:marker.start()]
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue                    # not shell (a diagram, a table cell with a quote)
            while words and ASSIGNMENT.match(words[0]):
                words = words[1:]
            if words and _is_command(words):
                commands.append(Command(page, first_line + start, words))
    return commands


def _is_command(words: list[str]) -> bool:
    program = words[0].rsplit("/", 1)[-1]
    if program == "siglip":
        # "siglip data: error: ..." is output, "siglip 2 recipe  siglip2/ ..." a row of a diagram: a command's next
        # word is a subcommand's name or a flag.
        return len(words) > 1 and re.fullmatch(r"[a-z][a-z-]*|-h|--help", words[1]) is not None
    return program in {"torchrun", "make", "python", "python3", "printf", "pip", "hf"}


def siglip_arguments(command: Command) -> list[str] | None:
    """The words after `siglip` (or `python -m siglip`, `torchrun ... -m siglip`), or None for another program."""
    words = command.words
    if words[0].rsplit("/", 1)[-1] == "siglip":
        return words[1:]
    for index in range(len(words) - 1):
        if words[index] == "-m" and words[index + 1] == "siglip":
            return words[index + 2:]
    return None


def is_synopsis(arguments: list[str]) -> bool:
    """A usage line with placeholders, `siglip eval MODEL_DIR --data SOURCE [--json]`: checked flag by flag."""
    return any(word.startswith("[") or word.endswith("]") or "..." in word or "|" in word
               or PLACEHOLDER.match(word) for word in arguments)


def command_parser(arguments: list[str]):
    """The parser of the deepest subcommand the arguments name (`bench loss` -> the parser of `siglip bench loss`)."""
    if not arguments or arguments[0] not in cli.COMMANDS:
        raise AssertionError(f"no siglip command {arguments[:1]}; the commands are {list(cli.COMMANDS)}")
    parser = cli.parser(arguments[0])
    for word in arguments:
        choices = _subcommands(parser)
        if not choices:
            break
        if word in choices:
            parser = choices[word]
    return parser


def _subcommands(parser) -> dict:
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            return action.choices
    return {}


def _flags(parser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def _all_commands() -> list[Command]:
    return [command for page in PAGES for command in shell_commands(page)]


def test_the_pages_have_commands_to_check():
    commands = _all_commands()
    assert sum(siglip_arguments(command) is not None for command in commands) >= 10, commands


@pytest.mark.parametrize("command", [c for c in _all_commands() if siglip_arguments(c) is not None], ids=str)
def test_each_siglip_command_names_a_real_subcommand_and_real_flags(command):
    arguments = siglip_arguments(command)
    parser = command_parser(arguments)
    flags = {word.strip("[]").split("=")[0] for word in arguments if word.strip("[").startswith("--")}
    unknown = sorted(flags - _flags(parser))
    assert not unknown, f"{command}: {parser.prog} has no {unknown}"
    if is_synopsis(arguments):
        return
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            cli.parser(arguments[0]).parse_args(arguments)
    except SystemExit:
        pytest.fail(f"{command}: does not parse: {errors.getvalue().strip().splitlines()[-1]}")


def test_each_make_target_in_the_docs_exists():
    targets = set(re.findall(r"^([\w.-]+):", (REPO / "Makefile").read_text(encoding="utf-8"), re.M))
    for command in _all_commands():
        if command.words[0] == "make":
            missing = [word for word in command.words[1:] if not word.startswith("-") and word not in targets]
            assert not missing, f"{command}: the Makefile has no target {missing}"


def test_each_repository_file_a_command_names_exists():
    for command in _all_commands():
        for word in command.words[1:]:
            if REPO_PATH.match(word):
                assert (REPO / word).exists(), f"{command}: {word} does not exist"


def test_each_link_and_path_in_the_pages_exists():
    missing = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                missing.append(f"{page.name}: link {target}")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked):
                missing.append(f"{page.name}: link {target} (no such heading)")
        for span in re.findall(r"`([^`\n]+)`", text):
            for word in span.split():
                word = word.rstrip(".,:;)")
                if REPO_PATH.match(word) and not (REPO / word).exists():
                    missing.append(f"{page.name}: path {word}")
                elif MODULE_NAME.match(word) and not _names_something(word):
                    missing.append(f"{page.name}: name {word}")
    assert not missing, "\n".join(missing)


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*)$", page.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


def _names_something(dotted: str) -> bool:
    """`siglip.train.step.forward_backward`: a module of the package, then names defined in it (read, not imported)."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        module_path = REPO / "src" / Path(*parts[:split])
        candidates = [module_path.with_suffix(".py"), module_path / "__init__.py"]
        source = next((path for path in candidates if path.exists()), None)
        if source is None:
            continue
        rest = parts[split:]
        if not rest:
            return True
        text = source.read_text(encoding="utf-8")
        return re.search(rf"^\s*(def|class)\s+{rest[0]}\b|^\s*{rest[0]}\s*[:=]|import .*\b{rest[0]}\b", text,
                         re.M) is not None
    return False


def test_the_export_walk_through_of_the_data_page_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/data.md's `siglip data export` and `inspect` block, in a fresh folder, in the order written."""
    block = [c for c in shell_commands(REPO / "docs" / "data.md")
             if siglip_arguments(c) and siglip_arguments(c)[:2] in (["data", "export"], ["data", "inspect"])]
    assert len(block) >= 3, block
    monkeypatch.chdir(tmp_path)
    for command in block:
        capsys.readouterr()
        assert cli.main(siglip_arguments(command)) == 0, command
        printed = capsys.readouterr().out
        summary = json.loads(printed)
        if "skipped" in summary:
            assert summary["samples"] > 0 and not summary["skipped"], (command, summary)
        else:
            assert summary["samples"] and not any("bad" in sample for sample in summary["samples"]), command


def test_the_readme_loss_snippet_gives_the_gradients_it_names():
    snippet = re.search(r"```python\n(import torch\nfrom siglip.loss import .*?)```",
                        (REPO / "README.md").read_text(encoding="utf-8"), re.S).group(1)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    comment = next(line for line in snippet.splitlines() if "loss.backward()" in line)
    named = re.findall(r"(\w+)\.grad\b", comment)
    assert named, f"the snippet's backward line names no gradients: {comment!r}"
    for name in named:
        gradient = namespace[name].grad
        assert gradient is not None and torch.isfinite(gradient).all() and gradient.abs().sum() > 0, name


def test_no_page_config_or_help_points_outside_the_repository():
    """Users have the repository only: CONTRACT.md and NOTES.md (the team's notes) are not in it."""
    outside = re.compile(r"CONTRACT\.md|NOTES\.md|\.\./shared")
    texts = {str(path.relative_to(REPO)): path.read_text(encoding="utf-8")
             for path in [*PAGES, *sorted((REPO / "configs").glob("*.yaml"))]}
    for command in cli.COMMANDS:
        texts[f"siglip {command} --help"] = cli.parser(command)._subparsers._group_actions[0].choices[command] \
            .format_help()
    pointers = [f"{name}: {line.strip()}" for name, text in texts.items() for line in text.splitlines()
                if outside.search(line)]
    assert not pointers, "\n".join(pointers)


def test_the_readme_lists_every_page_of_docs():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unlisted = [page.name for page in PAGES[1:] if f"](docs/{page.name})" not in readme]
    assert not unlisted, f"README.md's Documentation list lacks {unlisted}"


def test_each_inline_siglip_command_names_real_flags():
    """`siglip ...` written inline in prose: the subcommand and every flag must exist (placeholders are allowed)."""
    wrong = []
    for page in PAGES:
        for span in re.findall(r"`((?:\.venv/bin/)?siglip [^`\n]+)`", page.read_text(encoding="utf-8")):
            try:
                arguments = shlex.split(span)[1:]
            except ValueError:
                continue
            if not arguments or not re.fullmatch(r"[a-z][a-z-]*", arguments[0]):
                continue
            if arguments[0] not in cli.COMMANDS:
                wrong.append(f"{page.name}: `{span}`: no command {arguments[0]}")
                continue
            flags = {word.strip("[]").split("=")[0] for word in arguments if word.strip("[").startswith("--")}
            unknown = sorted(flags - _flags(command_parser(arguments)))
            if unknown:
                wrong.append(f"{page.name}: `{span}`: no {unknown}")
    assert not wrong, "\n".join(wrong)
