"""The log in SQLite and PostgreSQL: the contract's SQL, time zones, threads."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC
from pathlib import Path

import pytest

from nxdrop.destinations import ExportResult
from nxdrop.records import Record, RecordReader
from nxdrop.store import RecordStatus, Store

POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"


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
    try:
        import psycopg2

        psycopg2.connect(POSTGRES_URL).close()
    except Exception as exc:  # the CI machine has it; a laptop may not
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is not reachable: {exc}")
    yield Store(POSTGRES_URL)


def _log(store: Store, record: Record, name: str, ok: bool) -> None:
    attempt = store.begin_attempt(record, name)
    result = ExportResult(
        ok,
        name,
        record_id="7" if ok else None,
        error_message=None if ok else "HTTP 500",
        metadata={"k": 1},
    )
    store.finish_attempt(attempt, result, 0.25)


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


def test_earlier_success_is_found_by_bytes(store: Store, record: Record) -> None:
    _log(store, record, "cdcs", False)
    assert store.earlier_success("cdcs", record.sha256) is None
    _log(store, record, "cdcs", True)
    found = store.earlier_success("cdcs", record.sha256)
    assert found is not None and found.record_id == "7" and found.metadata == {"k": 1}
    assert store.earlier_success("elabftw", record.sha256) is None


def test_in_flight_attempt_is_visible(store: Store, record: Record) -> None:
    store.begin_attempt(record, "cdcs")
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
    Store(f"sqlite:///{tmp_path / 'sub' / 'nxdrop.db'}")
    with sqlite3.connect(tmp_path / "sub" / "nxdrop.db") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
