"""Watching the drop folder with watchdog, and telling when a file is complete.

watchdog's traps, and where each is handled:

- ``on_created`` fires before a byte is written. A file is *ready* when it is closed after
  writing (inotify's IN_CLOSE_WRITE) or renamed into the folder (the destination of a move,
  also from outside the folder). Anything else only *changed*; the settle tracker
  (:mod:`nxdrop.settle`) takes it once its size and mtime have stood still for the settle time.
- watchdog 7 matches patterns with ``full_match`` (``*.xml`` matches nothing) and drops a
  move when either path is ignored (so ``x.part`` → ``x.xml`` would vanish): no patterns
  here, :class:`DropHandler` filters names itself.
- An exception in a handler kills the observer thread silently. :class:`DropHandler` only
  enqueues and catches everything; the daemon still checks :meth:`Watcher.healthy` and
  restarts the observer: at once when the observer's or an emitter's thread ends (the
  watcher wakes it), else at its next periodic look.
- The kernel drops events when its queue overflows and network shares send none: the daemon
  rescans; :meth:`Watcher.overflowed` tells it when to rescan at once, and the watcher
  wakes it.
- watchdog holds an unpaired IN_MOVED_FROM for 0.5 s, and every event queued behind it; each
  claim moves a file out into the working folder (``.nxdrop/work/…``). Watching the whole
  tree pairs those moves at once.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Literal

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver

from nxdrop.folders import DropFolder, is_record_name
from nxdrop.sighting import Kind, Sighting, Sink

log = logging.getLogger(__name__)

# The events the handler uses. Asking for no others keeps the kernel from queueing an
# open and a close-without-write for every read of a record (the pipeline's own, too).
EVENTS = (FileClosedEvent, FileCreatedEvent, FileModifiedEvent, FileMovedEvent)

# watchdog reports an inotify queue overflow only as this logger's warning.
OVERFLOW_LOGGER = "watchdog.observers.inotify_c"


class DropHandler(FileSystemEventHandler):
    """Turns watchdog events into :class:`Sighting` s for ``sink``; never raises.

    ``closes`` says whether the observer reports close events (inotify does, polling
    does not): only then does a write mean "wait for the close".
    """

    def __init__(self, folder: DropFolder, sink: Sink, *, closes: bool) -> None:
        super().__init__()
        self.folder, self.sink, self.closes = folder, sink, closes

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            for sighting in self.classify(event):
                self.sink(sighting)
        except Exception:
            # An exception escaping here would kill the observer thread, without a word.
            log.exception("watcher: cannot handle %r", event)

    def classify(self, event: FileSystemEvent) -> list[Sighting]:
        """The sightings one event makes; most events make none."""
        if event.is_directory:
            return []
        if isinstance(event, FileMovedEvent):
            # Only the destination matters: ``.part`` → ``.xml`` and moves from elsewhere
            # (whose source is "") bring a complete file in; a move out needs nothing.
            return self._sighting(event.dest_path, Kind.READY)
        if isinstance(event, FileClosedEvent):
            return self._sighting(event.src_path, Kind.READY)
        if isinstance(event, FileModifiedEvent):
            return self._sighting(event.src_path, Kind.WRITING if self.closes else Kind.CHANGED)
        if isinstance(event, FileCreatedEvent):
            # A hard link or a symbolic link is created without any close event to follow.
            return self._sighting(event.src_path, Kind.CHANGED)
        return []

    def _sighting(self, raw: bytes | str, kind: Kind) -> list[Sighting]:
        if not raw:
            return []
        path = Path(os.fsdecode(raw))
        if not (is_record_name(path.name) and self.folder.holds(path)):
            return []
        return [Sighting(path, kind)]


class _OverflowAlarm(logging.Handler):
    def __init__(self, flag: threading.Event, sink: Sink) -> None:
        super().__init__(logging.WARNING)
        self.flag, self.sink = flag, sink

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self.flag.set()
            self.sink(None)


class Watcher:
    """The observer on the drop folder: start, stop, health, restart."""

    def __init__(
        self,
        folder: DropFolder,
        kind: Literal["inotify", "polling"],
        settle_seconds: float,
        sink: Sink,
    ) -> None:
        self.folder, self.kind, self.sink = folder, kind, sink
        # Two polls per settle time: a file is taken about 1.5 settle times after its last change.
        self.poll_interval = min(1.0, settle_seconds / 2)
        self.observer: BaseObserver | None = None
        self.handler: DropHandler | None = None
        self._overflow = threading.Event()
        self._alarm = _OverflowAlarm(self._overflow, sink)
        self._ended = threading.Event()  # a thread of the observer ended: look at it now

    def start(self) -> None:
        """Watch the folder; raises ``OSError`` when the folder cannot be watched."""
        handler = DropHandler(self.folder, self.sink, closes=self.kind == "inotify")
        observer = self._make_observer()
        # inotify watches the subfolders too, so that the move of a claimed file into the
        # working folder pairs up at once: watchdog holds an unpaired IN_MOVED_FROM for
        # 0.5 s, and every event behind it. Polling would walk uploaded/ (large): it stays flat.
        recursive = self.kind == "inotify"
        try:
            observer.schedule(
                handler, str(self.folder.path), recursive=recursive, event_filter=list(EVENTS)
            )
            for thread in (observer, *observer.emitters):
                self._tell_when_ended(thread)
            observer.start()
        except BaseException:
            observer.stop()  # an inotify observer has a reader thread from birth
            raise
        self.observer, self.handler = observer, handler
        logging.getLogger(OVERFLOW_LOGGER).addHandler(self._alarm)

    def stop(self) -> None:
        """Stop watching (also after the observer died)."""
        logging.getLogger(OVERFLOW_LOGGER).removeHandler(self._alarm)
        observer, self.observer = self.observer, None
        if observer is None:
            return
        try:
            observer.stop()
            observer.join(timeout=5)
        except Exception:
            log.exception("watcher: stopping the observer failed")

    def restart(self) -> None:
        """A fresh observer in place of the old one."""
        self.stop()
        self.start()

    def healthy(self) -> bool:
        """Whether events are flowing: the observer thread and its emitters are alive."""
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        emitters = list(observer.emitters)
        if not emitters or not all(e.is_alive() for e in emitters):
            return False  # e.g. the watched folder was deleted: alive, but deaf
        reader = getattr(observer, "_inotify_fd", None)  # the thread that reads inotify
        return not isinstance(reader, threading.Thread) or reader.is_alive()

    def overflowed(self) -> bool:
        """Whether the kernel dropped events since the last call."""
        return _taken(self._overflow)

    def ended(self) -> bool:
        """Whether a thread of the observer ended since the last call (also by a stop)."""
        return _taken(self._ended)

    def _tell_when_ended(self, thread: threading.Thread) -> None:
        """Wake the daemon when ``thread`` ends, however: it then restarts the observer at
        once, not at its next periodic look (an idle daemon wakes seldom)."""
        run = thread.run

        def run_and_tell() -> None:
            try:
                run()
            finally:
                self._ended.set()
                self.sink(None)

        thread.run = run_and_tell  # type: ignore[method-assign]

    def _make_observer(self) -> BaseObserver:
        if self.kind == "polling":
            from watchdog.observers.polling import PollingObserver

            return PollingObserver(timeout=self.poll_interval)
        from watchdog.observers.inotify import InotifyObserver

        # Full events: a move in from outside the folder is a move (ready), not a create.
        return InotifyObserver(generate_full_events=True)


def _taken(flag: threading.Event) -> bool:
    """Whether ``flag`` was set; it is cleared."""
    if flag.is_set():
        flag.clear()
        return True
    return False
