"""``nxdrop backfill``: a facility that exported to CDCS only adds eLabFTW.

30 records go to CDCS alone; then eLabFTW is enabled and backfilled, interrupted by SIGTERM
halfway and run again: every record ends with exactly one experiment, linked to its CDCS
record, and ``--dry-run`` changes nothing.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.fixtures.cdcs_fake import FakeCDCS
from tests.fixtures.elabftw_fake import FakeELabFTW
from tests.fixtures.service import record, wait_until

RECORDS = 30


def nxdrop_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(tmp_path / "drop"),
        "NX_SETTLE_SECONDS": "0.1",
        "NX_RETRY_MAX_TIME": "10",
        **extra,
    }
    return env


def nxdrop(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def experiments_of(fake: FakeELabFTW, session: str) -> list[dict[str, object]]:
    return [e for e in fake.experiments.values() if session in str(e.get("title"))]


def test_backfill_a_destination_added_later(
    cdcs_fake: FakeCDCS, elabftw_fake: FakeELabFTW, corpus: Path, drop: Path, tmp_path: Path
) -> None:
    cdcs_only = nxdrop_env(tmp_path, NX_CDCS_URL=cdcs_fake.url, NX_CDCS_TOKEN=cdcs_fake.user_token)
    sessions = [f"2024-09-01_titan_{n:02d}" for n in range(RECORDS)]
    for n, session in enumerate(sessions):
        (drop / f"{session}.xml").write_bytes(record(corpus, n))
    first = nxdrop(cdcs_only, "run", "--once")
    assert first.returncode == 0, first.stderr
    assert len(list((drop / "uploaded").iterdir())) == RECORDS

    both = cdcs_only | {
        "NX_ELABFTW_URL": elabftw_fake.url,
        "NX_ELABFTW_API_KEY": elabftw_fake.api_key,
    }
    dry = nxdrop(both, "backfill", "elabftw", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"{RECORDS} records would be sent" in dry.stdout
    assert elabftw_fake.experiments == {}  # a dry run changes nothing
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        assert db.execute(
            "SELECT count(*) FROM upload_log WHERE destination_name = 'elabftw'"
        ).fetchone() == (0,)

    elabftw_fake.latency = (0.02, 0.05)  # slow enough to be stopped halfway
    halfway = subprocess.Popen(
        [sys.executable, "-m", "nxdrop", "backfill", "elabftw"],
        env=both,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: len(elabftw_fake.experiments) >= RECORDS // 2, "half of them sent")
    halfway.send_signal(signal.SIGTERM)
    out, err = halfway.communicate(timeout=60)
    assert halfway.returncode == 1, err
    assert "left (stopped; run it again to go on)" in out
    sent_then = len(elabftw_fake.experiments)
    assert sent_then < RECORDS

    again = nxdrop(both, "backfill", "elabftw")
    assert again.returncode == 0, again.stderr
    assert f"{RECORDS - sent_then} of {RECORDS - sent_then} sent" in again.stdout

    for session in sessions:
        [cdcs] = cdcs_fake.records_titled(session)
        [experiment] = experiments_of(elabftw_fake, session)  # exactly one each
        assert f"{cdcs_fake.url}data?id={cdcs['id']}" in str(experiment["body"]), session
    assert nxdrop(both, "backfill", "elabftw").stdout.strip() == "backfill elabftw: 0 of 0 sent"
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        statuses = {s for (s,) in db.execute("SELECT record_status FROM session_log")}
    assert statuses == {"COMPLETED"}  # a backfill leaves the sessions as they were
