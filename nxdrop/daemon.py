"""The daemon, assembled from its parts: the intake, the dispatcher, the service.

- :class:`~nxdrop.intake.Intake` turns events, settling and rescans into ready paths;
- :class:`~nxdrop.dispatch.Dispatcher` runs the per-file job on a bounded pool of
  workers, one job per session at a time;
- :class:`~nxdrop.service.Service` takes signals and talks to systemd;
- :class:`~nxdrop.outage.Outage` pauses the work while the database is down.

The main thread owns them all and runs :meth:`Daemon.loop_once`; the observer, the
workers and the signal handlers only put items into its inbox.

Health means progress: the watchdog is fed only while the observer works and no export has
run, nor work waited unstarted, for longer than ``NX_STUCK_SECONDS``.

Stopping: the first SIGTERM/SIGINT stops intake (what waits stays in the drop folder),
abandons at once the records waiting to retry, and lets the exports in flight finish for up
to ``NX_STOP_TIMEOUT`` seconds; then the rest are abandoned after their current call and
their files put back into the drop folder. A second signal abandons at once; a third stops
waiting. The exit code of a stop is 0: systemd must not count it as a failure.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime

from nxdrop.app import App
from nxdrop.dispatch import Dispatcher, Done
from nxdrop.intake import Intake
from nxdrop.outage import Outage
from nxdrop.pipeline import Outcome
from nxdrop.progress import Progress
from nxdrop.service import Service
from nxdrop.sighting import Sighting
from nxdrop.systemd import Notifier

log = logging.getLogger(__name__)

BATCH = 1000  # inbox items handled per loop before the periodic duties run again
# The loop wakes at least this often, though every duty says when it is due: on a virtual
# machine each wakeup of an idle process costs milliseconds of CPU, however little it does.
MAX_WAIT = 15.0
TEXTFILE_EVERY = 15.0  # seconds between writes of the metrics for node_exporter
CHECKPOINT_EVERY = 1.0  # seconds between SQLite checkpoints, taken here and not by a worker


@dataclass(frozen=True)
class OnceSummary:
    """What ``run --once`` did: ``ok`` only when it finished every file it found."""

    found: int
    counts: Counter[Outcome]
    crashed: int
    unsettled: int

    @property
    def not_finished(self) -> int:
        """Files found and not exported: failed, rejected, abandoned, crashed, unsettled."""
        return self.found - self.counts[Outcome.EXPORTED] - self.counts[Outcome.GONE]

    @property
    def ok(self) -> bool:
        return self.not_finished == 0


class Daemon:
    """``nxdrop run``: :meth:`run` is the service, :meth:`run_once` one pass."""

    def __init__(self, app: App, notifier: Notifier | None = None, *, watch: bool = True) -> None:
        self.app = app
        self.settings = settings = app.settings
        self.inbox: queue.SimpleQueue[Sighting | None] = queue.SimpleQueue()
        self.dispatcher = Dispatcher(app.pipeline.process, settings.workers, self._wake)
        self.intake = Intake(
            app.work.drop,
            settings,
            self.inbox.put,
            known=self.dispatcher.__contains__,
            watch=watch,
            lookahead=app.pipeline.lookahead,
        )
        self.service = Service(notifier or Notifier(), self._wake)
        self.outage = Outage(app.connect, self.dispatcher.call)
        self.counts: Counter[Outcome] = Counter()
        self.crashed = 0
        self.stuck = 0  # jobs still running when the daemon gave up waiting for them
        self._last = ""
        self._stopping = False
        self._progress: Progress | None = None
        self._last_progress = time.monotonic()  # a job started or finished, or nothing waited
        self._unhealthy = ""  # why the watchdog is not fed, once said
        self._next_textfile = 0.0
        self._next_checkpoint = 0.0

    def _wake(self) -> None:
        self.inbox.put(None)

    # -- the two ways to run ---------------------------------------------------------------

    def database_down(self, reason: str) -> None:
        """Pause the work until the database works again (said once, in the log and STATUS)."""
        self.outage.begin(reason)

    def run(self) -> int:
        """The service, until SIGTERM/SIGINT; 0 on a clean stop."""
        with self.service.signal_handlers():
            self.start()
            while not self.service.signals:
                self.loop_once()
            self.shutdown()
        return 0

    def run_once(self) -> OnceSummary:
        """Export what is in the drop folder now; files still being written get
        ``max(10, 5 × NX_SETTLE_SECONDS)`` seconds to settle."""
        unsettled = 0
        with self.service.signal_handlers():
            found = self.intake.start()
            self._progress = Progress(found)
            give_up = time.monotonic() + max(10.0, 5 * self.settings.settle_seconds)
            self._feed()
            while (self._busy() or self.outage.deferred) and not self.service.signals:
                self.loop_once()
                if self.intake.settling and time.monotonic() > give_up:
                    unsettled = self.intake.give_up_settling()
                    log.warning("%d files still being written: left for later", unsettled)
            self.shutdown()
        return OnceSummary(found, self.counts, self.crashed, unsettled)

    def start(self) -> None:
        """Watch, scan, start exporting, and tell systemd we are ready."""
        s = self.settings
        if s.metrics_address:
            self.app.metrics.serve(s.metrics_address)
        self.intake.start()
        self._feed()
        log.info(
            "watching %s (%s, %d workers, settle %g s, rescan %g s)",
            s.drop,
            s.observer,
            s.workers,
            s.settle_seconds,
            s.rescan_seconds,
        )
        self.service.ready(self.status_line())

    def loop_once(self, timeout: float | None = None) -> None:
        """One unit of work; never raises (a failure is logged and the loop goes on)."""
        try:
            self._step(timeout)
        except Exception:
            log.exception("daemon: unexpected error; carrying on")
            time.sleep(0.5)  # an error that repeats must not spin the CPU

    def shutdown(self) -> None:
        """Stop intake, let in-flight exports finish within the stop timeout, put back the rest."""
        self._stopping = True
        self.app.stop.request()
        self.dispatcher.drop_waiting()
        self.intake.stop()
        loud = bool(self.service.signals) or self.intake.watcher is not None
        if loud:
            log.info(
                "stopping: %d exports in flight, waiting up to %g s",
                self.dispatcher.running,
                self.settings.stop_timeout,
            )
            self.service.stopping(self.status_line())
        deadline, forced = time.monotonic() + self.settings.stop_timeout, False
        while self.dispatcher.running and self.service.signals < 3:
            now = time.monotonic()
            if not forced and (self.service.signals >= 2 or now >= deadline):
                forced = True
                self.app.stop.force()
                deadline = now + self.settings.http_timeout + 5
                log.warning(
                    "stopping now: %d exports abandoned after their current call",
                    self.dispatcher.running,
                )
            elif forced and now >= deadline:
                break
            self._take_inbox(max(0.0, min(0.1, deadline - now)))
            self._reap()
            self.service.tick(self.healthy(), self.status_line)
        self.stuck = self.dispatcher.running
        self.dispatcher.shutdown()
        if self.stuck:
            back = self.app.put_back_held()
            log.error(
                "exiting with %d exports still running; %d files put back into the drop folder",
                self.stuck,
                back,
            )
        self._measure(final=True)
        self.app.metrics.close()
        if loud:
            log.info("stopped: %s", self.status_line())

    # -- the loop ----------------------------------------------------------------------------

    def _step(self, timeout: float | None) -> None:
        self._take_inbox(self._wait_time() if timeout is None else timeout)
        if self.service.take_hup():
            log.warning("SIGHUP: nxdrop does not reload its configuration; restart the service")
        self._reap()
        for path in self.outage.tick() or ():
            self.intake.again(path)
        self.intake.tick()
        self._feed()
        self.service.tick(self.healthy(), self.status_line)
        self._measure()
        self._checkpoint()

    def _measure(self, *, final: bool = False) -> None:
        """Bring the gauges up to date; write the textfile now and then."""
        metrics = self.app.metrics
        metrics.gauges(
            queued=len(self.intake) + self.dispatcher.queued,
            in_flight=self.dispatcher.running,
            database_up=not self.outage.down,
        )
        path = self.settings.metrics_textfile
        now = time.monotonic()
        if path is not None and (final or now >= self._next_textfile):
            self._next_textfile = now + TEXTFILE_EVERY
            metrics.write(path)

    def _checkpoint(self) -> None:
        """The database's checkpoint, from this thread: a worker's commit never waits for
        one (latency), and the log stays small however long the backlog."""
        now = time.monotonic()
        if now >= self._next_checkpoint and not self.outage.down:
            self._next_checkpoint = now + CHECKPOINT_EVERY
            self.app.store.checkpoint()

    def _busy(self) -> bool:
        return bool(
            len(self.intake)
            or self.intake.settling
            or self.dispatcher.queued
            or self.dispatcher.running
        )

    def _wait_time(self) -> float:
        wakeup = min(
            self.intake.next_wakeup(),
            self.service.next_wakeup(self.status_line()),
            self.outage.next_wakeup(),
            self.dispatcher.next_wakeup(),
            self._next_checkpoint if self.app.store.checkpoint_due() else float("inf"),
        )
        return min(max(0.0, wakeup - time.monotonic()), MAX_WAIT)

    def _take_inbox(self, wait: float) -> None:
        try:
            item = self.inbox.get(timeout=wait) if wait > 0 else self.inbox.get_nowait()
        except queue.Empty:
            return
        for taken in range(1, BATCH + 1):
            if item is not None and not self._stopping:
                self.intake.sighting(item)
            if taken == BATCH:
                return  # the rest at the next turn, after the periodic duties
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _feed(self) -> None:
        now = time.monotonic()
        if not (len(self.intake) or self.dispatcher.queued):
            self._last_progress = now  # nothing waits: idle is not a stall
        if self._stopping or self.outage.down:
            return
        for _ in range(2):  # fill, start, and fill again: a worker never waits for the loop
            while self.dispatcher.wants() and (path := self.intake.pop()) is not None:
                self.dispatcher.offer(path)
            if self.dispatcher.pump():
                self._last_progress = now

    def _reap(self) -> None:
        for done in self.dispatcher.reap():
            self._finished(done)

    def _finished(self, done: Done) -> None:
        self._last_progress = time.monotonic()
        report = done.report
        if report is not None and report.outcome is Outcome.DEFERRED:
            self.outage.begin(report.error or "unknown", put_back=report.moved_to)
            return
        if report is None:
            self.crashed += 1
        else:
            self.counts[report.outcome] += 1
            if report.outcome is not Outcome.GONE:
                self.app.metrics.record_done(report.outcome.value)
            if report.outcome is not Outcome.GONE:
                when = datetime.now().strftime("%H:%M:%S")
                self._last = f"{done.path.name} {report.outcome.value} at {when}"
        if self._progress is not None:
            self._progress.advance(report is not None and report.ok)

    # -- health and status ---------------------------------------------------------------------

    def healthy(self) -> bool:
        """Whether work moves: the observer works, no export is stuck, nothing waits in vain.

        A database that is down is not unhealthy: the daemon waits it out by itself.
        """
        if self._stopping:
            return True
        why = self._stalled()
        if why != self._unhealthy:
            self._unhealthy = why
            if why:
                log.error("nxdrop is stuck: %s; the watchdog is no longer fed", why)
            else:
                log.warning("nxdrop moves again; the watchdog is fed again")
        return not why and self.intake.healthy()

    def _stalled(self) -> str:
        """Why the work does not move, or ``""``."""
        limit = self.settings.stuck_seconds
        oldest = self.dispatcher.oldest_running()
        if oldest is not None and oldest > limit:
            return f"an export has run for {oldest:.0f} s (NX_STUCK_SECONDS={limit:g})"
        idle = time.monotonic() - self._last_progress
        if not self.outage.down and idle > limit:
            return f"files wait and nothing has started for {idle:.0f} s"
        return ""

    def status_line(self) -> str:
        """What ``systemctl status`` shows: the queue, exports running, totals, the last one."""
        queued = len(self.intake) + self.dispatcher.queued
        parts = [f"{queued} queued, {self.dispatcher.running} exporting"]
        if self.intake.settling:
            parts[0] += f", {self.intake.settling} settling"
        failed = self.counts[Outcome.FAILED] + self.counts[Outcome.REJECTED]
        parts.append(f"{self.counts[Outcome.EXPORTED]} exported, {failed} failed")
        if self._last:
            parts.append(f"last: {self._last}")
        if self.outage.down:
            parts.insert(0, self.outage.status())
        if self._stopping:
            parts.append("stopping")
        elif not self.intake.healthy():
            parts.append("watcher DOWN")
        elif self._unhealthy:
            parts.append(f"STUCK: {self._unhealthy}")
        return "; ".join(parts)
