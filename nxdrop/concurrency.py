"""How many exports run at once: up to ``NX_WORKERS``, fewer where more cannot help.

Workers overlap the time records spend waiting for servers. Python runs one thread at a
time (the interpreter lock), so once nxdrop's threads keep a whole core busy, another
worker adds no speed, only contention: each thread then waits for the lock at every
system call (a record makes about a hundred), two context switches each, which cost more
CPU than the record's own work (measured with 0 ms servers: 3.6 ms a record with one
worker, 5.0 ms with four). So the limit starts at one and follows the process's own CPU
use, measured over short windows: up by one while it uses less than three quarters of a
core and files wait (slow servers: all workers within a second), down by one while it
uses about one core (but not while its threads use one and a half or more: then they do
run side by side).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

WINDOW = 0.25  # seconds of the process's CPU use behind each step
BUSY = 0.9  # of a core: one worker fewer
SPARE = 0.75  # of a core: one worker more, if files wait
# Of cores: the threads run side by side after all (a plugin's C code that lets go of the
# lock, on a machine with cores to spare): they are kept.
PARALLEL = 1.5


class Concurrency:
    """The number of exports that may run now; owned by the daemon's main thread."""

    def __init__(
        self,
        workers: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.process_time,  # this process's, all its threads'
    ) -> None:
        self.workers = workers
        self.limit = 1
        self.clock, self.cpu = clock, cpu
        self._since = clock()
        self._cpu = cpu()

    def next_step(self) -> float:
        """When :meth:`step` may change the limit next (``time.monotonic()`` clock)."""
        return self._since + WINDOW

    def step(self, *, waiting: bool) -> None:
        """Look at the CPU used since the last step, once a window has passed."""
        now = self.clock()
        if now - self._since < WINDOW:
            return
        cpu = self.cpu()
        use = (cpu - self._cpu) / (now - self._since)
        self._since, self._cpu = now, cpu
        limit = self.limit
        if BUSY <= use < PARALLEL and limit > 1:
            self.limit -= 1
        elif use < SPARE and waiting and limit < self.workers:
            self.limit += 1
        if self.limit != limit:
            log.debug("%.2f of a core used: %d exports at once", use, self.limit)
