"""The log in SQLite and PostgreSQL: the contract's SQL, time zones, threads, the session
lock, what the log knows of a session, recovery after a crash, and older tables."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest

from nxdrop.destinations import ExportResult
from nxdrop.reader import RecordReader
from nxdrop.records import Record
from nxdrop.store import AttemptState, RecordStatus, Standing, Store

ENDPOINT = "https://cdcs.example/"


@pytest.fixture
def record(corpus: Path, drop: Path) -> Record:
    # Unique name and bytes: the PostgreSQL database outlives test runs.
    tag = uuid.uuid4().hex[:8]
    target = drop / f"2018-11-13_FEI-Titan-TEM_{tag}.xml"
    target.write_bytes((corpus / "example_record.xml").read_bytes() + f"<!-- {tag} -->".encode())
    return RecordReader(10**8).read(target)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        yield Store(f"sqlite:///{tmp_path / 'nxdrop.db'}")
        return
    yield Store(request.getfixturevalue("postgres_url"))


def _log(
    store: Store,
    record: Record,
    name: str,
    ok: bool,
    *,
    endpoint: str = ENDPOINT,
    state: AttemptState | None = None,
) -> None:
    attempt = store.begin_attempt(record, name, endpoint, "lab-0")
    result = ExportResult(
        ok,
        name,
        record_id="7" if ok else None,
        error_message=None if ok else "HTTP 500",
        metadata={"k": 1},
    )
    state = state or (AttemptState.SUCCEEDED if ok else AttemptState.FAILED)
    store.finish_attempt(attempt, result, state, 0.25)


def test_contract_queries_answer(store: Store, record: Record) -> None:
    sid = record.session_identifier
    store.set_session(sid, RecordStatus.EXPORTING, record=record)
    _log(store, record, "cdcs", True)
    _log(store, record, "elabftw", False)
    store.set_session(sid, RecordStatus.BUILT_NOT_EXPORTED, record=record)

    cursor = store.db.execute_sql(
        "SELECT destination_name, success, timestamp, error_message FROM upload_log "
        "WHERE session_identifier = %s ORDER BY timestamp DESC".replace("%s", store.db.param),
        (sid,),
    )
    rows = cursor.fetchall()
    assert [(r[0], bool(r[1]), r[3]) for r in rows] == [
        ("elabftw", False, "HTTP 500"),
        ("cdcs", True, None),
    ]
    cursor = store.db.execute_sql(
        "SELECT instrument, record_status, timestamp FROM session_log "
        "WHERE session_identifier = %s".replace("%s", store.db.param),
        (sid,),
    )
    assert [tuple(r[:2]) for r in cursor.fetchall()] == [("FEI-Titan-TEM", "BUILT_NOT_EXPORTED")]


def test_one_session_row_and_aware_utc_timestamps(store: Store, record: Record) -> None:
    sid = record.session_identifier
    for status in RecordStatus:
        store.set_session(sid, status, record=record)
    row = store.session(sid)
    assert row is not None and row.record_status == "ERROR"
    assert row.user == "Ned Land (ned)"
    assert row.timestamp.tzinfo is not None and row.timestamp.utcoffset() == UTC.utcoffset(None)
    assert [s.session_identifier for s in store.recent_sessions(1000)].count(sid) == 1


def test_standings_say_what_each_destination_holds_per_endpoint(
    store: Store, record: Record
) -> None:
    sid = record.session_identifier
    assert store.standings(sid) == {}
    _log(store, record, "cdcs", False)
    # A failure holds nothing, but the log knows something was tried there.
    assert store.standings(sid) == {("cdcs", ENDPOINT): Standing(attempted=True)}
    _log(store, record, "cdcs", True)
    _log(store, record, "cdcs", True, endpoint="https://other.example/")
    _log(store, record, "elabftw", True, state=AttemptState.UPDATED)

    standings = store.standings(sid)
    held = standings[("cdcs", ENDPOINT)].latest_success
    assert held is not None and held.record_id == "7" and held.metadata == {"k": 1}
    assert held.file_sha256 == record.sha256 and held.as_result().success
    assert set(standings) == {
        ("cdcs", ENDPOINT),
        ("cdcs", "https://other.example/"),
        ("elabftw", ENDPOINT),
    }
    assert not any(s.interrupted for s in standings.values())
    assert all(s.attempted for s in standings.values())


def test_the_log_vouches_for_an_endpoint_once_it_was_found_empty(
    store: Store, record: Record
) -> None:
    # The PostgreSQL database is shared by every test: an endpoint of this test's own.
    endpoint = f"https://{record.session_identifier.lower()}.example/"
    assert not store.logged_from_start("cdcs", endpoint)
    store.note_empty("cdcs", endpoint)
    store.note_empty("cdcs", endpoint)  # said twice (two workers, two daemons): one row
    assert store.logged_from_start("cdcs", endpoint)
    assert not store.logged_from_start("cdcs", endpoint + "other/")
    assert not store.logged_from_start("elabftw", endpoint)


def test_a_dead_workers_attempts_become_interrupted_until_a_success(
    store: Store, record: Record
) -> None:
    sid = record.session_identifier
    dead, alive = f"dead-{uuid.uuid4().hex[:8]}", f"alive-{uuid.uuid4().hex[:8]}"
    store.begin_attempt(record, "cdcs", ENDPOINT, dead)  # its process was killed
    store.begin_attempt(record, "cdcs", ENDPOINT, alive)  # alive: not ours to judge
    assert store.lock_session(sid, dead, record.name)

    assert store.recover([dead]) == 1
    assert [u.state for u in store.uploads(sid)] == ["interrupted", "in_flight"]
    assert store.standings(sid)[("cdcs", ENDPOINT)] == Standing(interrupted=True, attempted=True)
    assert store.lock_session(sid, "lab-5", record.name)  # its lock was released

    _log(store, record, "cdcs", True)
    standing = store.standings(sid)[("cdcs", ENDPOINT)]
    assert not standing.interrupted and standing.latest_success is not None


def test_the_session_lock_is_held_by_one_worker_at_a_time(store: Store, record: Record) -> None:
    sid = record.session_identifier
    assert store.lock_session(sid, "lab-0", record.name)
    assert store.lock_session(sid, "lab-0", record.name)  # its own, again
    assert not store.lock_session(sid, "lab-1", record.name)
    store.unlock_session(sid, "lab-1")  # not its lock: nothing happens
    assert not store.lock_session(sid, "lab-1", record.name)
    store.unlock_session(sid, "lab-0")
    assert store.lock_session(sid, "lab-1", record.name)
    row = store.session(sid)
    assert row is not None and row.record_status == "EXPORTING"


def test_many_workers_race_for_one_session_and_one_wins(store: Store, record: Record) -> None:
    sid = record.session_identifier
    barrier = threading.Barrier(8)
    won: list[str] = []

    def race(n: int) -> None:
        barrier.wait()
        if store.lock_session(sid, f"w-{n}", record.name):
            won.append(f"w-{n}")

    threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(won) == 1


def test_in_flight_attempt_is_visible(store: Store, record: Record) -> None:
    store.begin_attempt(record, "cdcs", ENDPOINT, "lab-0")
    [row] = store.uploads(record.session_identifier)
    assert (row.state, row.success) == ("in_flight", False)


def test_threads_write_at_once(store: Store, record: Record) -> None:
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(20):
                _log(store, record, f"d{n}", i % 2 == 0)
                store.set_session(record.session_identifier, RecordStatus.EXPORTING, record=record)
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert len(store.uploads(record.session_identifier)) == 8 * 20


def test_sqlite_uses_wal(tmp_path: Path) -> None:
    Store(f"sqlite:///{tmp_path / 'sub' / 'nxdrop.db'}").open()
    with sqlite3.connect(tmp_path / "sub" / "nxdrop.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_database_of_the_first_version_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:  # the tables as nxdrop 0.1 made them
        conn.executescript(
            """
            CREATE TABLE upload_log (id INTEGER PRIMARY KEY, session_identifier VARCHAR(255),
              destination_name VARCHAR(255), success INTEGER, timestamp TEXT,
              record_id VARCHAR(255), record_url TEXT, error_message TEXT, metadata_json TEXT,
              state VARCHAR(255), file_name VARCHAR(255), file_sha256 VARCHAR(64),
              status_code INTEGER, attempts INTEGER, duration_seconds REAL, worker VARCHAR(255));
            CREATE TABLE session_log (id INTEGER PRIMARY KEY, session_identifier VARCHAR(255)
              UNIQUE, instrument VARCHAR(255), user VARCHAR(255), record_status VARCHAR(255),
              timestamp TEXT, file_name VARCHAR(255), file_sha256 VARCHAR(64),
              error_message TEXT);
            INSERT INTO session_log (session_identifier, record_status, timestamp)
              VALUES ('old', 'COMPLETED', '2024-01-01T00:00:00+00:00');
            """
        )
    store = Store(f"sqlite:///{path}")
    assert store.lock_session("old", "lab-0", "old.xml")
    with sqlite3.connect(path) as conn:
        columns = {r[1] for r in conn.execute("PRAGMA table_info(upload_log)")}
    assert "endpoint" in columns


def _log_frames(path: Path) -> int:
    """Frames in SQLite's write-ahead log since it last started over, as another process
    sees them (its PASSIVE checkpoint then copies them: the log starts over after)."""
    conn = sqlite3.connect(path)
    try:
        busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    finally:
        conn.close()
    assert (busy, copied) == (0, frames)
    return int(frames)


def _lock_sessions(store: Store, numbers: range) -> None:
    for n in numbers:  # about three pages of the log each
        store.lock_session(f"s{n}", "lab-0", f"s{n}.xml")


def test_checkpoints_are_taken_by_the_caller_and_never_by_a_writer(tmp_path: Path) -> None:
    path = tmp_path / "nxdrop.db"
    store = Store(f"sqlite:///{path}")
    store.open()
    store.checkpoint()  # from now on, commits do not checkpoint
    _log_frames(path)
    _lock_sessions(store, range(500))
    # Past SQLite's automatic 1,000 pages: no writer copied the log and started it over.
    assert _log_frames(path) > 1000

    store.database.close()  # a connection made again leaves checkpoints to the caller too
    _lock_sessions(store, range(500, 1000))
    assert _log_frames(path) > 1000

    _lock_sessions(store, range(1000, 1500))
    size = path.stat().st_size
    store.checkpoint()  # the caller's own: the new pages reach the database file
    assert path.stat().st_size > size


def test_a_checkpoint_of_postgresql_or_of_a_missing_file_does_nothing(
    tmp_path: Path, postgres_url: str
) -> None:
    Store(postgres_url).checkpoint()
    store = Store(f"sqlite:///{tmp_path / 'gone.db'}")
    store.open()
    store.checkpoint()
    (tmp_path / "gone.db").unlink()
    store.checkpoint()  # no error, and no empty file made in its place by the checkpoint
    assert not (tmp_path / "gone.db").exists()
