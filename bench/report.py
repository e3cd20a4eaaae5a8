"""The results: table rows with their targets, the terminal table, the JSON, the machine, and
the block of docs/benchmarks.md that holds the latest figures."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from statistics import median
from typing import Any

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:results -->", "<!-- /bench:results -->"


@dataclass
class Row:
    """One line of the table: nxdrop's figure, the reference's, and the target."""

    figure: str
    unit: str
    nxdrop: float | None
    reference: float | None
    digits: int = 1
    target: str = ""
    met: bool | None = None  # None: no target, or not measured
    ratio: float | None = None  # nxdrop / reference, where the target is a ratio
    nxdrop_note: str = ""
    reference_note: str = ""

    def cell(self, value: float | None, note: str) -> str:
        if value is None:
            return "—"
        text = f"{value:,.{self.digits}f}" + (f" {self.unit}" if self.unit else "")
        return f"{text} ({note})" if note else text

    def cells(self) -> list[str]:
        return [
            self.figure,
            self.cell(self.nxdrop, self.nxdrop_note),
            self.cell(self.reference, self.reference_note),
            "" if self.ratio is None else f"{self.ratio:.2f}×",
            self.target,
            {True: "yes", False: "NO", None: ""}[self.met],
        ]


HEADER = ["figure", "nxdrop", "reference", "ratio", "target", "met?"]


@dataclass
class Outcome:
    """What a scenario produced: its rows and every raw sample."""

    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # printed under the table
    # CPU seconds of processes it started that are not its children (a server), which the
    # share of the machine "other processes" used must not count.
    outside_cpu: float = 0.0


def ratio_row(
    figure: str,
    unit: str,
    nxdrop: list[float],
    reference: list[float],
    *,
    most: float | None = None,
    least: float | None = None,
    digits: int = 1,
    **notes: str,
) -> Row:
    """A row whose target is a ratio to the reference (``most``: at most, ``least``: at
    least), from the medians of the samples."""
    nx, ref = median(nxdrop), median(reference)
    ratio = nx / ref if nx > 0 and ref > 0 else None  # a tiny smoke run's slope can be < 0
    met, target = None, ""
    if most is not None:
        met, target = None if ratio is None else ratio <= most, f"≤ {most:g}× reference"
    if least is not None:
        met, target = None if ratio is None else ratio >= least, f"≥ {least:g}× reference"
    return Row(figure, unit, nx, ref, digits, target, met, ratio, **notes)


def table(rows: list[Row], markdown: bool = False) -> str:
    lines = [HEADER, *(r.cells() for r in rows)]
    if markdown:
        out = ["| " + " | ".join(c.replace("|", "\\|") for c in line) + " |" for line in lines]
        out.insert(1, "|" + "---|" * len(HEADER))
        return "\n".join(out)
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in out)


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    memory = re.search(r"^MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text(), re.M)
    system = re.search(r'^PRETTY_NAME="?([^"\n]+)', _read("/etc/os-release"), re.M)
    return {
        "cpu": model.group(1).strip() if model else platform.processor(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(memory.group(1)) / 2**20, 1) if memory else None,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "os": system.group(1) if system else platform.system(),
        "filesystem_of_tmp": _filesystem("/tmp"),
    }


def git() -> dict[str, Any]:
    def run(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return done.stdout.strip()

    changed = run("status", "--porcelain", "--", "nxdrop").splitlines()
    return {"commit": run("rev-parse", "HEAD"), "uncommitted_nxdrop_files": len(changed)}


def document(
    rows: list[Row], scenarios: dict[str, Any], started: datetime, seconds: float
) -> dict[str, Any]:
    """Everything of a run, for machines."""
    return {
        "command": " ".join(["python", "-m", "bench", *sys.argv[1:]]),
        "started": started.isoformat(timespec="seconds"),
        "seconds": round(seconds, 1),
        "machine": machine(),
        "git": git(),
        "rows": [asdict(r) for r in rows],
        "scenarios": scenarios,
    }


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def update_docs(rows: list[Row], notes: list[str], doc: dict[str, Any], path: Path = DOCS) -> None:
    """Replace the figures between the markers of docs/benchmarks.md with this run's."""
    m, g = doc["machine"], doc["git"]
    dirty = f" plus {g['uncommitted_nxdrop_files']} uncommitted files in nxdrop/"
    block = "\n".join(
        [
            BEGIN,
            f"Run {doc['started'][:16].replace('T', ' ')} UTC, `{doc['command']}`, "
            f"{doc['seconds'] / 60:.1f} minutes; nxdrop at commit `{g['commit'][:10]}`"
            f"{dirty if g['uncommitted_nxdrop_files'] else ''}.",
            f"Machine: {m['cpu']}, {m['usable_cores']} cores, {m['memory_gib']} GiB, "
            f"{m['os']}, kernel {m['kernel']}, Python {m['python']}. Other processes used "
            f"{doc['others_percent']:.0f} % of the machine meanwhile"
            + (": the figures are skewed." if doc["others_percent"] > 5 else "."),
            "",
            table(rows, markdown=True),
            "",
            *(f"- {note}" for note in notes),
            END,
        ]
    )
    text = path.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    path.write_text(text[:start] + block + text[end:])


def now() -> datetime:
    return datetime.now(UTC)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _filesystem(path: str) -> str:
    best = ("", "")
    for line in _read("/proc/mounts").splitlines():
        parts = line.split()
        if len(parts) > 2 and path.startswith(parts[1]) and len(parts[1]) > len(best[0]):
            best = (parts[1], parts[2])
    return best[1]
