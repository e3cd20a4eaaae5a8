"""The log: ``upload_log`` and ``session_log`` with Peewee, named as in NexusLIMS.

SQLite by default, PostgreSQL by URL; :mod:`nxdrop.database` opens it and carries it
through its faults. Tables are created (and columns added to older ones) on first use.
Every read or write is one short statement in its own transaction; the statements of every
record are written out in SQL, the rest is built with Peewee.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, TypeVar

import peewee

from nxdrop.database import Database
from nxdrop.destinations.base import ExportResult, utcnow
from nxdrop.exceptions import DatabaseUnavailable
from nxdrop.records import Record


class RecordStatus(StrEnum):
    """``session_log.record_status``: NexusLIMS's values, plus ``EXPORTING`` while running."""

    EXPORTING = "EXPORTING"
    COMPLETED = "COMPLETED"
    BUILT_NOT_EXPORTED = "BUILT_NOT_EXPORTED"
    ERROR = "ERROR"


class AttemptState(StrEnum):
    """``upload_log.state``: where one destination's attempt stands."""

    IN_FLIGHT = "in_flight"  # written before the destination is called
    SUCCEEDED = "succeeded"  # a new record made
    UPDATED = "updated"  # the session's record replaced with new content
    REUSED = "reused"  # the same bytes were already there: the earlier record stands
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # in flight when its process died: it may have reached the server


SUCCESSFUL = (AttemptState.SUCCEEDED, AttemptState.UPDATED, AttemptState.REUSED)
_STANDING_STATES = [s.value for s in (*SUCCESSFUL, AttemptState.INTERRUPTED)]


class TimestampField(peewee.Field):
    """A UTC, time-zone aware timestamp: ``TIMESTAMPTZ`` in PostgreSQL, ISO text in SQLite."""

    field_type = "TIMESTAMPTZ"

    def db_value(self, value: datetime | None) -> Any:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return (
            value
            if isinstance(self.model._meta.database, peewee.PostgresqlDatabase)
            else (value.isoformat(timespec="microseconds"))
        )

    def python_value(self, value: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _models(db: peewee.Database) -> tuple[Any, Any, Any]:
    # Model classes per Store: two stores (two databases) never share a binding.
    class Base(peewee.Model):
        class Meta:
            database = db
            legacy_table_names = False

    class UploadLog(Base):
        session_identifier = peewee.CharField(index=True)
        destination_name = peewee.CharField(index=True)
        success = peewee.BooleanField(default=False)
        timestamp = TimestampField(default=utcnow, index=True)
        record_id = peewee.CharField(null=True)
        record_url = peewee.TextField(null=True)
        error_message = peewee.TextField(null=True)
        metadata_json = peewee.TextField(null=True)
        state = peewee.CharField(default=AttemptState.IN_FLIGHT)
        endpoint = peewee.TextField(null=True)
        file_name = peewee.CharField(null=True)
        file_sha256 = peewee.CharField(max_length=64, null=True, index=True)
        status_code = peewee.IntegerField(null=True)
        attempts = peewee.IntegerField(default=0)
        duration_seconds = peewee.FloatField(null=True)
        worker = peewee.CharField(null=True)

        class Meta:
            table_name = "upload_log"

    class SessionLog(Base):
        session_identifier = peewee.CharField(unique=True)
        instrument = peewee.CharField(null=True)
        user = peewee.CharField(null=True)
        record_status = peewee.CharField()
        timestamp = TimestampField(default=utcnow, index=True)
        file_name = peewee.CharField(null=True)
        file_sha256 = peewee.CharField(max_length=64, null=True)
        error_message = peewee.TextField(null=True)
        owner = peewee.CharField(null=True)  # the worker exporting it now: the session lock
        owner_since = TimestampField(null=True)

        class Meta:
            table_name = "session_log"

    class EndpointLog(Base):
        # An endpoint this database has logged from the start: it held none of the
        # destination's records when the census was taken.
        destination_name = peewee.CharField()
        endpoint = peewee.TextField()
        empty_at = TimestampField(default=utcnow)

        class Meta:
            table_name = "endpoint_log"
            primary_key = peewee.CompositeKey("destination_name", "endpoint")

    return UploadLog, SessionLog, EndpointLog


@dataclass(frozen=True)
class SessionRow:
    """One ``session_log`` row, as ``nxdrop status`` shows it."""

    session_identifier: str
    instrument: str | None
    user: str | None
    record_status: str
    timestamp: datetime
    file_name: str | None
    file_sha256: str | None
    error_message: str | None
    owner: str | None  # the worker exporting it now
    owner_since: datetime | None


@dataclass(frozen=True)
class UploadRow:
    """One ``upload_log`` row."""

    id: int
    session_identifier: str
    destination_name: str
    endpoint: str | None
    success: bool
    state: str
    timestamp: datetime
    record_id: str | None
    record_url: str | None
    error_message: str | None
    attempts: int
    status_code: int | None
    duration_seconds: float | None
    file_sha256: str | None
    metadata: dict[str, Any]

    def as_result(self) -> ExportResult:
        """The result this row records, as a destination made it."""
        return ExportResult(
            success=self.success,
            destination_name=self.destination_name,
            record_id=self.record_id,
            record_url=self.record_url,
            error_message=self.error_message,
            timestamp=self.timestamp,
            metadata=dict(self.metadata),
            status_code=self.status_code,
            attempts=self.attempts,
        )


@dataclass(frozen=True)
class Standing:
    """What the log says of one destination and one session at one endpoint."""

    latest_success: UploadRow | None = None  # the record it holds, if any
    interrupted: bool = False  # an attempt since then died mid-call: look before creating
    attempted: bool = False  # any attempt at all was logged, a failed one too


_Row = TypeVar("_Row", SessionRow, UploadRow)


class Store:
    """The database behind nxdrop, opened from ``NX_DB_URL`` when first used.

    Every method may raise :class:`~nxdrop.exceptions.DatabaseUnavailable` once the database
    has been down for longer than a statement's retry budget. An attempt whose outcome
    could not be written then is *in doubt*: once the database is back (:meth:`heal`) it is
    marked ``interrupted``, so the next attempt looks before it creates.
    """

    def __init__(self, url: str, *, clock: Callable[[], datetime] = utcnow) -> None:
        self.url = url
        self.clock = clock  # when rows happen: UTC, time-zone aware
        self.database = Database(url, self._prepare)
        self.db = self.database.db
        self.UploadLog, self.SessionLog, self.EndpointLog = _models(self.db)
        self._timestamp = self.UploadLog.timestamp
        self._in_doubt: set[int] = set()  # attempts whose outcome is not written
        self._held: set[tuple[str, str]] = set()  # session locks not released
        self._doubt_lock = threading.Lock()

    def _prepare(self, db: peewee.Database) -> None:
        db.create_tables([self.UploadLog, self.SessionLog, self.EndpointLog], safe=True)
        _add_missing_columns(db, [self.UploadLog, self.SessionLog])

    def open(self) -> None:
        """Connect and make the tables (``ConfigError`` or ``DatabaseUnavailable``)."""
        self.database.open()

    def probe(self) -> None:
        """Raise unless the database works again; then settle what was left in doubt."""
        self.database.open()
        self.heal()

    def checkpoint(self) -> None:
        """SQLite's write-ahead log into the database file, off the workers' commits (see
        :meth:`Database.checkpoint`); never raises."""
        self.database.checkpoint()

    def checkpoint_due(self) -> bool:
        """Whether :meth:`checkpoint` has anything to do."""
        return self.database.checkpoint_due()

    def close(self) -> None:
        """Close this thread's connection."""
        self.database.close()

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        """One statement, its own transaction (the hot path: no query building)."""
        return self.database.execute(sql, params)

    def _time(self, value: datetime) -> Any:
        return self._timestamp.db_value(value)

    # -- session_log, and the session lock ---------------------------------------------

    def lock_session(
        self, session_identifier: str, worker: str, file_name: str, *, mark: bool = True
    ) -> bool:
        """Take the session for ``worker`` unless another worker holds it; ``True`` if taken.

        The lock is ``session_log.owner``: one conditional upsert, atomic in SQLite and
        PostgreSQL alike, so files of one session are exported one after the other however
        many daemons share the database. Taking it marks the session ``EXPORTING``, unless
        not to ``mark`` it (a backfill: the session stays as it was).
        """
        now = self._time(self.clock())
        if not mark:
            params = (session_identifier, RecordStatus.COMPLETED.value, now, file_name, worker)
            return bool(self._execute(_HOLD, (*params, now)).rowcount)
        params = (session_identifier, RecordStatus.EXPORTING.value, now, file_name, worker)
        return bool(self._execute(_LOCK, (*params, now)).rowcount)

    def unlock_session(self, session_identifier: str, worker: str) -> None:
        """Release the session if ``worker`` holds it (once the database is back, if not now)."""
        try:
            self._execute(_UNLOCK, (session_identifier, worker))
        except DatabaseUnavailable:
            with self._doubt_lock:
                self._held.add((session_identifier, worker))
            raise

    def set_session(
        self,
        session_identifier: str,
        status: RecordStatus,
        *,
        record: Record | None = None,
        file_name: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Insert or update the one row of a session (its lock stays as it is)."""
        now = self._time(self.clock())
        if record is None:
            params: tuple[Any, ...] = (session_identifier, status.value, now, file_name)
            self._execute(_SET_STATUS, (*params, error_message))
            return
        params = (session_identifier, status.value, now, record.name, record.instrument_pid)
        self._execute(_SET_RECORD, (*params, record.user, record.sha256, error_message))

    def session(self, session_identifier: str) -> SessionRow | None:
        """One session's row, or ``None``."""
        SessionLog = self.SessionLog
        row = self.database.run(
            lambda: SessionLog.get_or_none(SessionLog.session_identifier == session_identifier)
        )
        return _session_row(row) if row is not None else None

    def recent_sessions(
        self,
        limit: int = 20,
        *,
        statuses: Collection[str] = (),
        since: datetime | None = None,
        instrument: str | None = None,
    ) -> list[SessionRow]:
        """The latest sessions, newest first; only these ``statuses``, since ``since``, of
        ``instrument``, when given."""
        SessionLog = self.SessionLog
        query = SessionLog.select()
        if statuses:
            query = query.where(SessionLog.record_status.in_(list(statuses)))
        if since is not None:
            query = query.where(SessionLog.timestamp >= since)
        if instrument is not None:
            query = query.where(SessionLog.instrument == instrument)
        query = query.order_by(SessionLog.timestamp.desc()).limit(limit)
        return [_session_row(r) for r in self.database.run(lambda: list(query))]

    # -- upload_log --------------------------------------------------------------------

    def begin_attempt(
        self, record: Record, destination_name: str, endpoint: str, worker: str
    ) -> int:
        """Write the in-flight row before a destination is called; its id.

        The row's own timestamp identifies it, so an insert whose answer was lost with the
        connection is found, not made twice.
        """
        now = self._time(self.clock())
        key = (record.session_identifier, destination_name, worker, now)
        params = (
            record.session_identifier,
            destination_name,
            endpoint,
            False,
            AttemptState.IN_FLIGHT.value,
            now,
            record.name,
            record.sha256,
            0,
            worker,
        )
        database = self.database
        sql = _BEGIN.replace("?", database.param)

        def insert() -> int:
            if database.is_postgres:
                return int(database.db.execute_sql(sql + " RETURNING id", params).fetchone()[0])
            return int(database.db.execute_sql(sql, params).lastrowid)

        def inserted() -> int | None:
            found = database.db.execute_sql(_FIND_ATTEMPT.replace("?", database.param), key)
            row = found.fetchone()
            return int(row[0]) if row else None

        return database.run(insert, recheck=inserted)

    def note_retry(self, attempt_id: int, attempts: int, error: str) -> None:
        """The attempt under way has made ``attempts`` calls, the last failing with
        ``error`` (scrubbed): ``status`` shows it while the retries go on."""
        self._execute(_NOTE_RETRY, (attempts, error, attempt_id))

    def finish_attempt(
        self, attempt_id: int, result: ExportResult, state: AttemptState, duration: float
    ) -> None:
        """Record a destination's result on its in-flight row."""
        metadata = json.dumps(result.metadata, default=str, sort_keys=True)
        try:
            self._finish(attempt_id, result, state, duration, metadata)
        except DatabaseUnavailable:
            with self._doubt_lock:
                self._in_doubt.add(attempt_id)
            raise

    def _finish(
        self,
        attempt_id: int,
        result: ExportResult,
        state: AttemptState,
        duration: float,
        metadata: str,
    ) -> None:
        self._execute(
            _FINISH,
            (
                result.success,
                state.value,
                self._time(self.clock()),
                result.record_id,
                result.record_url,
                result.error_message,
                metadata,
                result.status_code,
                result.attempts,
                round(duration, 6),
                attempt_id,
            ),
        )

    def standings(self, session_identifier: str) -> dict[tuple[str, str], Standing]:
        """Per (destination, endpoint): the record it holds for this session, if any, and
        whether an attempt was interrupted since. One query for every destination."""
        if self._in_doubt or self._held:
            self.heal()
        rows = self._execute(_STANDINGS, (session_identifier,)).fetchall()
        standings: dict[tuple[str, str], Standing] = {}
        for row in rows:
            key = (row[2], row[3] or "")
            if row[5] not in _STANDING_STATES:  # failed, in flight: attempted, nothing held
                standings.setdefault(key, Standing(attempted=True))
                continue
            if row[5] == AttemptState.INTERRUPTED:
                standings[key] = replace(
                    standings.get(key, Standing()), interrupted=True, attempted=True
                )
                continue
            held = UploadRow(
                id=row[0],
                session_identifier=row[1],
                destination_name=row[2],
                endpoint=row[3],
                success=bool(row[4]),
                state=row[5],
                timestamp=self._timestamp.python_value(row[6]),
                record_id=row[7],
                record_url=row[8],
                error_message=row[9],
                attempts=row[10],
                status_code=row[11],
                duration_seconds=row[12],
                file_sha256=row[13],
                metadata=json.loads(row[14]) if row[14] else {},
            )
            standings[key] = Standing(latest_success=held, attempted=True)
        return standings

    # -- endpoint_log: where the log vouches for what is not there ------------------------

    def logged_from_start(self, destination_name: str, endpoint: str) -> bool:
        """Whether this database has logged every record made at the endpoint: it held
        none of the destination's records when the census was taken (:meth:`note_empty`)."""
        return bool(self._execute(_LOGGED_FROM_START, (destination_name, endpoint)).fetchall())

    def note_empty(self, destination_name: str, endpoint: str) -> None:
        """The endpoint holds none of the destination's records now: from now on, the log
        knows every one made there."""
        self.EndpointLog.insert(
            destination_name=destination_name, endpoint=endpoint, empty_at=self.clock()
        ).on_conflict_ignore().execute()

    def recover(self, workers: list[str]) -> int:
        """After the processes behind ``workers`` died: their in-flight attempts become
        ``interrupted`` and their session locks are released. The attempts marked."""
        marked = 0
        for worker in workers:
            marked += self._execute(_INTERRUPT_WORKER, (worker,)).rowcount
            self._execute(_RELEASE_WORKER, (worker,))
        return marked

    def heal(self) -> None:
        """Write down what the database missed while it was down: the attempts in doubt
        become ``interrupted``, the session locks left held are released."""
        with self._doubt_lock:
            in_doubt, held = sorted(self._in_doubt), sorted(self._held)
        for attempt_id in in_doubt:
            self._execute(_INTERRUPT_ATTEMPT, (attempt_id,))
        for session, worker in held:
            self._execute(_UNLOCK, (session, worker))
        with self._doubt_lock:
            self._in_doubt.difference_update(in_doubt)
            self._held.difference_update(held)

    def uploads(self, session_identifier: str) -> list[UploadRow]:
        """A session's upload log, oldest first."""
        UploadLog = self.UploadLog
        query = (
            UploadLog.select()
            .where(UploadLog.session_identifier == session_identifier)
            .order_by(UploadLog.id)
        )
        return [_upload_row(r) for r in self.database.run(lambda: list(query))]


# The statements of every record, written out: building them with Peewee's query builder
# cost more than running them. Written with ``?``; :meth:`Store._execute` swaps in the
# driver's placeholder. Both SQLite (3.24+) and PostgreSQL take ON CONFLICT … WHERE.
_LOCK = """
INSERT INTO session_log (session_identifier, record_status, "timestamp", file_name, owner,
  owner_since)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (session_identifier) DO UPDATE SET record_status = excluded.record_status,
  "timestamp" = excluded."timestamp", file_name = excluded.file_name, error_message = NULL,
  owner = excluded.owner, owner_since = excluded.owner_since
WHERE session_log.owner IS NULL OR session_log.owner = excluded.owner"""
_HOLD = """
INSERT INTO session_log (session_identifier, record_status, "timestamp", file_name, owner,
  owner_since)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (session_identifier) DO UPDATE SET owner = excluded.owner,
  owner_since = excluded.owner_since
WHERE session_log.owner IS NULL OR session_log.owner = excluded.owner"""
_UNLOCK = """
UPDATE session_log SET owner = NULL, owner_since = NULL
WHERE session_identifier = ? AND owner = ?"""
_SET_STATUS = """
INSERT INTO session_log (session_identifier, record_status, "timestamp", file_name,
  error_message)
VALUES (?, ?, ?, ?, ?)
ON CONFLICT (session_identifier) DO UPDATE SET record_status = excluded.record_status,
  "timestamp" = excluded."timestamp", file_name = excluded.file_name,
  error_message = excluded.error_message"""
_SET_RECORD = """
INSERT INTO session_log (session_identifier, record_status, "timestamp", file_name,
  instrument, "user", file_sha256, error_message)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (session_identifier) DO UPDATE SET record_status = excluded.record_status,
  "timestamp" = excluded."timestamp", file_name = excluded.file_name,
  instrument = excluded.instrument, "user" = excluded."user",
  file_sha256 = excluded.file_sha256, error_message = excluded.error_message"""
_BEGIN = """
INSERT INTO upload_log (session_identifier, destination_name, endpoint, success, state,
  "timestamp", file_name, file_sha256, attempts, worker)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"""
_FIND_ATTEMPT = """
SELECT id FROM upload_log
WHERE session_identifier = ? AND destination_name = ? AND worker = ? AND "timestamp" = ?"""
_INTERRUPT_ATTEMPT = f"""
UPDATE upload_log SET state = '{AttemptState.INTERRUPTED.value}'
WHERE id = ? AND state = '{AttemptState.IN_FLIGHT.value}'"""
_INTERRUPT_WORKER = f"""
UPDATE upload_log SET state = '{AttemptState.INTERRUPTED.value}'
WHERE worker = ? AND state = '{AttemptState.IN_FLIGHT.value}'"""
_RELEASE_WORKER = """
UPDATE session_log SET owner = NULL, owner_since = NULL WHERE owner = ?"""
_NOTE_RETRY = f"""
UPDATE upload_log SET attempts = ?, error_message = ?
WHERE id = ? AND state = '{AttemptState.IN_FLIGHT.value}'"""
_FINISH = """
UPDATE upload_log SET success = ?, state = ?, "timestamp" = ?, record_id = ?, record_url = ?,
  error_message = ?, metadata_json = ?, status_code = ?, attempts = ?, duration_seconds = ?
WHERE id = ?"""
_STANDINGS = """
SELECT id, session_identifier, destination_name, endpoint, success, state, "timestamp",
  record_id, record_url, error_message, attempts, status_code, duration_seconds,
  file_sha256, metadata_json
FROM upload_log
WHERE session_identifier = ?
ORDER BY id"""

_LOGGED_FROM_START = """
SELECT 1 FROM endpoint_log WHERE destination_name = ? AND endpoint = ?"""


def _add_missing_columns(db: peewee.Database, models: list[Any]) -> None:
    """Columns added since a table was created (all nullable or with defaults)."""
    for model in models:
        table = model._meta.table_name
        present = {c.name for c in db.get_columns(table)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
        if missing:
            from playhouse.migrate import SchemaMigrator, migrate  # rarely needed, and slow

            migrator = SchemaMigrator.from_database(db)
            migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))


def _session_row(row: Any) -> SessionRow:
    return _copy(SessionRow, row)


def _upload_row(row: Any) -> UploadRow:
    metadata = json.loads(row.metadata_json) if row.metadata_json else {}
    return _copy(UploadRow, row, success=bool(row.success), metadata=metadata)


def _copy(cls: type[_Row], row: Any, **computed: Any) -> _Row:
    """A dataclass of the model row's same-named columns, with ``computed`` ones given."""
    columns = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in computed}
    return cls(**columns, **computed)
