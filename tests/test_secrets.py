"""No secret in anything nxdrop writes, even when the servers echo it back.

A real ``nxdrop run --once`` exports to a CDCS and an eLabFTW that answer every request with
an error page echoing its ``Authorization`` header (an HTML page and a JSON message whose
key straddles the cut of a message); then ``nxdrop check``, ``nxdrop status --json`` and
``nxdrop status SESSION``. Afterwards every byte nxdrop wrote — its output, its log file,
the database file and its WAL, every ``failed/*.error.json`` — is searched for both secrets,
and for any part of them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import RECORDS
from tests.fixtures.hostile import echo_authorization, hostile_servers, leaked_parts

TOKEN = "5ec12e7c0ffee0123456789abcdef0123456789a"
API_KEY = "7-5ec12e7a9b8c7d6e5f40123456789abcdef0123456789abcdef"


def nxdrop(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", *args],
        env=env,
        capture_output=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_a_secret_echoed_by_every_server_is_written_nowhere(tmp_path: Path, corpus: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    sessions = [f"2024-03-0{i}_FEI-Titan-TEM_secret{i}" for i in range(1, len(RECORDS) + 1)]
    for session, record in zip(sessions, RECORDS, strict=True):
        shutil.copyfile(corpus / record, drop / f"{session}.xml")

    with hostile_servers() as start:
        cdcs = start(echo_authorization("html", 500))  # permanent: one attempt
        # transient: retried with backoff until NX_RETRY_MAX_TIME, then given up
        elab = start(echo_authorization("json-at-cut", 503, retry_after=None))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
        for name in ("CREDENTIALS_DIRECTORY", "JOURNAL_STREAM", "NOTIFY_SOCKET"):
            env.pop(name, None)
        env.update(
            NX_DATA_PATH=str(tmp_path / "state"),
            NX_DROP_PATH=str(drop),
            NX_CDCS_URL=cdcs.url,
            NX_CDCS_TOKEN=TOKEN,
            NX_ELABFTW_URL=elab.url,
            NX_ELABFTW_API_KEY=API_KEY,
            NX_RETRY_MAX_TIME="2",
            NX_SETTLE_SECONDS="0.2",
            NX_LOG_TARGET="stderr",
            NX_LOG_PATH=str(tmp_path / "logs"),
        )
        run = nxdrop("run", "--once", "--verbose", env=env)
        check = nxdrop("check", env=env)
        status = nxdrop("status", "--json", env=env)
        one = [nxdrop("status", session, env=env) for session in sessions]
        # The secrets did go out, and came back in the error pages: a leak was possible.
        assert f"Token {TOKEN}" in cdcs.authorizations()
        assert API_KEY in elab.authorizations()
        assert len(elab.authorizations()) > len(sessions)  # retried

    assert run.returncode == 1, run.stderr.decode(errors="replace")[-3000:]
    assert check.returncode == 1
    failed = sorted((drop / "failed").glob("*.error.json"))
    assert len(failed) == len(sessions)
    assert b"HTTP 500: Error: bad header Token ***" in failed[0].read_bytes()

    written: dict[str, bytes] = {
        "run --once (stdout)": run.stdout,
        "run --once (stderr)": run.stderr,
        "check": check.stdout + check.stderr,
        "status --json": status.stdout + status.stderr,
        **{f"status {s}": p.stdout + p.stderr for s, p in zip(sessions, one, strict=True)},
    }
    for path in sorted(tmp_path.rglob("*")):  # the log file, nxdrop.db and -wal, error.json…
        if path.is_file() and path.suffix != ".xml":
            written[str(path.relative_to(tmp_path))] = path.read_bytes()
    assert any(name.endswith("nxdrop.log") for name in written), sorted(written)
    assert any(name.endswith("nxdrop.db") for name in written), sorted(written)
    # Something about the failures was written where one would look for it.
    assert b"HTTP 503" in written["status --json"]
    assert b"HTTP 500" in written["check"]

    for secret in (TOKEN, API_KEY):
        found = {
            name: leaked_parts(secret, blob.decode("latin-1"))
            for name, blob in written.items()
            if leaked_parts(secret, blob.decode("latin-1"))
        }
        assert found == {}, f"parts of a secret in {sorted(found)}"
