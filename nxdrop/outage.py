"""A database outage as the daemon lives it: pause, look again now and then, resume.

While the database is down, a file whose outcome cannot be logged goes back into the drop
folder (:class:`Outage` remembers it), no new file is started, and the database is looked at
on a worker thread with a growing interval. Once it works, the files put back meanwhile are
offered again and the work resumes. Owned by the daemon's main thread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timedelta
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_FIRST, PROBE_MAX = 0.5, 30.0  # seconds between looks at a database that is down


class Outage:
    """Up, or down since when and why; ``connect`` is run by ``call`` to look again."""

    def __init__(
        self,
        connect: Callable[[], None],
        call: Callable[[Callable[[], None]], Future[None]],
    ) -> None:
        self.connect = connect
        self.call = call
        self.since: float | None = None  # time.monotonic() of the start, while down
        self.reason = ""
        self.deferred: list[Path] = []  # files put back meanwhile, to offer again
        self._probe: Future[None] | None = None
        self._next_probe = 0.0
        self._delay = PROBE_FIRST

    @property
    def down(self) -> bool:
        return self.since is not None

    def begin(self, reason: str, put_back: Path | None = None) -> None:
        """The database failed (said once, however many files find out)."""
        if put_back is not None:
            self.deferred.append(put_back)
        self.reason = reason
        if self.since is not None:
            return
        self.since = time.monotonic()
        self._delay = PROBE_FIRST
        self._next_probe = self.since + self._delay
        log.error(
            "the database is unavailable (%s): the work pauses; files wait in the drop "
            "folder until it is back",
            reason,
        )

    def tick(self) -> list[Path] | None:
        """Look at the database when it is time; the files to offer again once it works."""
        if self.since is None:
            return None
        now = time.monotonic()
        if self._probe is None:
            if now >= self._next_probe:
                self._probe = self.call(self.connect)
            return None
        if not self._probe.done():
            return None
        probe, self._probe = self._probe, None
        try:
            probe.result()
        except Exception as exc:  # DatabaseUnavailable, or a setting that went wrong
            self.reason = str(exc)
            self._delay = min(self._delay * 2, PROBE_MAX)
            self._next_probe = now + self._delay
            log.debug("the database is still unavailable: %s", exc)
            return None
        log.warning("the database works again after %.0f s: the work resumes", now - self.since)
        self.since = None
        resumed, self.deferred = self.deferred, []
        return resumed

    def next_wakeup(self) -> float:
        """When :meth:`tick` has something to do next (``time.monotonic()`` clock)."""
        return self._next_probe if self.since is not None and self._probe is None else float("inf")

    def status(self) -> str:
        """``database DOWN since 12:01:02 (why)`` while down, else ``""``."""
        if self.since is None:
            return ""
        started = datetime.now() - timedelta(seconds=time.monotonic() - self.since)
        return f"database DOWN since {started:%H:%M:%S} ({self.reason})"
