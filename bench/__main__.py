"""``python -m bench``: run the scenarios, print the table, write the JSON (see __init__)."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench import realcdcs, scenarios
from bench.procs import Others
from bench.report import DOCS, Row, document, now, table, update_docs, write_json

SCENARIOS: dict[str, scenarios.Scenario] = {
    "cpu": scenarios.cpu_small,
    "cpu-large": scenarios.cpu_large,
    "backlog": scenarios.backlog,
    "throughput": scenarios.throughput,
    "latency": scenarios.latency,
    "startup": scenarios.startup,
    "idle": scenarios.idle,
    "real-cdcs": realcdcs.real_cdcs,
}


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="nxdrop beside the minimal reference loop (issue 11); docs/benchmarks.md",
    )
    parser.add_argument("--smoke", action="store_true", help="small N, 1 repetition (≤ 30 s)")
    parser.add_argument("--repeat", type=int, help="repetitions, median taken (default 3)")
    parser.add_argument(
        "--backlog-repeat", type=int, default=1, help="repetitions of the backlogs (1)"
    )
    parser.add_argument(
        "--only", nargs="+", choices=SCENARIOS, metavar="NAME", help=", ".join(SCENARIOS)
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write every sample here")
    parser.add_argument(
        "--update-docs", action="store_true", help=f"put the table into {DOCS.name}"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--work", type=Path, help="work folder (default: a new one in $TMPDIR)")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = 1 if args.smoke else 3
    return args


def installed_as_pip_installs() -> None:
    """Byte-compile nxdrop, as ``pip install`` does: a checkout installed with ``-e`` under
    ``PYTHONDONTWRITEBYTECODE=1`` would otherwise compile every module from source at each
    start (about 100 ms), which the reference, one small script, hardly pays."""
    import compileall

    import nxdrop

    compileall.compile_dir(Path(nxdrop.__file__).parent, quiet=1)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    corpus = Path(os.environ.get("NXDROP_SHARED", realcdcs.SHARED)) / "corpus"
    work = args.work or Path(tempfile.mkdtemp(prefix="nxdrop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    installed_as_pip_installs()
    ctx = scenarios.Context(
        sizes=scenarios.SMOKE if args.smoke else scenarios.FULL,
        repeat=args.repeat,
        backlog_repeat=1 if args.smoke else args.backlog_repeat,
        work=work,
        small=(corpus / "example_record_curation.xml").read_bytes(),
        large=(corpus / "example_record.xml").read_bytes(),
        xsd=(corpus / "nexus-experiment.xsd").read_text(encoding="utf-8"),
        keep=args.keep,
    )
    started, clock = now(), time.monotonic()
    rows: list[Row] = []
    notes: list[str] = []
    results: dict[str, Any] = {}
    everything, outside = Others(), 0.0
    for name in args.only or SCENARIOS:
        print(f"== {name}", file=sys.stderr, flush=True)
        began, others = time.monotonic(), Others()
        try:
            outcome = SCENARIOS[name](ctx)
        except realcdcs.Skipped as exc:
            broken = os.environ.get("CI", "").lower() == "true"
            results[name] = {"status": "error" if broken else "skipped", "error": str(exc)}
            print(f"   {'BROKEN' if broken else 'skipped'}: {exc}", file=sys.stderr)
            continue
        except Exception as exc:
            results[name] = {"status": "error", "error": traceback.format_exc()}
            print(f"   BROKEN: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
            continue
        seconds, busy = time.monotonic() - began, others.share(outcome.outside_cpu)
        outside += outcome.outside_cpu
        rows += outcome.rows
        notes += outcome.notes
        results[name] = {
            "status": "ok",
            "seconds": round(seconds, 1),
            "others_percent": round(busy, 1),
            "samples": outcome.samples,
        }
        print(
            f"   {name}: {seconds:.1f} s; other processes used {busy:.0f} % of the machine",
            file=sys.stderr,
            flush=True,
        )
    elapsed, busy = time.monotonic() - clock, everything.share(outside)
    doc = document(rows, results, started, elapsed)
    doc["others_percent"] = round(busy, 1)
    print()
    if args.smoke:
        print("--smoke: every scenario ran once with tiny N; its figures mean nothing.")
    print(table(rows))
    if notes:
        print("".join(f"\n- {note}" for note in notes))
    broken = [n for n, r in results.items() if r["status"] == "error"]
    print(
        f"\n{len(results)} scenarios in {elapsed:.0f} s; broken: {', '.join(broken) or 'none'}; "
        f"other processes used {busy:.0f} % of the machine meanwhile"
        + (" (the figures are skewed)" if busy > 5 else "")
    )
    print("Only a broken scenario fails this command (exit 1); a missed target never does.")
    if args.json:
        write_json(args.json, doc)
        print(f"JSON: {args.json}")
    if args.update_docs:
        update_docs(rows, notes, doc)
        print(f"figures written into {DOCS}")
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
