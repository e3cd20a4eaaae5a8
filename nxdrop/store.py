"""The log: ``upload_log`` and ``session_log`` with Peewee, named as in NexusLIMS.

SQLite by default (WAL, a busy timeout, one connection per thread); PostgreSQL by URL.
Tables are created on first use. Each thread keeps its own connection (Peewee's
default), and every read or write is one short transaction, so worker threads can write
at the same time.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import peewee
from playhouse.db_url import connect

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
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REUSED = "reused"  # an earlier success for the same bytes stood in


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
    success: bool
    state: str
    timestamp: datetime
    record_id: str | None
    record_url: str | None
    error_message: str | None
    attempts: int
    status_code: int | None
    duration_seconds: float | None
    metadata: dict[str, Any]


_Row = TypeVar("_Row", SessionRow, UploadRow)


class Store:
    """The database behind nxdrop, opened from ``NX_DB_URL``."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.db = _connect(url)
        self.UploadLog, self.SessionLog = _models(self.db)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        try:
            with self.db.atomic():
                self.db.create_tables([self.UploadLog, self.SessionLog], safe=True)
        except peewee.PeeweeException as exc:
            raise ConfigError(f"NX_DB_URL: cannot open the database: {exc}") from exc

    def close(self) -> None:
        """Close this thread's connection."""
        if not self.db.is_closed():
            self.db.close()

    # -- session_log -------------------------------------------------------------------

    def set_session(
        self,
        session_identifier: str,
        status: RecordStatus,
        *,
        record: Record | None = None,
        file_name: str | None = None,
        error_message: str | None = None,
    ) -> None:
        """Insert or update the one row of a session."""
        row: dict[str, Any] = {
            "session_identifier": session_identifier,
            "record_status": status.value,
            "timestamp": utcnow(),
            "error_message": error_message,
            "file_name": file_name,
        }
        if record is not None:
            row |= {
                "instrument": record.instrument_pid,
                "user": record.user,
                "file_name": record.name,
                "file_sha256": record.sha256,
            }
        SessionLog = self.SessionLog
        update = {getattr(SessionLog, k): v for k, v in row.items() if k != "session_identifier"}
        with self.db.atomic():
            SessionLog.insert(**row).on_conflict(
                conflict_target=[SessionLog.session_identifier], update=update
            ).execute()

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

    def begin_attempt(self, record: Record, destination_name: str) -> int:
        """Write the in-flight row before a destination is called; its id."""
        with self.db.atomic():
            row = self.UploadLog.create(
                session_identifier=record.session_identifier,
                destination_name=destination_name,
                success=False,
                state=AttemptState.IN_FLIGHT.value,
                file_name=record.name,
                file_sha256=record.sha256,
                worker=self.worker,
            )
        return int(row.id)

    def finish_attempt(self, attempt_id: int, result: ExportResult, duration: float) -> None:
        """Record a destination's result on its in-flight row."""
        reused = bool(result.metadata.get("reused_from"))
        state = (
            AttemptState.REUSED
            if reused
            else AttemptState.SUCCEEDED
            if result.success
            else AttemptState.FAILED
        )
        UploadLog = self.UploadLog
        with self.db.atomic():
            UploadLog.update(
                success=result.success,
                state=state.value,
                timestamp=result.timestamp,
                record_id=result.record_id,
                record_url=result.record_url,
                error_message=result.error_message,
                metadata_json=json.dumps(result.metadata, default=str, sort_keys=True),
                status_code=result.status_code,
                attempts=result.attempts,
                duration_seconds=round(duration, 6),
            ).where(UploadLog.id == attempt_id).execute()

    def earlier_success(self, destination_name: str, sha256: str) -> UploadRow | None:
        """The latest success of ``destination_name`` with these exact bytes, if any."""
        UploadLog = self.UploadLog
        with self.db.atomic():
            row = (
                UploadLog.select()
                .where(
                    (UploadLog.destination_name == destination_name)
                    & (UploadLog.file_sha256 == sha256)
                    & (UploadLog.success == True)  # noqa: E712 - SQL, not Python
                )
                .order_by(UploadLog.id.desc())
                .first()
            )
        return _upload_row(row) if row is not None else None

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


def _connect(url: str) -> Any:
    if url.startswith("sqlite:"):
        path = url.split("://", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        pragmas = {
            "journal_mode": "wal",
            "busy_timeout": 30_000,
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
