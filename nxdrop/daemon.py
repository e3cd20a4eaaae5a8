"""The service: watch the drop folder and export each record once, with a pool of workers.

The main thread owns all the bookkeeping (the claimed paths, the overflow of the work
queue, the settle tracker, the counters). The observer, the workers and the signal
handlers only put items into its inbox, so no lock guards that state, and a path stays
claimed from the moment it is queued until the main thread has read its worker's report:
two events, or an event and a rescan, never export one file twice.

Stopping: the first SIGTERM/SIGINT stops intake (queued files stay in the drop folder),
lets the exports in flight finish for up to ``NX_STOP_TIMEOUT`` seconds, then sets
``app.stop``, so the pipeline abandons the rest and leaves those files where they are.
A second signal sets ``app.stop`` at once; a third stops waiting for the destination
calls still running. Every file is always in exactly one place (each move is one rename).
The exit code of a stop is 0: systemd must not count it as a failure. SIGHUP does not
reload the configuration (it is logged): restart the service instead.
"""

from __future__ import annotations

import logging
import queue
import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import FrameType

from nxdrop.app import App
from nxdrop.pipeline import FileReport, Outcome
from nxdrop.progress import Progress
from nxdrop.systemd import Notifier
from nxdrop.watcher import Kind, SettleTracker, Sighting, Watcher

log = logging.getLogger(__name__)

SUPERVISE_SECONDS = 1.0  # how often the observer and the workers are checked
MAX_PENDING = 10_000  # claimed paths beyond the work queue; more are left to the next rescan
BATCH = 1000  # inbox items handled per loop before the periodic duties run again
STATUS_EVERY = 0.5  # at most two STATUS= a second, however fast the records go
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class _Done:
    path: Path
    report: FileReport | None  # None: the pipeline raised (it is logged)


_Item = Sighting | _Done | None  # None only wakes the main loop


class Daemon:
    """``nxdrop run``: :meth:`run` is the service, :meth:`run_once` one pass."""

    def __init__(self, app: App, notifier: Notifier | None = None) -> None:
        self.app = app
        self.settings = settings = app.settings
        self.folder = app.pipeline.folder
        self.notifier = notifier or Notifier()
        self.inbox: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self.watcher = Watcher(
            self.folder, settings.observer, settings.settle_seconds, self.inbox.put
        )
        self.tracker = SettleTracker(settings.settle_seconds, patience=settings.rescan_seconds)
        # Unbounded on purpose: _feed keeps it at queue_size, so the stop sentinels always fit.
        self._work: queue.Queue[Path | None] = queue.Queue()
        self._workers: list[threading.Thread] = []
        self._claimed: set[Path] = set()  # queued, pending or in flight
        self._pending: deque[Path] = deque()  # claimed, waiting for room in the work queue
        self._revisit: set[Path] = set()  # named again while claimed: look once more after
        self._shed = False  # paths were left for the next rescan (pending was full)
        self._watching = self._stopping = False
        self._signals = 0
        self._hup = False
        self.counts: Counter[Outcome] = Counter()
        self._last = ""
        self._reports: dict[Path, FileReport] | None = None
        self._progress: Progress | None = None
        now = time.monotonic()
        self._next_rescan = now + settings.rescan_seconds
        self._next_supervise = self._next_settle = self._next_ping = self._next_status = now
        self._settle_every = min(0.25, settings.settle_seconds / 4)
        self._watcher_ok = True
        self._sent_status = ""

    # -- the two ways to run -------------------------------------------------------------

    def run(self) -> int:
        """The service, until SIGTERM/SIGINT; 0 on a clean stop."""
        with self._signal_handlers():
            self.start()
            while not self._signals:
                self.loop_once()
            self.shutdown()
        return 0

    def run_once(self) -> list[FileReport]:
        """Export what is in the drop folder now; the reports, oldest file first."""
        with self._signal_handlers():
            paths = list(self.folder.scan())
            self._reports, self._progress = {}, Progress(len(paths))
            # No event will say a file is complete, nor a later rescan take it: an empty
            # file is taken like any other once it has stood still for the settle time.
            settle = self.settings.settle_seconds
            self.tracker = SettleTracker(settle, patience=settle)
            self._start_workers()
            for path in paths:
                self._offer(path)  # a file written just now settles first
            give_up = time.monotonic() + max(10.0, 5 * self.settings.settle_seconds)
            while (self._claimed or self.tracker) and not self._signals:
                self.loop_once()
                if self.tracker and time.monotonic() > give_up:
                    log.warning("%d files still being written: left for later", len(self.tracker))
                    self.tracker.clear()
            self.shutdown()
        return [self._reports[p] for p in paths if p in self._reports]

    def start(self) -> None:
        """Workers, the observer, then the scan (a file dropped meanwhile is seen twice, fine)."""
        s = self.settings
        self._start_workers()
        self._watching = True
        try:
            self.watcher.start()
        except OSError as exc:
            self._watcher_ok = False
            log.error(
                "cannot watch %s (%s): %s; rescanning every %g s",
                s.drop,
                s.observer,
                exc,
                s.rescan_seconds,
            )
        self._rescan(initial=True)
        self._feed()
        log.info(
            "watching %s (%s, %d workers, settle %g s, rescan %g s)",
            s.drop,
            s.observer,
            s.workers,
            s.settle_seconds,
            s.rescan_seconds,
        )
        self.notifier.ready(self.status_line())

    def loop_once(self, timeout: float | None = None) -> None:
        """One unit of work; never raises (a failure is logged and the loop goes on)."""
        try:
            self._step(timeout)
        except Exception:
            log.exception("daemon: unexpected error; carrying on")
            time.sleep(0.5)  # an error that repeats must not spin the CPU

    def shutdown(self) -> None:
        """Stop intake, let in-flight exports finish within the stop timeout, stop workers."""
        self._stopping = True
        for path in self._drop_queued():
            self._claimed.discard(path)
        busy = len(self._claimed)
        if self._signals or self._watching:
            log.info(
                "stopping: %d exports in flight, waiting up to %g s",
                busy,
                self.settings.stop_timeout,
            )
            self.notifier.stopping(self.status_line())
        self.watcher.stop()
        self.tracker.clear()
        for _ in self._workers:
            self._work.put(None)
        deadline, forced = time.monotonic() + self.settings.stop_timeout, False
        while any(w.is_alive() for w in self._workers) and self._signals < 3:
            now = time.monotonic()
            if not forced and (self._signals >= 2 or now >= deadline):
                forced = True
                self.app.stop.set()  # the pipeline abandons: the files stay in the drop folder
                deadline = now + self.settings.http_timeout + 5
                log.warning(
                    "stopping now: %d exports abandoned after their current call",
                    len(self._claimed),
                )
            elif forced and now >= deadline:
                break
            ping = self._next_ping if self.notifier.watchdog_interval else float("inf")
            self._take_inbox(max(0.0, min(0.1, deadline - now, ping - now)))
            self._ping(time.monotonic())
            self._update_status()
        alive = sum(w.is_alive() for w in self._workers)
        if alive:
            log.error(
                "exiting with %d exports still running; their files stay in the drop folder", alive
            )
        if self._signals or self._watching:
            log.info("stopped: %s", self.status_line())

    # -- the loop --------------------------------------------------------------------------

    def _step(self, timeout: float | None) -> None:
        self._take_inbox(self._wait_time() if timeout is None else timeout)
        if self._hup:
            self._hup = False
            log.warning("SIGHUP: nxdrop does not reload its configuration; restart the service")
        now = time.monotonic()
        if self.tracker and now >= self._next_settle:
            self._next_settle = now + self._settle_every
            for path in self.tracker.due():
                self._submit(path)
        if self._watching:
            if self.watcher.overflowed():
                log.warning("the kernel dropped file events (queue overflow): rescanning")
                self.tracker.events_lost()
                self._next_rescan = now
            if now >= self._next_rescan:
                self._rescan()
            if now >= self._next_supervise:
                self._next_supervise = now + SUPERVISE_SECONDS
                self._supervise()
        self._feed()
        self._ping(now)
        self._update_status()

    def _wait_time(self) -> float:
        deadlines = [self._next_ping if self.notifier.watchdog_interval else float("inf")]
        if self._watching:
            deadlines += [self._next_rescan, self._next_supervise]
        if self.tracker:
            deadlines.append(self._next_settle)
        if self.status_line() != self._sent_status:
            deadlines.append(self._next_status)
        return min(max(0.0, min(deadlines) - time.monotonic()), SUPERVISE_SECONDS)

    def _take_inbox(self, wait: float) -> None:
        try:
            item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        for _ in range(BATCH):
            self._handle(item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return
        self._handle(item)

    def _handle(self, item: _Item) -> None:
        if isinstance(item, _Done):
            self._finished(item)
        elif item is None or self._stopping:
            return
        elif item.path in self._claimed:
            self._revisit.add(item.path)  # perhaps a new file under the same name
        elif item.kind is Kind.READY:
            self.tracker.forget(item.path)
            self._submit(item.path)
        else:
            self.tracker.note(item.path, writing=item.kind is Kind.WRITING)

    # -- claiming and feeding ----------------------------------------------------------------

    def _offer(self, path: Path) -> None:
        """A path found by a scan: queue it, or let it settle first if written just now."""
        if path in self._claimed or path in self.tracker:
            return  # the tracker knows better (a writer may be pausing)
        try:
            age = time.time() - path.lstat().st_mtime
        except OSError:
            return
        if age < self.settings.settle_seconds:
            self.tracker.note(path, age=age)
        else:
            self._submit(path)

    def _submit(self, path: Path) -> None:
        if self._stopping or path in self._claimed or not self.folder.is_candidate(path):
            return
        if len(self._pending) >= MAX_PENDING:
            self._shed = True  # memory stays flat; the rescan after the backlog finds it
            return
        self._claimed.add(path)
        self._pending.append(path)

    def _feed(self) -> None:
        while self._pending and self._work.qsize() < self.settings.queue_size:
            self._work.put(self._pending.popleft())
        if self._shed and not self._pending:
            self._shed = False
            self._next_rescan = time.monotonic()

    def _drop_queued(self) -> list[Path]:
        dropped = list(self._pending)
        self._pending.clear()
        while True:
            try:
                path = self._work.get_nowait()
            except queue.Empty:
                return dropped
            if path is not None:
                dropped.append(path)

    def _finished(self, done: _Done) -> None:
        self._claimed.discard(done.path)
        report = done.report
        if report is not None:
            self.counts[report.outcome] += 1
            when = datetime.now().strftime("%H:%M:%S")
            self._last = f"{done.path.name} {report.outcome.value} at {when}"
            if self._reports is not None:
                self._reports[done.path] = report
        if self._progress is not None:
            self._progress.advance(report is not None and report.ok)
        if done.path in self._revisit:
            self._revisit.discard(done.path)
            if not self._stopping:
                self._offer(done.path)

    def _rescan(self, *, initial: bool = False) -> None:
        self._next_rescan = time.monotonic() + self.settings.rescan_seconds
        try:
            found = [
                p for p in self.folder.scan() if p not in self._claimed and p not in self.tracker
            ]
        except OSError as exc:
            log.error("cannot read the drop folder %s: %s", self.folder.path, exc)
            return
        for path in found:
            self._offer(path)
        if found:
            what = "waiting in the drop folder" if initial else "found by the rescan, unannounced"
            log.info("%d file%s %s", len(found), "" if len(found) == 1 else "s", what)

    # -- workers ----------------------------------------------------------------------------

    def _start_workers(self) -> None:
        while len(self._workers) < self.settings.workers:
            self._workers.append(self._new_worker(len(self._workers) + 1))

    def _new_worker(self, number: int) -> threading.Thread:
        # Daemon threads: a destination call that never returns must not keep nxdrop alive.
        worker = threading.Thread(
            target=self._work_loop, name=f"nxdrop-worker-{number}", daemon=True
        )
        worker.start()
        return worker

    def _work_loop(self) -> None:
        while (path := self._work.get()) is not None:
            report = None
            try:
                report = self.app.pipeline.export_file(path)
            except BaseException:  # even SystemExit from a plugin must not kill the worker
                log.exception(
                    "%s: export failed unexpectedly; it stays in the drop folder", path.name
                )
            finally:
                self.inbox.put(_Done(path, report))
        self.inbox.put(None)  # wake the main loop: one worker fewer

    # -- health and systemd ---------------------------------------------------------------------

    def healthy(self) -> bool:
        """The observer (unless stopping) and every worker are alive."""
        workers_ok = all(w.is_alive() for w in self._workers)
        return workers_ok and (self._stopping or not self._watching or self.watcher.healthy())

    def _supervise(self) -> None:
        for i, worker in enumerate(self._workers):
            if not worker.is_alive():
                log.warning("worker %s died; starting a new one", worker.name)
                self._workers[i] = self._new_worker(i + 1)
        if self.watcher.healthy():
            return
        if self._watcher_ok:
            log.warning(
                "the %s watcher on %s died; restarting it", self.settings.observer, self.folder.path
            )
        try:
            self.watcher.restart()
        except Exception as exc:
            if self._watcher_ok:
                log.error("cannot restart the watcher: %s; rescans go on", exc)
            self._watcher_ok = False
            return
        log.warning("watcher restarted; rescanning for files it missed")
        self.tracker.events_lost()
        self._watcher_ok = True
        self._rescan()

    def _ping(self, now: float) -> None:
        interval = self.notifier.watchdog_interval
        if interval and now >= self._next_ping and self.healthy():
            self.notifier.watchdog()
            self._next_ping = now + interval

    def status_line(self) -> str:
        """What ``systemctl status`` shows: the queue, exports running, totals, the last one."""
        queued = len(self._pending) + self._work.qsize()
        busy = len(self._claimed) - queued
        failed = self.counts[Outcome.FAILED] + self.counts[Outcome.REJECTED]
        parts = [f"{queued} queued, {busy} exporting"]
        if self.tracker:
            parts[0] += f", {len(self.tracker)} settling"
        parts.append(f"{self.counts[Outcome.EXPORTED]} exported, {failed} failed")
        if self._last:
            parts.append(f"last: {self._last}")
        if self._stopping:
            parts.append("stopping")
        elif self._watching and not self.watcher.healthy():
            parts.append("watcher DOWN")
        return "; ".join(parts)

    def _update_status(self) -> None:
        now = time.monotonic()
        if now < self._next_status:
            return
        line = self.status_line()
        if line != self._sent_status:
            self._sent_status, self._next_status = line, now + STATUS_EVERY
            self.notifier.status(line)

    # -- signals --------------------------------------------------------------------------------

    @contextmanager
    def _signal_handlers(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (*STOP_SIGNALS, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Flags only, and a wake-up: SimpleQueue.put is documented safe in a signal handler.
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self._signals += 1
        self.inbox.put(None)
