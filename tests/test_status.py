"""``nxdrop status``: the reason and the place of a rejected, a failed, an interrupted and a
retrying record, as an operator reads them; and a pipe closed early."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.fixtures.service import Service, record, wait_until


def nxdrop(tmp_path: Path, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NX_", "SLOWDEST_"))}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(tmp_path / "drop"),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        "NX_SETTLE_SECONDS": "0.1",
        **extra,
    }
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_rejected_record_says_why_and_where(corpus: Path, drop: Path, tmp_path: Path) -> None:
    (drop / "2024-01-01_bad.xml").write_bytes(b"<Experiment><title>unclosed")
    assert nxdrop(tmp_path, "run", "--once").returncode == 1

    story = nxdrop(tmp_path, "status", "2024-01-01_bad")

    assert story.returncode == 0, story.stderr
    lines = story.stdout
    assert lines.startswith("2024-01-01_bad: ERROR")
    assert "rejected: not well-formed XML" in lines
    assert f"failed    {drop / 'failed' / '2024-01-01_bad.xml'}" in lines
    assert "attempts: none (no destination was called)" in lines
    listed = nxdrop(tmp_path, "status", "--failed")
    assert "2024-01-01_bad" in listed.stdout and "not well-formed" in listed.stdout
    assert "nxdrop status SESSION tells the whole story" in listed.stdout


def test_a_failed_record_shows_every_attempt_in_full(
    corpus: Path, drop: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "not-a-folder"
    archive.write_text("a file where the archive should be")
    (drop / "2024-01-02_x.xml").write_bytes(record(corpus, 1))
    assert nxdrop(tmp_path, "run", "--once", NX_ARCHIVE_PATH=str(archive)).returncode == 1

    story = nxdrop(tmp_path, "status", "2024-01-02_x").stdout

    assert story.startswith("2024-01-02_x: BUILT_NOT_EXPORTED")
    assert "archive    failed (1 call" in story
    assert "Not a directory" in story  # the error in full, not cut mid-sentence
    assert f"failed    {drop / 'failed' / '2024-01-02_x.xml'}" in story
    data = json.loads(nxdrop(tmp_path, "status", "2024-01-02_x", "--json").stdout)
    assert data["session"]["status"] == "BUILT_NOT_EXPORTED"
    assert [(a["destination_name"], a["state"]) for a in data["attempts"]] == [
        ("archive", "failed")
    ]
    assert data["files"] == [{"where": "failed", "path": str(drop / "failed" / "2024-01-02_x.xml")}]
    assert nxdrop(tmp_path, "status", "--instrument", "nowhere").stdout.strip() == (
        "(nothing logged yet)"
    )


def test_an_interrupted_and_a_retrying_record_are_shown_as_such(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    # Retrying: the destination answers "busy" for as long as nxdrop keeps asking.
    svc = service(SLOWDEST_MODE="transient", NX_RETRY_MAX_TIME="600", NX_ARCHIVE_PATH="")
    svc.ready()
    (svc.drop / "2024-01-03_busy.xml").write_bytes(record(corpus, 1))

    def retrying() -> str | None:
        story = nxdrop(tmp_path, "status", "2024-01-03_busy").stdout
        return story if "retrying (call " in story else None

    story = wait_until(retrying, "status to show the retries")
    assert "2024-01-03_busy: EXPORTING" in story
    assert "busy, try again" in story  # the last error, while the retries go on
    assert "working" in story  # the file is in the working folder now

    svc.proc.send_signal(signal.SIGKILL)  # the daemon dies mid-record
    svc.proc.wait(timeout=30)
    story = nxdrop(tmp_path, "status", "2024-01-03_busy").stdout
    assert story.startswith("2024-01-03_busy: INTERRUPTED")
    assert "it runs again when nxdrop starts" in story
    listed = nxdrop(tmp_path, "status").stdout
    assert "INTERRUPTED" in listed


def test_status_into_a_closed_pipe_exits_quietly(corpus: Path, drop: Path, tmp_path: Path) -> None:
    for n in range(1200):  # more than a pipe holds: head closes it while nxdrop writes
        (drop / f"2024-01-04_p{n:04d}.xml").write_bytes(record(corpus, n))
    assert nxdrop(tmp_path, "run", "--once").returncode == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {"NX_DATA_PATH": str(tmp_path / "state"), "NX_DROP_PATH": str(drop)}
    piped = subprocess.run(
        f"{sys.executable} -m nxdrop status --limit 2000 | head -1",
        shell=True,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert piped.returncode == 0
    assert piped.stdout.startswith("SESSION IDENTIFIER")
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr
    quiet = subprocess.run(
        f"{sys.executable} -m nxdrop status --limit 2000 | head -1; exit ${{PIPESTATUS[0]}}",
        shell=True,
        executable="/bin/bash",
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert quiet.returncode == 0, quiet.stderr  # nxdrop's own exit code, not head's
