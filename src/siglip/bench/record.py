"""Where a benchmark's figures come from and where they go: the machine, and a marked section of a document.

Every benchmark prints the machine beside its figures (a ratio means little without it), and can write its table
into a document between two markers, so that docs/benchmarks.md keeps its prose around tables that a command wrote.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from pathlib import Path


def machine_description(device: str) -> str:
    """A one-line description of where the figures come from."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        where = torch.cuda.get_device_name()
    else:
        where = f"{os.cpu_count()}-core CPU ({_cpu_model()}), no GPU"
    return f"{where}; torch {torch.__version__}, {torch.get_num_threads()} threads; python {platform.python_version()}"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def write_marked_section(path: Path, begin: str, end: str, body: str, *, title: str) -> None:
    """Write `begin`, "Measured <date>. ", `body` and `end` into `path`: in place of the section between the two
    markers when the file has both, else appended to it (a new file starts with the heading `title`)."""
    section = f"{begin}\nMeasured {datetime.date.today().isoformat()}. {body}{end}"
    text = path.read_text() if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else f"# {title}\n\n") + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def publish(rows: list[dict], *, device: str, command: str, load: list[float], started: float, as_json: bool,
            table: str) -> dict:
    """Print a benchmark's result (one JSON object, or `table`) and return the object: its rows, the machine, the
    command that reproduces it, the range of the one-minute load average while it ran, and its seconds."""
    result = {"rows": rows, "machine": machine_description(device), "command": command,
              "load_average": [min(load), max(load)], "seconds": round(time.perf_counter() - started)}
    print(json.dumps(result) if as_json else table)
    return result
