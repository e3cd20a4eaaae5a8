"""Any name the kernel allows, through a real ``nxdrop run --once``: exported or refused
cleanly, once, and never a crash, a loop, a broken log line or a forged one."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from nxdrop.folders import error_file_for
from tests.fixtures.service import record

LONG = "2024-01-01_" + "a" * 240 + ".xml"  # 255 bytes: every copy name must be shortened
LONG_UTF8 = "2024-01-01_" + "é" * 120 + ".xml"  # 255 bytes, two per character
BAD_UTF8 = b"2024-01-01_caf\xe9.xml"  # Latin-1, not UTF-8
NEWLINE = "2024-01-01_x\n<3>FAKE ERROR.xml"
DASH = "-rf.xml"


def run_once(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(tmp_path / "drop"),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        "NX_LOG_PATH": str(tmp_path / "logs"),
        "NX_SETTLE_SECONDS": "0.1",
    }
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", "run", "--once"],
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )


def names_in(folder: Path) -> list[bytes]:
    return sorted(os.fsencode(p.name) for p in folder.iterdir())


def test_odd_names_are_exported_or_refused_once(corpus: Path, drop: Path, tmp_path: Path) -> None:
    good = record(corpus, 1)
    for n, name in enumerate((LONG, LONG_UTF8, DASH)):
        (drop / name).write_bytes(record(corpus, n))
    (drop / NEWLINE).write_bytes(good)
    with open(os.path.join(os.fsencode(drop), BAD_UTF8), "wb") as fh:
        fh.write(good)

    first = run_once(tmp_path)

    assert first.returncode == 1  # two refused
    for name in (LONG, LONG_UTF8, DASH):
        assert (drop / "uploaded" / name).exists(), name
    failed = drop / "failed"
    assert (failed / NEWLINE).exists() and (failed / os.fsdecode(BAD_UTF8)).exists()
    reasons = {
        json.loads(error_file_for(failed / NEWLINE).read_text())["error"],
        json.loads(error_file_for(failed / os.fsdecode(BAD_UTF8)).read_text())["error"],
    }
    assert reasons == {
        "record rejected: the file name holds control characters (a newline, a tab, …)",
        "record rejected: the file name is not valid UTF-8",
    }
    log = first.stderr + (tmp_path / "logs" / "nxdrop.log").read_text(errors="replace")
    assert "Logging error" not in log and "Traceback" not in log
    assert not any(line.startswith(("<3>FAKE", "FAKE")) for line in log.splitlines())
    assert "caf\\xe9" in log  # the bad byte is shown escaped
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        statuses = dict(db.execute("SELECT file_name, record_status FROM session_log"))
    assert statuses["2024-01-01_caf\\xe9.xml"] == "ERROR"
    assert statuses["2024-01-01_x\\n<3>FAKE ERROR.xml"] == "ERROR"

    # The same names again, three times: copies in uploaded/ and failed/ fit in 255 bytes.
    for round_ in range(3):
        for n, name in enumerate((LONG, LONG_UTF8)):
            (drop / name).write_bytes(record(corpus, 10 * round_ + n + 10))
        (drop / NEWLINE).write_bytes(good)
        again = run_once(tmp_path)
        assert again.returncode == 1, again.stderr
        assert [p for p in drop.iterdir() if p.is_file()] == []  # nothing left behind, no loop

    for folder in (drop / "uploaded", drop / "failed"):
        assert all(len(name) <= 255 for name in names_in(folder))
    assert len(list((drop / "uploaded").iterdir())) == 3 + 2 * 3
    assert len([p for p in failed.iterdir() if not p.name.endswith(".json")]) == 2 + 3
    # One session, one record: the long names were updated in the archive, not duplicated.
    archived = [p for p in (tmp_path / "archive").rglob("*.xml") if ".v" not in p.name]
    assert len(archived) == 3
    quiet = run_once(tmp_path)  # a last pass finds nothing: nothing re-exported
    assert quiet.returncode == 0 and "waiting in the drop folder" not in quiet.stderr
