"""The destination interface: NexusLIMS's, plus optional hooks declared here with defaults.

A NexusLIMS destination ports by changing its imports: it needs only ``name``,
``priority``, ``enabled``, ``validate_config()`` and ``export(context)``, and does not
have to subclass anything (:class:`PortedDestination` wraps it). A destination that
subclasses :class:`ExportDestination` may also override the optional hooks —
``reads``, ``configure``, ``endpoint``, ``disabled_reason``, ``update`` and ``reconcile`` — whose
defaults are declared here, the way pluggy declares hookspecs: nxdrop calls them on every
destination and never looks for them with ``getattr``.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from nxdrop.activities import AcquisitionActivity
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


_UNREAD: Any = object()  # ExportContext.activities not made yet: from the record when read


class _ActivitiesFromRecord:
    """``ExportContext.activities``: a list of its own, made from the record's activities
    the first time it is read. Reading them parses the record again, and most destinations
    (all the built-in ones) never do; a context made with ``activities=`` keeps that list."""

    def __get__(self, context: ExportContext | None, owner: object = None) -> Any:
        if context is None:
            return _UNREAD  # the field's default, for the dataclass
        value = context.__dict__["_activities"]
        if value is _UNREAD:
            record = context.record
            value = context.__dict__["_activities"] = (
                list(record.activities) if record is not None else []
            )
        return value

    def __set__(self, context: ExportContext, value: list[AcquisitionActivity]) -> None:
        context.__dict__["_activities"] = value


@dataclass
class ExportContext:
    """Everything a destination gets to know about the record it exports.

    NexusLIMS 2.x's fields, in its order, so that a context is made the way NexusLIMS makes
    one (``ExportContext(xml_file_path, session_identifier, instrument_pid, dt_from, dt_to,
    user, metadata, previous_results, activities, reservation_event)``):

    ``xml_file_path``
        The record's file (in the working folder, under its own name).
    ``session_identifier``, ``instrument_pid``, ``dt_from``, ``dt_to``, ``user``
        The session, from the file's name and the record's ``summary``.
    ``metadata``
        More of what the record's head says, where it says it: ``title``, ``id``,
        ``instrument_name``, ``motivation``, ``reservation_url``
        (:data:`nxdrop.records.METADATA_KEYS`). NexusLIMS leaves it empty.
    ``previous_results``
        The results of the destinations this one waited for (its ``reads``; without them,
        every destination before it), by name, so that a destination can link to them
        (``get_result("cdcs")``).
    ``activities``
        The record's acquisition activities (:class:`~nxdrop.activities.AcquisitionActivity`,
        with NexusLIMS's attribute names), read from its ``<acquisitionActivity>`` elements.
    ``reservation_event``
        Always ``None``: NexusLIMS fills it from the calendar, which a drop folder cannot
        reach (the record's ``summary`` holds what the calendar said).

    nxdrop's own, after them: ``record`` (what the reader made of the file: ``content``
    and ``sha256`` come from it), ``attempt`` (1 for the first call, 2 for the first retry,
    …) and ``interrupted``: true when an earlier attempt at this destination, for this
    session, was cut off after it may have reached the server (nxdrop was killed mid-call),
    so look for what that attempt may have made before creating anything. ``unseen``: true
    when nxdrop's log vouches that the destination holds no record of this session — no
    attempt at its endpoint was ever logged for the session, and the endpoint held none of
    the destination's records when this database began logging there
    (:meth:`ExportDestination.holds_no_records`), or the destination said just now that it
    holds no record of the session (:meth:`ExportDestination.holds_records_of`) — so a
    lookup before creating can be skipped. Only ever true for the first call of an attempt:
    a retried call may follow one that reached the server.
    """

    xml_file_path: Path
    session_identifier: str
    instrument_pid: str | None
    dt_from: datetime | None
    dt_to: datetime | None
    user: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    previous_results: dict[str, ExportResult] = field(default_factory=dict)
    activities: list[AcquisitionActivity] = _ActivitiesFromRecord()  # type: ignore[assignment]
    reservation_event: Any = None
    record: Record | None = None
    attempt: int = 1
    interrupted: bool = False
    unseen: bool = False

    def __post_init__(self) -> None:
        # nxdrop's order before NexusLIMS's was (…, instrument_pid, user, dt_from, dt_to):
        # a context made that way would put a user name among the dates, or a date in
        # ``user``. Say so at once, rather than let a destination publish it.
        for name, kind in (("dt_from", datetime), ("dt_to", datetime), ("user", str)):
            value = getattr(self, name)
            if value is not None and not isinstance(value, kind):
                raise TypeError(
                    f"ExportContext {name} must be a {kind.__name__} or None, not "
                    f"{type(value).__name__} {value!r}; the order is NexusLIMS's: "
                    "(xml_file_path, session_identifier, instrument_pid, dt_from, dt_to, user, …)"
                )

    @classmethod
    def for_record(cls, record: Record) -> ExportContext:
        """A context for ``record``, with no results yet."""
        return cls(
            record.path,
            record.session_identifier,
            record.instrument_pid,
            record.dt_from,
            record.dt_to,
            record.user,
            metadata=dict(record.metadata),
            record=record,
        )

    def evolve(self, **changes: Any) -> ExportContext:
        """A copy with ``changes``, as ``dataclasses.replace`` makes, except that activities
        not read yet stay unread (``replace`` reads every field)."""
        changed = copy.copy(self)
        for name, value in changes.items():
            setattr(changed, name, value)
        changed.__post_init__()
        return changed

    def get_result(self, destination_name: str) -> ExportResult | None:
        """The result of an earlier destination, or ``None`` if it did not run."""
        return self.previous_results.get(destination_name)

    def add_result(self, destination_name: str, result: ExportResult) -> None:
        """Add or replace a destination's result in :attr:`previous_results` (NexusLIMS 2.x).

        nxdrop gives each destination the results before it itself; this is for code that
        runs destinations by hand, as NexusLIMS's tests do.
        """
        self.previous_results[destination_name] = result

    def has_successful_export(self, destination_name: str) -> bool:
        """Whether an earlier destination ran and succeeded (NexusLIMS 2.x)."""
        return self.successful_result(destination_name) is not None

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

    @property
    def sha256(self) -> str:
        """The SHA-256 of :attr:`content`, hex: the record's identity at a destination."""
        if self.record is not None:
            return self.record.sha256
        return hashlib.sha256(self.content).hexdigest()


class ExportDestination:
    """Base class of nxdrop's destinations; every optional hook has its default here.

    Required, as in NexusLIMS: ``name``, ``priority``, ``enabled``, ``validate_config``
    and ``export``. Optional, with the defaults below: ``reads`` (the destinations whose
    results it needs), ``configure`` (receive nxdrop's settings once), ``disabled_reason``,
    ``endpoint`` (where records go: earlier results are reused only at the same endpoint),
    ``update`` (new content for a session this destination already holds) and
    ``reconcile`` (the same content again).
    """

    name: str = ""
    priority: int = 0
    reads: frozenset[str] | None = None
    """The names of the destinations whose results this one reads (``context.get_result``).

    It starts once those of them that come before it — higher priority; between equal
    priorities, the order ``nxdrop destinations`` lists, by name — are done, and sees
    exactly their results; destinations that do not depend on each other run side by side
    (under ``all`` and ``best_effort``; ``first_success`` runs them one by one). ``None``,
    the default, waits for every destination before it and sees all their results, as in
    NexusLIMS; ``frozenset()`` waits for none. A name that is not enabled is absent (the
    destination runs without it); reading one of lower priority, which runs later, is
    meaningless: it is ignored, with a warning at start.
    """

    def configure(self, settings: Settings) -> None:
        """Called once after creation with nxdrop's settings; the default ignores them."""

    @property
    def enabled(self) -> bool:
        """Whether it is configured to run."""
        return True

    @property
    def disabled_reason(self) -> str | None:
        """Why it is off, for ``nxdrop destinations``; ``None`` says "not configured"."""
        return None

    @property
    def endpoint(self) -> str:
        """Where this destination puts records: a server's URL, a folder.

        An earlier result is reused (or updated) only when it was made at the same
        endpoint, so a record id from one server is never taken for one on another.
        """
        return ""

    def validate_config(self) -> tuple[bool, str | None]:
        """Check the configuration (and reach the service); ``(ok, reason if not)``."""
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Publish the record; raise or return a failed result on failure."""
        raise NotImplementedError(f"destination {self.name!r} does not implement export()")

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """Replace the record ``previous`` with the new content of the same session.

        The default exports anew: a destination that cannot edit what it published
        (a webhook, a mail) announces the new version instead.
        """
        return self.export(context)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same record again (a retry, a re-drop): ``earlier`` is what it made then.

        The default trusts the log and reuses ``earlier``. A destination that can look
        should check that the record is still there and still ours, add what is new (a
        link that did not exist then), and export anew if it is gone.
        """
        return earlier

    def holds_no_records(self) -> bool | None:
        """Whether the endpoint holds none of this destination's records at all.

        Asked once per process while the database has not yet vouched for the endpoint.
        ``True`` lets nxdrop vouch, from then on, for every session it has never sent there
        (``context.unseen``), so the lookup before each create can be skipped. ``False``
        (it holds records this database may not know) or ``None`` (cannot tell: the
        default) keeps ``unseen`` false.
        """
        return None

    def holds_records_of(self, sessions: Sequence[str]) -> Collection[str] | None:
        """Which of ``sessions`` the endpoint holds any record of: the sessions of the next
        files to export (at most 50), asked at once while the log cannot vouch for the
        endpoint (:meth:`holds_no_records` found records there).

        A session left out of the answer is vouched for, for a minute, as the census
        vouches for an empty endpoint: ``context.unseen`` is true for it, so its lookup
        before creating may be skipped. ``None`` (the default): cannot tell; every record
        looks for itself.
        """
        return None


@runtime_checkable
class NexusLIMSDestination(Protocol):
    """The shape of a NexusLIMS export destination, which need not subclass anything."""

    name: str
    priority: int

    @property
    def enabled(self) -> bool: ...

    def validate_config(self) -> tuple[bool, str | None]: ...

    def export(self, context: ExportContext) -> ExportResult: ...


class PortedDestination(ExportDestination):
    """A NexusLIMS-style destination given the optional hooks' defaults.

    ``reads`` is the one optional hook a plain class may declare itself, as a class
    attribute (any collection of names); without it, it waits for every destination before
    it, as in NexusLIMS.
    """

    def __init__(self, plugin: NexusLIMSDestination) -> None:
        self.plugin = plugin
        self.name = str(plugin.name)
        self.priority = int(plugin.priority)
        # Not in NexusLIMS's interface, so not in the Protocol: this is the one place it is
        # looked for. A lone string is one name, not its letters.
        reads = getattr(plugin, "reads", None)
        if reads is not None:
            self.reads = frozenset([reads] if isinstance(reads, str) else map(str, reads))

    @property
    def enabled(self) -> bool:
        return bool(self.plugin.enabled)

    def validate_config(self) -> tuple[bool, str | None]:
        return self.plugin.validate_config()

    def export(self, context: ExportContext) -> ExportResult:
        return self.plugin.export(context)


def as_destination(obj: object) -> ExportDestination | None:
    """``obj`` as an :class:`ExportDestination`: itself, or ported; ``None`` if it is neither."""
    if isinstance(obj, ExportDestination):
        return obj
    if isinstance(obj, NexusLIMSDestination):
        return PortedDestination(obj)
    return None
