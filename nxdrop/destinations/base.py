"""The destination interface, NexusLIMS's: a NexusLIMS destination ports by changing imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from nxdrop.records import Record
    from nxdrop.settings import Settings


def utcnow() -> datetime:
    """Now, in UTC, time-zone aware: the one clock for results and the database."""
    return datetime.now(UTC)


@dataclass
class ExportResult:
    """What one destination did with one record.

    ``status_code`` and ``attempts`` are nxdrop's additions for the operator's error file;
    a NexusLIMS destination that does not set them keeps working.
    """

    success: bool
    destination_name: str
    record_id: str | None = None
    record_url: str | None = None
    error_message: str | None = None
    timestamp: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)
    status_code: int | None = None
    attempts: int = 1


@dataclass
class ExportContext:
    """Everything a destination gets to know about the record it exports.

    ``previous_results`` holds the results of the destinations that ran before this one,
    by name, so a destination can link to them (``get_result("cdcs")``).
    """

    xml_file_path: Path
    session_identifier: str
    instrument_pid: str | None
    user: str | None
    dt_from: datetime | None
    dt_to: datetime | None
    previous_results: dict[str, ExportResult] = field(default_factory=dict)
    record: Record | None = None
    attempt: int = 1

    @classmethod
    def for_record(cls, record: Record) -> ExportContext:
        """A context for ``record``, with no results yet."""
        return cls(
            xml_file_path=record.path,
            session_identifier=record.session_identifier,
            instrument_pid=record.instrument_pid,
            user=record.user,
            dt_from=record.dt_from,
            dt_to=record.dt_to,
            record=record,
        )

    def get_result(self, destination_name: str) -> ExportResult | None:
        """The result of an earlier destination, or ``None`` if it did not run."""
        return self.previous_results.get(destination_name)

    def successful_result(self, destination_name: str) -> ExportResult | None:
        """The earlier destination's result if it succeeded: what a cross-link needs."""
        result = self.get_result(destination_name)
        return result if result is not None and result.success else None

    @property
    def content(self) -> bytes:
        """The record's exact bytes (read once; from the file for hand-made contexts)."""
        if self.record is not None:
            return self.record.content
        return self.xml_file_path.read_bytes()


@runtime_checkable
class ExportDestination(Protocol):
    """A destination: a class created with no arguments.

    Optionally it may define ``configure(settings)``, called once after creation with
    nxdrop's settings (the built-ins take their configuration that way; a plugin may read
    its own ``NX_*`` variables instead).
    """

    name: str
    priority: int

    @property
    def enabled(self) -> bool:
        """Whether it is configured to run."""
        ...

    def validate_config(self) -> tuple[bool, str | None]:
        """Check the configuration (and reach the service); ``(ok, reason if not)``."""
        ...

    def export(self, context: ExportContext) -> ExportResult:
        """Publish the record; raise or return a failed result on failure."""
        ...


class Configurable(Protocol):
    """The optional hook through which a destination receives nxdrop's settings."""

    def configure(self, settings: Settings) -> None: ...
