"""The intake: what in the drop folder is ready to export, from events, settling and rescans.

The observer's sightings, the settle tracker and the rescans feed one ordered set of ready
paths; the daemon takes from it as workers come free. Owned by the daemon's main thread:
the observer only puts sightings into the daemon's inbox, which hands them to
:meth:`Intake.sighting`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from nxdrop.folders import DropFolder
from nxdrop.settings import Settings
from nxdrop.settle import SettleTracker
from nxdrop.sighting import Kind, Sighting, Sink

if TYPE_CHECKING:
    from nxdrop.lookahead import Lookahead
    from nxdrop.watcher import Watcher

log = logging.getLogger(__name__)

# How often the observer is looked at, besides when one of its threads ends: one that is
# deaf (its folder was deleted and made again) is restarted, and the rescan after it finds
# what came meanwhile. As often as the shipped unit's watchdog is fed (WatchdogSec=30s).
SUPERVISE_SECONDS = 15.0


class Intake:
    """Ready paths, oldest first; with ``watch`` the folder is watched and rescanned.

    Without ``watch`` (``run --once``) it scans once, lets fresh files settle, and keeps
    every path it found. With it, at most ``cap`` paths wait here; the rest stay in the
    folder and the rescan after the backlog finds them, so memory stays flat.
    """

    def __init__(
        self,
        folder: DropFolder,
        settings: Settings,
        sink: Sink,
        *,
        known: Callable[[Path], bool],
        lookahead: Lookahead,
        watch: bool = True,
    ) -> None:
        self.folder = folder
        self.known = known  # already handed on, not yet claimed: no need to offer it again
        # Told of each path made ready, for destinations that look for many sessions at once.
        self.lookahead = lookahead
        self.settle_seconds = settings.settle_seconds
        self.rescan_seconds = settings.rescan_seconds
        self.watcher: Watcher | None = None
        if watch:
            from nxdrop.watcher import Watcher  # watchdog only where something is watched

            self.watcher = Watcher(folder, settings.observer, settings.settle_seconds, sink)
        # Without a watcher no later rescan comes: a file waits only for the settle time.
        patience = settings.rescan_seconds if watch else settings.settle_seconds
        self.tracker = SettleTracker(settings.settle_seconds, patience=patience)
        self.cap = settings.queue_size if watch else None
        self._ready: dict[str, None] = {}  # names in the drop folder: an ordered set
        self._shed = False
        self._settle_every = min(0.25, settings.settle_seconds / 4)
        now = time.monotonic()
        self._next_settle = now
        self._next_rescan = now + settings.rescan_seconds
        self._next_supervise = now + SUPERVISE_SECONDS
        self._watcher_ok = True

    # -- starting and stopping ---------------------------------------------------------

    def start(self) -> int:
        """Watch (if asked to) and scan; the number of files found."""
        if self.watcher is not None:
            try:
                self.watcher.start()
            except OSError as exc:
                self._watcher_ok = False
                log.error(
                    "cannot watch %s (%s): %s; rescanning every %g s",
                    self.folder.path,
                    self.watcher.kind,
                    exc,
                    self.rescan_seconds,
                )
        return self.rescan(initial=True)

    def stop(self) -> None:
        """Stop watching and forget what waits: it stays in the drop folder."""
        if self.watcher is not None:
            self.watcher.stop()
        self.tracker.clear()
        self._ready.clear()
        self.lookahead.clear()

    # -- what comes in ---------------------------------------------------------------------

    def sighting(self, sighting: Sighting) -> None:
        """An observer's event."""
        if sighting.kind is Kind.READY:
            self.tracker.forget(sighting.path)
            self._add(sighting.path.name)
        else:
            self.tracker.note(sighting.path, writing=sighting.kind is Kind.WRITING)

    def rescan(self, *, initial: bool = False) -> int:
        """Offer every record in the folder that nobody has yet; how many were new."""
        self._next_rescan = time.monotonic() + self.rescan_seconds
        try:
            found = self.folder.scan()
        except OSError as exc:
            log.error("cannot read the drop folder %s: %s", self.folder.path, exc)
            return 0
        now, new = time.time(), 0
        for mtime, name in found:
            path = self.folder.path / name
            if name in self._ready or path in self.tracker or self.known(path):
                continue
            new += 1
            age = now - mtime
            if age < self.settle_seconds:
                self.tracker.note(path, age=age)  # written just now: it settles first
            else:
                self._add(name)
        if new:
            what = "waiting in the drop folder" if initial else "found by the rescan, unannounced"
            log.info("%d file%s %s", new, "" if new == 1 else "s", what)
        return new

    def tick(self) -> None:
        """The periodic duties: settled files, rescans, the observer's health."""
        now = time.monotonic()
        if self.tracker and now >= self._next_settle:
            self._next_settle = now + self._settle_every
            for path in self.tracker.due():
                self._add(path.name)
        if self._shed and not self._ready:
            self._shed = False
            self._next_rescan = now  # the backlog is in: look for what did not fit
        if self.watcher is None:
            return
        if self.watcher.overflowed():
            log.warning("the kernel dropped file events (queue overflow): rescanning")
            self.tracker.events_lost()
            self._next_rescan = now
        if now >= self._next_rescan:
            self.rescan()
        if self.watcher.ended() or now >= self._next_supervise:
            self._next_supervise = now + SUPERVISE_SECONDS
            self._supervise()

    def next_wakeup(self) -> float:
        """When :meth:`tick` has something to do next (``time.monotonic()`` clock)."""
        deadlines = [float("inf")]
        if self.tracker:
            deadlines.append(self._next_settle)
        if self.watcher is not None:
            deadlines += [self._next_rescan, self._next_supervise]
        return min(deadlines)

    # -- what goes out ---------------------------------------------------------------------

    def pop(self) -> Path | None:
        """The oldest ready path, or ``None``."""
        if not self._ready:
            return None
        name = next(iter(self._ready))
        del self._ready[name]
        return self.folder.path / name

    def again(self, path: Path) -> None:
        """Offer ``path`` once more (put back into the drop folder while the work paused)."""
        self._add(path.name)

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def settling(self) -> int:
        """Files waiting to stand still."""
        return len(self.tracker)

    def give_up_settling(self) -> int:
        """Stop waiting for the files still being written; how many there were."""
        count = len(self.tracker)
        self.tracker.clear()
        return count

    def healthy(self) -> bool:
        """Whether events are flowing (always, without a watcher)."""
        return self.watcher is None or self.watcher.healthy()

    def _add(self, name: str) -> None:
        if name in self._ready:
            return
        if self.cap is not None and len(self._ready) >= self.cap:
            self._shed = True
            return
        self._ready[name] = None
        self.lookahead.expect(name)

    def _supervise(self) -> None:
        assert self.watcher is not None
        if self.watcher.healthy():
            return
        if self._watcher_ok:
            log.warning(
                "the %s watcher on %s died; restarting it", self.watcher.kind, self.folder.path
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
        self.rescan()
