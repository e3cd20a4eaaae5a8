"""The database as a fault, not a crash: a real ``nxdrop run`` next to a database that fails.

PostgreSQL (the real server) has its connections terminated mid-run and, through a TCP
relay the test cuts, disappears and comes back, also before nxdrop starts. SQLite has its
file deleted, is locked by another process for 30 s, and fills its (real, tmpfs) disk. In
every case each record is exported once and logged, no file moves before its outcome is
logged, nxdrop says what is wrong once instead of logging a traceback per record, and it
resumes by itself.
"""

from __future__ import annotations

import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.conftest import unavailable
from tests.fixtures.cdcs_fake import FakeCDCS
from tests.fixtures.relay import Relay
from tests.fixtures.service import Service, record, wait_until

FAST = {"NX_SETTLE_SECONDS": "0.3", "NX_RETRY_MAX_TIME": "0"}


def drop_records(svc: Service, corpus: Path, tag: str, numbers: range) -> list[str]:
    names = [f"2024-07-01_{tag}_{n:03d}.xml" for n in numbers]
    for n, name in zip(numbers, names, strict=True):
        (svc.drop / name).write_bytes(record(corpus, n))
    return names


def exported(svc: Service, names: list[str]) -> bool:
    return all((svc.uploaded / name).exists() for name in names)


def tracebacks(svc: Service) -> int:
    return svc.log().count("Traceback")


# -- PostgreSQL -----------------------------------------------------------------------------


@pytest.fixture
def pg(postgres_url: str) -> Iterator[Callable[..., Any]]:
    """Run SQL on the test database as the test (not as nxdrop)."""
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True

    def sql(query: str, *params: Any) -> list[tuple[Any, ...]]:
        with conn.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    yield sql
    conn.close()


def logged(sql: Callable[..., Any], names: list[str]) -> dict[str, Counter[str]]:
    """Per session: how many upload_log rows in each state."""
    sessions = [n.removesuffix(".xml") for n in names]
    rows = sql(
        "SELECT session_identifier, state FROM upload_log WHERE session_identifier = ANY(%s)",
        sessions,
    )
    found: dict[str, Counter[str]] = {s: Counter() for s in sessions}
    for session, state in rows:
        found[session][state] += 1
    return found


def test_postgres_connections_terminated_three_times_mid_run(
    service: Callable[..., Service],
    cdcs_fake: FakeCDCS,
    postgres_url: str,
    pg: Callable[..., Any],
    corpus: Path,
) -> None:
    cdcs_fake.latency = (0.03, 0.06)
    app = f"nxdrop-test-{uuid.uuid4().hex[:8]}"
    svc = service(
        slow=False,
        NX_DB_URL=f"{postgres_url}?application_name={app}",
        NX_CDCS_URL=cdcs_fake.url,
        NX_CDCS_TOKEN=cdcs_fake.user_token,
        **FAST,
    )
    svc.ready()
    tag = uuid.uuid4().hex[:8]
    names = drop_records(svc, corpus, tag, range(60))
    for threshold in (10, 25, 40):
        wait_until(lambda t=threshold: len(list(svc.uploaded.iterdir())) >= t, f"{threshold}")
        killed = pg(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = %s",
            app,
        )
        assert killed, "nxdrop had no connection to cut"
    wait_until(lambda: exported(svc, names), "all sixty exported", timeout=120)

    assert Counter(cdcs_fake.title_counts()[n.removesuffix(".xml")] for n in names) == {1: 60}
    states = logged(pg, names)
    assert all(s["succeeded"] == 1 and s["in_flight"] == 0 for s in states.values()), states
    statuses = pg(
        "SELECT record_status, count(*) FROM session_log WHERE session_identifier LIKE %s "
        "GROUP BY record_status",
        f"%{tag}%",
    )
    assert statuses == [("COMPLETED", 60)]
    assert tracebacks(svc) == 0, svc.log()[-3000:]


def test_postgres_gone_and_back_and_unreachable_at_start(
    service: Callable[..., Service],
    relay_to: type[Relay],
    postgres_url: str,
    pg: Callable[..., Any],
    corpus: Path,
    tmp_path: Path,
) -> None:
    relay = relay_to(("127.0.0.1", 5432), up=False)  # PostgreSQL is down at start
    url = postgres_url.replace("127.0.0.1:5432", f"127.0.0.1:{relay.port}")
    svc = service(slow=False, NX_DB_URL=url, NX_ARCHIVE_PATH=str(tmp_path / "archive"), **FAST)
    svc.ready()  # it starts, says so, and waits: not a configuration error (exit 2)
    svc.notify.wait_for(lambda line: "database DOWN" in line, "STATUS=database DOWN")
    tag = uuid.uuid4().hex[:8]
    first = drop_records(svc, corpus, tag, range(0, 10))
    svc.wait_log("the database is unavailable")
    assert svc.proc.poll() is None and list(svc.uploaded.iterdir()) == []

    relay.restore()  # the server is back
    wait_until(lambda: exported(svc, first), "the first ten exported")
    mark = svc.notify.mark()
    relay.cut()  # a failover: every connection drops, nothing answers for a while
    second = drop_records(svc, corpus, tag, range(10, 20))
    svc.notify.wait_for(lambda line: "database DOWN" in line, "DOWN again", after=mark)
    assert not any((svc.uploaded / n).exists() for n in second)  # nothing moves unlogged
    relay.restore()
    wait_until(lambda: exported(svc, first + second), "all twenty exported", timeout=90)

    states = logged(pg, first + second)
    assert all(s["succeeded"] == 1 and s["in_flight"] == 0 for s in states.values()), states
    assert svc.log().count("the database is unavailable") <= 3  # said, not flooded
    assert tracebacks(svc) == 0, svc.log()[-3000:]


# -- SQLite ----------------------------------------------------------------------------------


def sqlite_service(service: Callable[..., Service], tmp_path: Path) -> tuple[Service, Path]:
    """A ready daemon on the default SQLite database, exporting to an archive; its file."""
    svc = service(slow=False, NX_ARCHIVE_PATH=str(tmp_path / "archive"), **FAST)
    svc.ready()
    return svc, tmp_path / "state" / "nxdrop.db"


def sqlite_sessions(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT session_identifier, record_status FROM session_log"))


def test_a_deleted_sqlite_file_is_noticed_and_reopened(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    svc, database = sqlite_service(service, tmp_path)
    before = drop_records(svc, corpus, "before", range(3))
    wait_until(lambda: exported(svc, before), "the first three exported")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{database}{suffix}").unlink(missing_ok=True)  # an operator's clean-up

    after = drop_records(svc, corpus, "after", range(3))
    wait_until(lambda: exported(svc, after), "the next three exported")

    assert database.exists()
    assert sqlite_sessions(database) == {n.removesuffix(".xml"): "COMPLETED" for n in after}
    assert "was deleted while nxdrop ran" in svc.log()


def test_the_daemon_checkpoints_sqlite_so_the_file_alone_holds_the_log(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    # The main loop copies SQLite's write-ahead log into the database file every second,
    # and the workers' commits never do (a worker that did would wait for the copy and two
    # syncs). Seen from outside: soon after the work, the file alone, without its -wal,
    # holds every session; before, the log's last pages stayed out of it until nxdrop
    # stopped.
    svc, database = sqlite_service(service, tmp_path)
    names = drop_records(svc, corpus, "wal", range(60))
    wait_until(lambda: exported(svc, names), "sixty exported", timeout=60)

    def the_file_alone() -> dict[str, str]:
        copy = tmp_path / f"copy-{time.monotonic_ns()}.db"
        copy.write_bytes(database.read_bytes())  # no -wal beside it: the file's own pages
        try:
            return sqlite_sessions(copy)
        except sqlite3.DatabaseError:
            return {}  # copied halfway through a checkpoint: look again

    expected = {n.removesuffix(".xml"): "COMPLETED" for n in names}
    wait_until(lambda: the_file_alone() == expected, "every session in the file itself", 30)
    assert tracebacks(svc) == 0, svc.log()[-3000:]


def test_a_sqlite_file_locked_for_30_seconds_delays_but_loses_nothing(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    svc, database = sqlite_service(service, tmp_path)
    locker = sqlite3.connect(database, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")  # another program holds the database
    names = drop_records(svc, corpus, "locked", range(5))
    until = time.monotonic() + 30
    while time.monotonic() < until:  # the fault lasts 30 s; all along, nothing moves
        assert not any((svc.uploaded / n).exists() for n in names)
        time.sleep(0.5)
    locker.execute("COMMIT")
    locker.close()

    wait_until(lambda: exported(svc, names), "all five exported", timeout=90)
    assert sqlite_sessions(database) == {n.removesuffix(".xml"): "COMPLETED" for n in names}
    assert tracebacks(svc) == 0, svc.log()[-3000:]


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs mounted for the test (root only; CI runs as root)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        unavailable(f"cannot mount a tmpfs: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_pauses_the_work_until_there_is_room(
    service: Callable[..., Service], small_tmpfs: Path, corpus: Path, tmp_path: Path
) -> None:
    database = small_tmpfs / "nxdrop.db"
    svc = service(
        slow=False,
        NX_DB_URL=f"sqlite:///{database}",
        NX_ARCHIVE_PATH=str(tmp_path / "archive"),
        **FAST,
    )
    svc.ready()
    first = drop_records(svc, corpus, "room", range(2))
    wait_until(lambda: exported(svc, first), "the first two exported")
    filler = small_tmpfs / "filler"
    with filler.open("wb") as fh:  # fill the disk to the last byte
        try:
            while True:
                fh.write(b"\0" * 65536)
                fh.flush()
        except OSError:
            pass

    # SQLite first writes into the room its files already have (its write-ahead log is
    # reused once copied into the database): records go on being exported, and logged,
    # until the log must grow. From then on, nothing moves.
    def down() -> bool:
        return any("database DOWN" in line for line in svc.notify.lines)

    dropped: list[str] = []

    def settled() -> bool:
        return down() or exported(svc, dropped)

    for batch in range(40):
        dropped += drop_records(svc, corpus, f"full{batch:02d}", range(5))
        wait_until(settled, "exported, or the database down")
        if down():
            break
    assert down(), "five records at a time, 200 in all, and the full disk never showed"
    wait_until(lambda: all(svc.places(n) for n in dropped), "each in uploaded/ or back, waiting")
    blocked = [n for n in dropped if svc.places(n) == ["drop"]]
    assert blocked  # those the full disk stopped wait in the drop folder
    assert "cannot copy the write-ahead log" in svc.log()  # and why, once

    filler.unlink()  # room again
    wait_until(lambda: exported(svc, blocked), "the five exported after all", timeout=90)
    statuses = sqlite_sessions(database)
    assert all(statuses[n.removesuffix(".xml")] == "COMPLETED" for n in first + blocked)
    assert tracebacks(svc) == 0, svc.log()[-3000:]


# -- health ------------------------------------------------------------------------------------


def test_a_stalled_worker_stops_the_watchdog(service: Callable[..., Service], corpus: Path) -> None:
    svc = service(
        gate=False,
        WATCHDOG_USEC="200000",  # a ping every 0.1 s while healthy
        NX_STUCK_SECONDS="2",
        SLOWDEST_TIMEOUT="120",  # a destination call that hangs (no timeout of its own)
        **FAST,
    )
    svc.ready()
    wait_until(lambda: svc.notify.count("WATCHDOG=1") >= 3, "the first pings")
    (svc.drop / "stuck.xml").write_bytes(record(corpus, 1))
    wait_until(lambda: svc.calls() == ["stuck"], "the export under way")
    svc.notify.wait_for(lambda line: "STUCK" in line, "STATUS=… STUCK")
    pings = svc.notify.count("WATCHDOG=1")
    quiet_until = time.monotonic() + 1.0  # ten ping intervals
    while time.monotonic() < quiet_until:
        assert svc.notify.count("WATCHDOG=1") <= pings + 1, "pinged while stuck"
        time.sleep(0.05)
    assert "nxdrop is stuck" in svc.log()

    svc.open_gate()  # the call returns: work moves again, and so do the pings
    wait_until(lambda: (svc.uploaded / "stuck.xml").exists(), "stuck.xml exported")
    wait_until(lambda: svc.notify.count("WATCHDOG=1") > pings + 3, "pings again")
