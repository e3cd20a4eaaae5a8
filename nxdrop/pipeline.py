"""The per-file job: claim, lock the session, read, run the strategy, log, move on.

A record in the drop folder is claimed by renaming it into this process's working folder
(:class:`~nxdrop.folders.WorkFolder`), its session is locked (in this process and in the
database), and it is read and exported from there. Its outcome is logged in
``session_log`` before it moves to ``uploaded/`` or ``failed/``. A file rewritten in place
while it was exported is read again and its new content exported too (an update), so
nothing reaches ``uploaded/`` unsent. When nxdrop stops mid-way the file goes back into
the drop folder.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult, utcnow
from nxdrop.exceptions import DatabaseUnavailable, RecordError
from nxdrop.folders import DropFolder, WorkFolder
from nxdrop.lookahead import Lookahead
from nxdrop.metrics import Metrics
from nxdrop.records import Record, escape_name, name_problem, session_identifier_of
from nxdrop.redact import Redactor
from nxdrop.runner import Abandoned, DestinationRunner, Stop
from nxdrop.schemas import NEXUS_EXPERIMENT_XSD
from nxdrop.settings import Settings, Strategy
from nxdrop.store import RecordStatus, Standing, Store

if TYPE_CHECKING:
    from nxdrop.reader import RecordReader

log = logging.getLogger(__name__)

MAX_ROUNDS = 5  # exports of one file that keeps changing before it is given up
LOCK_POLL_SECONDS = 0.5  # how often a session held by another process is asked for again


class Outcome(StrEnum):
    """What became of one file."""

    EXPORTED = "exported"  # the strategy counts it a success: uploaded/
    FAILED = "failed"  # destinations failed: failed/
    REJECTED = "rejected"  # the record itself is bad; no destination contacted: failed/
    ABANDONED = "abandoned"  # nxdrop stopped mid-way; the file is back in the drop folder
    DEFERRED = "deferred"  # the database is down: the file is back, to run when it is up
    GONE = "gone"  # the file vanished before it was claimed (taken by someone else)


@dataclass
class FileReport:
    """The story of one file, for the CLI and the daemon."""

    path: Path
    session_identifier: str
    outcome: Outcome
    results: list[ExportResult] = field(default_factory=list)
    moved_to: Path | None = None
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


class SessionLocks:
    """One lock per session identifier in this process, kept only while someone holds it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, session: str) -> Iterator[None]:
        with self._mutex:
            lock, users = self._held.get(session, (threading.Lock(), 0))
            self._held[session] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._held[session]
                if users == 1:
                    del self._held[session]
                else:
                    self._held[session] = (lock, users - 1)


class Pipeline:
    """Exports record files; one instance serves every worker thread of a process."""

    def __init__(
        self,
        settings: Settings,
        destinations: list[ExportDestination],
        store: Store,
        work: WorkFolder,
        *,
        stop: Stop | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.strategy = settings.export_strategy
        self.store = store
        self.work = work
        self.folder: DropFolder = work.drop
        self.stop = stop or Stop()
        # An XSD of the operator's is compiled now, so that one that does not compile stops
        # the start; the shipped one, or none, leaves nothing to check before a record.
        custom = settings.schema_path not in (None, NEXUS_EXPERIMENT_XSD)
        self._reader: RecordReader | None = _reader(settings) if custom else None
        self._reader_lock = threading.Lock()
        # Highest priority first whoever built the list; a stable sort keeps the given
        # order (by name, from discovery) among equals.
        destinations = sorted(destinations, key=lambda d: -d.priority)
        self.lookahead = Lookahead()  # the intake's ready files, for lookups in batches
        self.runners = [
            DestinationRunner(
                d,
                store,
                worker=work.worker,
                retry_max_time=settings.retry_max_time,
                stop=self.stop,
                redactor=Redactor.from_settings(settings),
                metrics=metrics or Metrics(),
                lookahead=self.lookahead,
            )
            for d in destinations
        ]
        self.waits = waits_for(destinations)
        # The threads beside each worker's own: one record needs at most one per destination
        # but the first, and NX_WORKERS records run at once. Made lazily by the executor; a
        # record whose helper is queued behind others runs that destination itself.
        self.pool = ThreadPoolExecutor(
            max_workers=max(1, settings.workers * (len(destinations) - 1)),
            thread_name_prefix="nxdrop-destination",
        )
        self.sessions = SessionLocks()

    @property
    def reader(self) -> RecordReader:
        """The record reader, made at the first record, so that a start with nothing to
        read does not load lxml (about 25 ms) nor compile the schema shipped with nxdrop."""
        with self._reader_lock:
            if self._reader is None:
                self._reader = _reader(self.settings)
            return self._reader

    def close(self) -> None:
        """Let the destination threads go; never waits for a call that hangs."""
        self.pool.shutdown(wait=False, cancel_futures=True)

    def process(self, path: Path) -> FileReport:
        """Export one file. A file in the drop folder is claimed and then moved on as the
        daemon does; a file elsewhere (``nxdrop export``) is exported where it is."""
        try:
            return self._process(path)
        finally:
            self.lookahead.done(path.name)

    def _process(self, path: Path) -> FileReport:
        name = path.name
        shown, session = escape_name(name), escape_name(session_identifier_of(name))
        with self.sessions.hold(session):
            if self.folder.holds(path):
                source = self.work.claim(path)
                if source is None:
                    return FileReport(path, session, Outcome.GONE, error="no such file any more")
            else:
                source = path  # ``nxdrop export`` of a file elsewhere: it stays where it is
            file = _File(path, name, shown, session, source, claimed=source is not path)
            try:
                return self._locked(file)
            except DatabaseUnavailable as exc:
                # Nothing moves on without its outcome logged: back it goes, until the
                # database works again (the daemon pauses and says so).
                back = self._put_back(file)
                return FileReport(path, session, Outcome.DEFERRED, moved_to=back, error=str(exc))
            except Abandoned as exc:
                back = self._put_back(file)
                log.warning("%s: left for later: %s", shown, exc, extra=file.fields)
                with contextlib.suppress(DatabaseUnavailable):  # only a note for `status`
                    self.store.set_session(
                        session, RecordStatus.EXPORTING, file_name=shown, error_message=str(exc)
                    )
                return FileReport(path, session, Outcome.ABANDONED, moved_to=back, error=str(exc))
            except BaseException:
                self._put_back(file)
                raise

    def _put_back(self, file: _File) -> Path | None:
        source = file.source
        if not file.claimed or (not source.is_symlink() and not source.exists()):
            return None  # not ours to move, or it had already moved on
        return self.work.put_back(source, file.name)

    def _locked(self, file: _File) -> FileReport:
        """Hold the session in the database while the file runs."""
        with self._holding(file):
            return self._run(file)

    @contextlib.contextmanager
    def _holding(self, file: _File, *, mark: bool = True) -> Iterator[None]:
        """The session's lock in the database, waited for while another process has it."""
        worker = self.work.worker
        waiting = False
        while not self.store.lock_session(file.session, worker, file.shown, mark=mark):
            if not waiting:
                waiting = True
                log.info(
                    "%s: another nxdrop is exporting session %s; waiting for it",
                    file.shown,
                    file.session,
                    extra=file.fields,
                )
            if self.stop.requested.wait(LOCK_POLL_SECONDS):
                raise Abandoned("nxdrop stopped while another process held the session")
        try:
            yield
        finally:
            self.store.unlock_session(file.session, worker)

    def resend(self, path: Path, destination: str) -> ExportResult:
        """Send the exported record at ``path`` (left where it is) to ``destination`` alone,
        with what the other destinations hold of its session as their earlier results (the
        CDCS link, say): the backfill of a destination added later.

        Raises ``RecordError``, :class:`Abandoned` and ``DatabaseUnavailable``.
        """
        runner = next((r for r in self.runners if r.name == destination), None)
        if runner is None:
            raise ValueError(f"no enabled destination named {destination!r}")
        name = path.name
        shown, session = escape_name(name), escape_name(session_identifier_of(name))
        file = _File(path, name, shown, session, path, claimed=False)
        with self.sessions.hold(session), self._holding(file, mark=False):
            problem = name_problem(name)
            if problem is not None:
                raise RecordError(problem)
            record = self.reader.read(path, name)
            standings = self.store.standings(session)
            earlier: dict[str, ExportResult] = {}
            for other in self.runners:
                held = standings.get((other.name, other.destination.endpoint), Standing())
                if other is not runner and held.latest_success is not None:
                    earlier[other.name] = held.latest_success.as_result()
            standing = standings.get((runner.name, runner.destination.endpoint), Standing())
            context = ExportContext.for_record(record).evolve(previous_results=earlier)
            return runner.run(context, record, standing)

    def _run(self, file: _File) -> FileReport:
        problem = name_problem(file.name)
        if problem is not None:
            return self._reject(file, problem)
        for round_ in range(1, MAX_ROUNDS + 1):
            try:
                record = self.reader.read(file.source, file.name)
            except RecordError as exc:
                return self._reject(file, str(exc))
            # DEBUG: at INFO each destination's result and the outcome say it all, and a line
            # costs about as much as a SQL statement.
            log.debug("exporting %s (%d bytes)", file.name, len(record.content), extra=file.fields)
            results = self._destinations(record)
            if self.stop.now.is_set() and not is_exported(self.strategy, results):
                # Cut short by the stop, perhaps by it: the next start runs it again.
                raise Abandoned("nxdrop stopped before the export was done")
            if not record.changed():
                return self._finish(file, record, results)
            if round_ < MAX_ROUNDS:
                log.warning(
                    "%s changed while it was exported: exporting its new content",
                    file.name,
                    extra=file.fields,
                )
        error = f"the file kept changing while it was exported ({MAX_ROUNDS} times)"
        return self._finish(file, record, results, error=error)

    def _destinations(self, record: Record) -> list[ExportResult]:
        """Run the destinations; their results in priority order.

        ``first_success`` runs them one by one in priority order, each seeing the results
        before it, and stops at the first success. ``all`` and ``best_effort`` start each
        as soon as those it waits for (:func:`waits_for`) are done, side by side, and give
        it exactly their results: a record takes its longest chain, not the sum.
        """
        standings = self.store.standings(record.session_identifier)
        context = ExportContext.for_record(record)

        def run(i: int, previous: list[ExportResult]) -> ExportResult:
            if self.stop.now.is_set():
                raise Abandoned("nxdrop stopped between destinations")
            runner = self.runners[i]
            seen = {r.destination_name: r for r in previous}
            standing = standings.get((runner.name, runner.destination.endpoint), Standing())
            return runner.run(context.evolve(previous_results=seen), record, standing)

        if self.strategy is not Strategy.FIRST_SUCCESS:
            return _SideBySide(self.waits, run, self.pool).run()
        results: list[ExportResult] = []
        for i in range(len(self.runners)):
            results.append(run(i, results))
            if results[-1].success:
                break
        return results

    def _finish(
        self,
        file: _File,
        record: Record,
        results: list[ExportResult],
        *,
        error: str | None = None,
    ) -> FileReport:
        session, name = record.session_identifier, record.name
        exported = error is None and is_exported(self.strategy, results)
        failures = [f"{r.destination_name}: {r.error_message}" for r in results if not r.success]
        error = "; ".join(([error] if error else []) + failures) or None
        if exported:
            self.store.set_session(
                session, RecordStatus.COMPLETED, record=record, error_message=error
            )
            moved = self.work.to_uploaded(record.path, name) if file.claimed else None
            log.info("%s exported (%s)", name, _summary(results), extra=file.fields)
            return FileReport(file.path, session, Outcome.EXPORTED, results, moved, error)
        self.store.set_session(
            session, RecordStatus.BUILT_NOT_EXPORTED, record=record, error_message=error
        )
        moved = None
        if file.claimed:
            report = _error_report(name, session, self.strategy, error, results, record.sha256)
            moved = self.work.to_failed(record.path, name, report)
        log.error("%s NOT exported: %s", name, error, extra=file.fields)
        return FileReport(file.path, session, Outcome.FAILED, results, moved, error)

    def _reject(self, file: _File, error: str) -> FileReport:
        shown, session = file.shown, file.session
        log.error("%s rejected: %s", shown, error, extra=file.fields)
        self.store.set_session(session, RecordStatus.ERROR, file_name=shown, error_message=error)
        moved = None
        if file.claimed:
            report = _error_report(shown, session, self.strategy, f"record rejected: {error}", [])
            moved = self.work.to_failed(file.source, file.name, report)
        return FileReport(file.path, session, Outcome.REJECTED, [], moved, error)


def _reader(settings: Settings) -> RecordReader:
    from nxdrop.reader import RecordReader  # lxml with it: see Pipeline.reader

    return RecordReader(settings.max_record_bytes, settings.schema_path)


def waits_for(destinations: Sequence[ExportDestination]) -> list[tuple[int, ...]]:
    """For each destination, in run order, the indices of those before it that it waits for:
    the ones it ``reads``, or all of them when it declares nothing (``reads is None``).

    A name read that is not enabled is absent. One read that does not run before it (lower
    priority, or itself) is meaningless: ignored, with a warning, rather than refusing to
    start over a plugin's declaration.
    """
    waits: list[tuple[int, ...]] = []
    for i, destination in enumerate(destinations):
        if destination.reads is None:
            waits.append(tuple(range(i)))
            continue
        before = {str(d.name): j for j, d in enumerate(destinations[:i])}
        for later in destinations[i:]:
            if later.name in destination.reads:
                log.warning(
                    "destination %s (priority %d) reads %s (priority %d), which does not run "
                    "before it: ignored",
                    destination.name,
                    destination.priority,
                    later.name,
                    later.priority,
                )
        waits.append(tuple(sorted(before[n] for n in destination.reads if n in before)))
    return waits


class _SideBySide:
    """One record's destinations under ``all`` or ``best_effort``: each starts once those it
    waits for are done. The worker's own thread takes the first and waits for the rest,
    taking whatever becomes ready meanwhile; a thread that takes one asks the pool for a
    helper for each other one ready. Whichever thread is free first takes a ready
    destination, so a record never waits for a busy (or closed) pool.

    Something raised (:class:`Abandoned`, the database down) starts nothing more; it is
    raised in the worker's thread once none of the record's destinations is running, so
    no thread still writes for a file that has been put back.
    """

    def __init__(
        self,
        waits: Sequence[tuple[int, ...]],
        run: Callable[[int, list[ExportResult]], ExportResult],
        pool: ThreadPoolExecutor,
    ) -> None:
        self.waits, self._run, self.pool = waits, run, pool
        self.cond = threading.Condition()
        self.results: dict[int, ExportResult] = {}
        self.ready = deque(i for i, w in enumerate(waits) if not w)
        self.waiting = {i for i, w in enumerate(waits) if w}
        self.running = 0
        self.asked = 0  # helpers asked of the pool and not yet started
        self.error: BaseException | None = None

    def run(self) -> list[ExportResult]:
        """Run them all; their results in priority order, or raise what one raised."""
        self._work(own=True)
        if self.error is not None:
            raise self.error
        return [self.results[i] for i in sorted(self.results)]

    def _help(self) -> None:
        with self.cond:
            self.asked -= 1
        self._work()

    def _work(self, own: bool = False) -> None:
        """Run ready destinations until none is; the worker's thread (``own``) also waits
        until none is running, taking those that become ready meanwhile."""
        while True:
            with self.cond:
                while own and not self.ready and self.running:
                    self.cond.wait()
                if not self.ready:
                    return
                i = self.ready.popleft()
                self.running += 1
                previous = [self.results[j] for j in self.waits[i]]
                more = max(0, len(self.ready) - self.asked)
                self.asked += more
            for _ in range(more):
                try:
                    self.pool.submit(self._help)
                except RuntimeError:  # the pool is closed: the worker's thread runs them
                    with self.cond:
                        self.asked -= 1
            result: ExportResult | BaseException
            try:
                result = self._run(i, previous)
            except BaseException as exc:  # carried to the worker's thread, raised there
                result = exc
            with self.cond:
                self.running -= 1
                if isinstance(result, BaseException):
                    self.error = self.error or result
                    self.ready.clear()  # start nothing more: the file goes back
                else:
                    self.results[i] = result
                    if self.error is None:
                        done = self.results.keys()
                        new = [k for k in sorted(self.waiting) if done >= set(self.waits[k])]
                        self.waiting.difference_update(new)
                        self.ready.extend(new)  # this thread takes the first, next round
                self.cond.notify_all()


@dataclass(frozen=True)
class _File:
    """One file on its way: its name (for moves), as shown (stored, logged), its session."""

    path: Path  # as given
    name: str  # its real name, for the moves
    shown: str  # its name as text that is safe to store and log
    session: str  # its session identifier, as safe text
    source: Path  # where its bytes are: the working folder once claimed
    claimed: bool  # moved on (uploaded/, failed/, back) when done

    @property
    def fields(self) -> dict[str, str]:
        """The journal fields of a log line about it."""
        return {"SESSION_ID": self.session, "FILE": self.shown}


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
