"""The log: ``upload_log`` and ``session_log`` with Peewee, named as in NexusLIMS.

SQLite by default (WAL, a busy timeout, one connection per thread); PostgreSQL by URL.
Tables are created on first use. Each thread keeps its own connection (Peewee's
default), and every read or write is one short transaction, so worker threads can write
at the same time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import peewee
from playhouse.db_url import connect
from playhouse.migrate import SchemaMigrator, migrate

from nxdrop.destinations.base import ExportResult, utcnow
from nxdrop.exceptions import ConfigError
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


def _models(db: peewee.Database) -> tuple[Any, Any]:
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

    return UploadLog, SessionLog


@dataclass(frozen=True)
class SessionRow:
    """One ``session_log`` row, as ``nxdrop status`` shows it."""

    session_identifier: str
    instrument: str | None
    user: str | None
    record_status: str
    timestamp: datetime
    file_name: str | None
    error_message: str | None


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


_Row = TypeVar("_Row", SessionRow, UploadRow)


class Store:
    """The database behind nxdrop, opened from ``NX_DB_URL``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = _connect(url)
        self.UploadLog, self.SessionLog = _models(self.db)
        self._timestamp = self.UploadLog.timestamp
        self._returning = isinstance(self.db, peewee.PostgresqlDatabase)
        try:
            with self.db.atomic():
                self.db.create_tables([self.UploadLog, self.SessionLog], safe=True)
                _add_missing_columns(self.db, [self.UploadLog, self.SessionLog])
        except peewee.PeeweeException as exc:
            raise ConfigError(f"NX_DB_URL: cannot open the database: {exc}") from exc

    def close(self) -> None:
        """Close this thread's connection."""
        if not self.db.is_closed():
            self.db.close()

    # -- session_log, and the session lock ---------------------------------------------

    def lock_session(self, session_identifier: str, worker: str, file_name: str) -> bool:
        """Take the session for ``worker`` unless another worker holds it; ``True`` if taken.

        The lock is ``session_log.owner``: one conditional upsert, atomic in SQLite and
        PostgreSQL alike, so files of one session are exported one after the other however
        many daemons share the database. Taking it marks the session ``EXPORTING``.
        """
        now = self._time(utcnow())
        cursor = self._execute(
            _LOCK, (session_identifier, RecordStatus.EXPORTING.value, now, file_name, worker, now)
        )
        return bool(cursor.rowcount)

    def unlock_session(self, session_identifier: str, worker: str) -> None:
        """Release the session if ``worker`` holds it."""
        self._execute(_UNLOCK, (session_identifier, worker))

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
        now = self._time(utcnow())
        if record is None:
            params: tuple[Any, ...] = (session_identifier, status.value, now, file_name)
            self._execute(_SET_STATUS, (*params, error_message))
            return
        params = (session_identifier, status.value, now, record.name, record.instrument_pid)
        self._execute(_SET_RECORD, (*params, record.user, record.sha256, error_message))

    def session(self, session_identifier: str) -> SessionRow | None:
        """One session's row, or ``None``."""
        with self.db.atomic():
            row = self.SessionLog.get_or_none(
                self.SessionLog.session_identifier == session_identifier
            )
        return _session_row(row) if row is not None else None

    def recent_sessions(self, limit: int = 20) -> list[SessionRow]:
        """The latest sessions, newest first."""
        SessionLog = self.SessionLog
        with self.db.atomic():
            rows = list(SessionLog.select().order_by(SessionLog.timestamp.desc()).limit(limit))
        return [_session_row(r) for r in rows]

    # -- upload_log --------------------------------------------------------------------

    def begin_attempt(
        self, record: Record, destination_name: str, endpoint: str, worker: str
    ) -> int:
        """Write the in-flight row before a destination is called; its id."""
        params = (
            record.session_identifier,
            destination_name,
            endpoint,
            False,
            AttemptState.IN_FLIGHT.value,
            self._time(utcnow()),
            record.name,
            record.sha256,
            0,
            worker,
        )
        if self._returning:
            row = self._execute(_BEGIN + " RETURNING id", params).fetchone()
            return int(row[0])
        return int(self._execute(_BEGIN, params).lastrowid)

    def finish_attempt(
        self, attempt_id: int, result: ExportResult, state: AttemptState, duration: float
    ) -> None:
        """Record a destination's result on its in-flight row."""
        metadata = json.dumps(result.metadata, default=str, sort_keys=True)
        self._execute(
            _FINISH,
            (
                result.success,
                state.value,
                self._time(utcnow()),
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
        rows = self._execute(_STANDINGS, (session_identifier,)).fetchall()
        standings: dict[tuple[str, str], Standing] = {}
        for row in rows:
            key = (row[2], row[3] or "")
            if row[5] == AttemptState.INTERRUPTED:
                standings[key] = replace(standings.get(key, Standing()), interrupted=True)
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
            standings[key] = Standing(latest_success=held)
        return standings

    def _execute(self, sql: str, params: tuple[Any, ...]) -> Any:
        """One statement, its own transaction (the hot path: no query building)."""
        return self.db.execute_sql(sql.replace("?", self.db.param), params)

    def _time(self, value: datetime) -> Any:
        return self._timestamp.db_value(value)

    def recover(self, workers: list[str]) -> int:
        """After the processes behind ``workers`` died: their in-flight attempts become
        ``interrupted`` and their session locks are released. The attempts marked."""
        if not workers:
            return 0
        UploadLog, SessionLog = self.UploadLog, self.SessionLog
        with self.db.atomic():
            marked = (
                UploadLog.update(state=AttemptState.INTERRUPTED.value)
                .where(
                    (UploadLog.state == AttemptState.IN_FLIGHT.value)
                    & UploadLog.worker.in_(workers)
                )
                .execute()
            )
            SessionLog.update(owner=None, owner_since=None).where(
                SessionLog.owner.in_(workers)
            ).execute()
        return int(marked)

    def uploads(self, session_identifier: str) -> list[UploadRow]:
        """A session's upload log, oldest first."""
        UploadLog = self.UploadLog
        with self.db.atomic():
            rows = list(
                UploadLog.select()
                .where(UploadLog.session_identifier == session_identifier)
                .order_by(UploadLog.id)
            )
        return [_upload_row(r) for r in rows]


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
_FINISH = """
UPDATE upload_log SET success = ?, state = ?, "timestamp" = ?, record_id = ?, record_url = ?,
  error_message = ?, metadata_json = ?, status_code = ?, attempts = ?, duration_seconds = ?
WHERE id = ?"""
_STANDINGS = f"""
SELECT id, session_identifier, destination_name, endpoint, success, state, "timestamp",
  record_id, record_url, error_message, attempts, status_code, duration_seconds,
  file_sha256, metadata_json
FROM upload_log
WHERE session_identifier = ? AND state IN ({", ".join(f"'{s}'" for s in _STANDING_STATES)})
ORDER BY id"""


def _add_missing_columns(db: peewee.Database, models: list[Any]) -> None:
    """Columns added since a table was created (all nullable or with defaults)."""
    migrator = SchemaMigrator.from_database(db)
    for model in models:
        table = model._meta.table_name
        present = {c.name for c in db.get_columns(table)}
        missing = [f for f in model._meta.sorted_fields if f.column_name not in present]
        if missing:
            migrate(*(migrator.add_column(table, f.column_name, f) for f in missing))


def _connect(url: str) -> Any:
    if url.startswith("sqlite:"):
        path = url.split("://", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pragmas = {
            "journal_mode": "wal",
            "busy_timeout": 30_000,
            "cache_size": -1024,  # KiB per connection (one per worker): memory stays flat
            "synchronous": "normal",
            "foreign_keys": 1,
        }
        try:
            return connect(url, pragmas=pragmas, timeout=30, field_types={"TIMESTAMPTZ": "TEXT"})
        except Exception as exc:
            raise ConfigError(f"NX_DB_URL={url}: {exc}") from exc
    try:
        return connect(url)
    except Exception as exc:
        # Only the scheme: a PostgreSQL URL may carry a password.
        scheme = url.split(":", 1)[0]
        raise ConfigError(f"NX_DB_URL ({scheme}://…): {exc}") from exc


def _session_row(row: Any) -> SessionRow:
    return _copy(SessionRow, row)


def _upload_row(row: Any) -> UploadRow:
    metadata = json.loads(row.metadata_json) if row.metadata_json else {}
    return _copy(UploadRow, row, success=bool(row.success), metadata=metadata)


def _copy(cls: type[_Row], row: Any, **computed: Any) -> _Row:
    """A dataclass of the model row's same-named columns, with ``computed`` ones given."""
    columns = {f.name: getattr(row, f.name) for f in fields(cls) if f.name not in computed}
    return cls(**columns, **computed)
