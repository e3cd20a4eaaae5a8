"""Handing ready paths to a bounded pool of workers, one job per session at a time.

Files of one session (``x.xml`` and ``x.1.xml``, or a record rebuilt while its first
version is exported) wait for each other here, so no worker blocks on a session lock that
another worker of this process holds. Owned by the daemon's main thread; the workers only
run jobs, and a finished job wakes the main thread through ``wake``.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from nxdrop.concurrency import Concurrency
from nxdrop.pipeline import FileReport
from nxdrop.records import session_identifier_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Done:
    """A finished job: its report, or the exception of a bug (already logged)."""

    path: Path
    report: FileReport | None


@dataclass(frozen=True)
class _Running:
    path: Path
    session: str
    started: float


class Dispatcher:
    """Runs ``job(path)`` on at most ``workers`` threads (fewer while more cannot help:
    :mod:`nxdrop.concurrency`), never two of one session at once."""

    def __init__(
        self, job: Callable[[Path], FileReport], workers: int, wake: Callable[[], None]
    ) -> None:
        self.job = job
        self.workers = workers
        self.wake = wake
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nxdrop-worker")
        self._waiting: dict[str, deque[Path]] = {}  # session → its paths, oldest first
        self._queued: set[Path] = set()  # every path in _waiting
        self._ready: deque[str] = deque()  # sessions with paths waiting and no job running
        self._running: dict[Future[FileReport], _Running] = {}
        self._bugs_told: set[str] = set()
        self.concurrency = Concurrency(workers)

    def wants(self) -> bool:
        """Whether more paths would keep the workers busy (it never hoards the backlog)."""
        return len(self._ready) < self.workers

    def offer(self, path: Path) -> None:
        """Queue ``path``; a path already waiting is not queued twice."""
        if path in self._queued:
            return
        session = session_identifier_of(path.name)
        paths = self._waiting.get(session)
        if paths is None:
            paths = self._waiting[session] = deque()
            if not self._busy(session):
                self._ready.append(session)
        paths.append(path)
        self._queued.add(path)

    def pump(self) -> int:
        """Start jobs while workers are free; how many started."""
        started = 0
        while self._ready and len(self._running) < self.concurrency.limit:
            session = self._ready.popleft()
            paths = self._waiting[session]
            path = paths.popleft()
            self._queued.discard(path)
            if not paths:
                del self._waiting[session]
            future = self.executor.submit(self.job, path)
            self._running[future] = _Running(path, session, time.monotonic())
            future.add_done_callback(lambda _: self.wake())
            started += 1
        return started

    def reap(self) -> list[Done]:
        """The jobs that finished since the last call; their sessions may run again."""
        self.concurrency.step(waiting=bool(self._ready))
        finished = [f for f in self._running if f.done()]
        done = []
        for future in finished:
            job = self._running.pop(future)
            if job.session in self._waiting:
                self._ready.append(job.session)
            try:
                report: FileReport | None = future.result()
            except BaseException as exc:  # even SystemExit from a plugin must not end it
                bug = f"{type(exc).__name__}: {exc}"
                told = bug in self._bugs_told
                self._bugs_told.add(bug)
                log.error(  # a bug: its traceback once, then one line
                    "%s: export failed unexpectedly (%s); it is back in the drop folder",
                    job.path.name,
                    bug,
                    exc_info=None if told else exc,
                )
                report = None
            done.append(Done(job.path, report))
        return done

    def drop_waiting(self) -> int:
        """Forget the paths not yet started (they stay in the drop folder); how many."""
        count = len(self._queued)
        self._waiting.clear()
        self._queued.clear()
        self._ready.clear()
        return count

    def call(self, work: Callable[[], None]) -> Future[None]:
        """Run ``work`` on a worker thread (not a file's job); the main loop is woken after."""
        future = self.executor.submit(work)
        future.add_done_callback(lambda _: self.wake())
        return future

    def shutdown(self) -> None:
        """Let the executor's threads go once their jobs end; never waits for them."""
        self.executor.shutdown(wait=False, cancel_futures=True)

    def next_wakeup(self) -> float:
        """When the main loop should call :meth:`reap` though no job ended: while paths
        wait and more of them may run, to let the limit grow (``time.monotonic()``)."""
        if self._ready and self.concurrency.limit < self.workers:
            return self.concurrency.next_step()
        return float("inf")

    def __contains__(self, path: object) -> bool:
        return path in self._queued

    @property
    def queued(self) -> int:
        """Paths waiting for a worker."""
        return len(self._queued)

    @property
    def running(self) -> int:
        """Jobs running now."""
        return len(self._running)

    def oldest_running(self) -> float | None:
        """Seconds the longest-running job has been at it, or ``None`` when idle."""
        if not self._running:
            return None
        return time.monotonic() - min(r.started for r in self._running.values())

    def _busy(self, session: str) -> bool:
        return any(r.session == session for r in self._running.values())
