"""The pipeline: one record file through the destinations, into the log and the archive.

``run_strategy`` is the pure part (which destinations run, and what counts as exported);
:class:`Pipeline` wraps it with reading, retries, the database and the folder moves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import backoff

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult, utcnow
from nxdrop.exceptions import DestinationError, RecordError, TransientError
from nxdrop.folders import Claim, DropFolder, claim
from nxdrop.records import Record, RecordReader, session_identifier_of
from nxdrop.settings import Settings, Strategy
from nxdrop.store import RecordStatus, Store

log = logging.getLogger(__name__)

Attempt = Callable[[ExportDestination, ExportContext], ExportResult]


class Outcome(StrEnum):
    """What became of one file."""

    EXPORTED = "exported"  # the strategy counts it a success: uploaded/
    FAILED = "failed"  # destinations failed: failed/
    REJECTED = "rejected"  # the record itself is bad; no destination contacted: failed/
    ABANDONED = "abandoned"  # nxdrop stopped mid-way; the file stays in the drop folder
    GONE = "gone"  # the file vanished before it was read (taken by someone else)


@dataclass
class FileReport:
    """The story of one file, for the CLI, the daemon and the error file."""

    path: Path
    session_identifier: str
    outcome: Outcome
    results: list[ExportResult] = field(default_factory=list)
    archived_to: Path | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.outcome is Outcome.EXPORTED


def is_exported(strategy: Strategy, results: list[ExportResult]) -> bool:
    """The strategy's verdict: ``all`` needs every result a success, the others one."""
    if not results:
        return False
    if strategy is Strategy.ALL:
        return all(r.success for r in results)
    return any(r.success for r in results)


def run_strategy(
    strategy: Strategy,
    destinations: list[ExportDestination],
    context: ExportContext,
    attempt: Attempt,
    should_stop: Callable[[], bool] = lambda: False,
) -> list[ExportResult]:
    """Run ``destinations`` (priority order) under ``strategy``; each sees the earlier results.

    ``all`` and ``best_effort`` run every destination; ``first_success`` stops at the first
    success. ``attempt`` never raises: it turns every failure into a failed result.
    """
    results: list[ExportResult] = []
    for destination in destinations:
        if should_stop():
            break
        result = attempt(destination, context)
        context.previous_results[destination.name] = result
        results.append(result)
        if strategy is Strategy.FIRST_SUCCESS and result.success:
            break
    return results


class Pipeline:
    """Exports record files; one instance serves every worker thread."""

    def __init__(
        self,
        settings: Settings,
        destinations: list[ExportDestination],
        store: Store,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        self.settings = settings
        self.destinations = destinations
        self.store = store
        self.reader = RecordReader(settings.max_record_bytes, settings.schema_path)
        self.folder = DropFolder(settings.drop)
        self.stop = stop or threading.Event()

    def export_file(self, path: Path) -> FileReport:
        """Export one file; files in the drop folder are then moved as the daemon would.

        The file is locked while it runs, so two daemons sharing a folder (or a daemon and
        ``nxdrop export``) never export it both.
        """
        session = session_identifier_of(path)
        with claim(path) as claimed:
            if claimed is Claim.GONE:
                return FileReport(path, session, Outcome.GONE, error="no such file")
            if claimed is Claim.TAKEN:
                log.info(
                    "%s: another nxdrop is exporting it",
                    path.name,
                    extra={"SESSION_ID": session, "FILE": str(path)},
                )
                return FileReport(path, session, Outcome.GONE, error="taken by another process")
            return self._export(path, session)

    def _export(self, path: Path, session: str) -> FileReport:
        try:
            record = self.reader.read(path)
        except RecordError as exc:
            return self._reject(path, session, str(exc))
        extra = {"SESSION_ID": session, "FILE": str(path)}
        log.info("exporting %s (%d bytes)", path.name, len(record.content), extra=extra)
        self.store.set_session(session, RecordStatus.EXPORTING, record=record)
        context = ExportContext.for_record(record)
        strategy = self.settings.export_strategy
        results = run_strategy(
            strategy,
            self.destinations,
            context,
            lambda dest, ctx: self._attempt(dest, ctx, record),
            self.stop.is_set,
        )
        finished = len(results) == len(self.destinations) or (
            strategy is Strategy.FIRST_SUCCESS and bool(results) and results[-1].success
        )
        if self.stop.is_set() and not (finished and is_exported(strategy, results)):
            # Cleanly abandoned: the file stays where it is and runs again at the next start,
            # where what succeeded now is reused (same bytes), not sent again.
            self.store.set_session(
                session,
                RecordStatus.EXPORTING,
                record=record,
                error_message="interrupted: nxdrop stopped",
            )
            log.warning("%s: left in the drop folder, nxdrop is stopping", path.name, extra=extra)
            return FileReport(path, session, Outcome.ABANDONED, results, error="interrupted")
        return self._finish(record, results)

    def _finish(self, record: Record, results: list[ExportResult]) -> FileReport:
        session, path = record.session_identifier, record.path
        extra = {"SESSION_ID": session, "FILE": str(path)}
        exported = is_exported(self.settings.export_strategy, results)
        failures = [r for r in results if not r.success]
        error = "; ".join(f"{r.destination_name}: {r.error_message}" for r in failures) or None
        if exported:
            self.store.set_session(
                session, RecordStatus.COMPLETED, record=record, error_message=error
            )
            archived = self._archive(path, exported=True)
            log.info("%s exported (%s)", path.name, _summary(results), extra=extra)
            return FileReport(path, session, Outcome.EXPORTED, results, archived, error)
        self.store.set_session(
            session, RecordStatus.BUILT_NOT_EXPORTED, record=record, error_message=error
        )
        report = _error_report(
            record.name,
            session,
            self.settings.export_strategy,
            error,
            results,
            sha256=record.sha256,
        )
        archived = self._archive(path, exported=False, report=report)
        log.error("%s NOT exported: %s", path.name, error, extra=extra)
        return FileReport(path, session, Outcome.FAILED, results, archived, error)

    def _reject(self, path: Path, session: str, error: str) -> FileReport:
        log.error(
            "%s rejected: %s", path.name, error, extra={"SESSION_ID": session, "FILE": str(path)}
        )
        self.store.set_session(
            session, RecordStatus.ERROR, file_name=path.name, error_message=error
        )
        report = _error_report(
            path.name, session, self.settings.export_strategy, f"record rejected: {error}", []
        )
        try:
            archived = self._archive(path, exported=False, report=report)
        except FileNotFoundError:
            return FileReport(path, session, Outcome.GONE, error=error)
        return FileReport(path, session, Outcome.REJECTED, [], archived, error)

    def _archive(
        self, path: Path, *, exported: bool, report: dict[str, Any] | None = None
    ) -> Path | None:
        if not self.folder.holds(path):
            return None  # `nxdrop export` of a file elsewhere: leave it where it is
        if exported:
            return self.folder.move_to_uploaded(path)
        return self.folder.move_to_failed(path, report or {})

    # -- one destination ---------------------------------------------------------------

    def _attempt(
        self, destination: ExportDestination, context: ExportContext, record: Record
    ) -> ExportResult:
        """One destination, with reuse of an earlier identical export, retries and the log."""
        name = str(destination.name)
        earlier = self.store.earlier_success(name, record.sha256)
        attempt_id = self.store.begin_attempt(record, name)
        started = time.monotonic()
        if earlier is not None:
            previous = ExportResult(
                success=True,
                destination_name=name,
                record_id=earlier.record_id,
                record_url=earlier.record_url,
                metadata={**earlier.metadata, "reused_from": earlier.id},
            )
            reconcile = getattr(destination, "reconcile", None)
            call: Callable[[], ExportResult] = (
                (lambda: reconcile(context, previous))
                if callable(reconcile)
                else (lambda: previous)
            )
        else:
            call = lambda: destination.export(context)  # noqa: E731
        result = self._with_retries(name, context, call)
        if earlier is not None and result.success:
            result.metadata.setdefault("reused_from", earlier.id)
        self.store.finish_attempt(attempt_id, result, time.monotonic() - started)
        extra = {
            "SESSION_ID": context.session_identifier,
            "DESTINATION": name,
            "RECORD_ID": result.record_id or "",
            "FILE": str(context.xml_file_path),
        }
        if result.success:
            log.info(
                "%s → %s: %s%s",
                record.name,
                name,
                result.record_url or result.record_id,
                " (already there)" if earlier is not None else "",
                extra=extra,
            )
        else:
            log.warning("%s → %s failed: %s", record.name, name, result.error_message, extra=extra)
        return result

    def _with_retries(
        self, name: str, context: ExportContext, call: Callable[[], ExportResult]
    ) -> ExportResult:
        budget = self.settings.retry_max_time
        started = time.monotonic()
        delays: Iterator[float] = backoff.expo(base=2, factor=0.5, max_value=30)
        next(delays)  # prime the generator (backoff's wait generators start with a yield)
        attempt = 0
        while True:
            attempt += 1
            context.attempt = attempt
            try:
                result = call()
            except TransientError as exc:
                delay = (
                    exc.retry_after
                    if exc.retry_after is not None
                    else backoff.full_jitter(next(delays))
                )
                left = budget - (time.monotonic() - started)
                if delay > left:
                    return _failed(name, exc, attempt, "gave up retrying: ")
                log.info(
                    "%s: %s; retry %d in %.1f s",
                    name,
                    exc,
                    attempt,
                    delay,
                    extra={"SESSION_ID": context.session_identifier, "DESTINATION": name},
                )
                if self.stop.wait(delay):
                    return _failed(name, exc, attempt, "nxdrop stopped while retrying: ")
                continue
            except DestinationError as exc:
                return _failed(name, exc, attempt)
            except Exception as exc:
                log.exception(
                    "destination %s raised",
                    name,
                    extra={"SESSION_ID": context.session_identifier, "DESTINATION": name},
                )
                return _failed(name, exc, attempt, f"unexpected {type(exc).__name__}: ")
            if not isinstance(result, ExportResult):
                return ExportResult(
                    False,
                    name,
                    attempts=attempt,
                    error_message=f"export() returned {type(result).__name__}, not an ExportResult",
                )
            result.destination_name = name
            result.attempts = max(result.attempts, attempt)
            return result


def _failed(name: str, exc: BaseException, attempts: int, prefix: str = "") -> ExportResult:
    return ExportResult(
        success=False,
        destination_name=name,
        error_message=f"{prefix}{exc}",
        status_code=getattr(exc, "status_code", None),
        attempts=attempts,
    )


def _summary(results: list[ExportResult]) -> str:
    return ", ".join(f"{r.destination_name} {'ok' if r.success else 'FAILED'}" for r in results)


def _error_report(
    name: str,
    session: str,
    strategy: Strategy,
    error: str | None,
    results: list[ExportResult],
    sha256: str | None = None,
) -> dict[str, Any]:
    """What ``failed/<name>.error.json`` says: the why, per destination."""
    return {
        "file": name,
        "session_identifier": session,
        "sha256": sha256,
        "strategy": strategy.value,
        "time": utcnow().isoformat(),
        "error": error,
        "destinations": {
            r.destination_name: {
                "success": r.success,
                "error": r.error_message,
                "status_code": r.status_code,
                "attempts": r.attempts,
                "time": r.timestamp.isoformat(),
                "record_id": r.record_id,
                "record_url": r.record_url,
            }
            for r in results
        },
    }
