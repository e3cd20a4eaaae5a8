"""How many exports run at once: all workers while records wait for servers, one while
nxdrop's own work keeps a core busy (more threads would only fight for the interpreter)."""

from __future__ import annotations

from nxdrop.concurrency import WINDOW, Concurrency


class Clocks:
    """A wall clock and a CPU clock that the test moves, and the limit that reads them."""

    def __init__(self, workers: int = 4) -> None:
        self.now = 0.0
        self.used = 0.0
        self.limit = Concurrency(workers, clock=lambda: self.now, cpu=lambda: self.used)

    def run(self, seconds: float, cores: float, *, waiting: bool = True) -> int:
        """``seconds`` pass using ``cores``; the limit after a step."""
        self.now += seconds
        self.used += seconds * cores
        self.limit.step(waiting=waiting)
        return self.limit.limit

    def windows(self, count: int, cores: float) -> list[int]:
        """The limit after each of ``count`` windows using ``cores``, files waiting."""
        return [self.run(WINDOW, cores) for _ in range(count)]


def test_workers_are_added_while_records_wait_and_the_cpu_is_spare() -> None:
    clocks = Clocks()
    assert clocks.limit.limit == 1
    # Waiting for slow servers; never above NX_WORKERS.
    assert clocks.windows(5, cores=0.1) == [2, 3, 4, 4, 4]


def test_no_worker_is_added_when_nothing_waits_or_within_a_window() -> None:
    clocks = Clocks()
    assert clocks.run(WINDOW, cores=0.0, waiting=False) == 1
    assert clocks.run(WINDOW / 2, cores=0.0) == 1  # half a window: too soon to tell
    assert clocks.limit.next_step() == 2 * WINDOW  # a window after the last look


def test_workers_are_taken_away_while_nxdrop_keeps_a_core_busy() -> None:
    clocks = Clocks()
    assert clocks.windows(3, cores=0.2) == [2, 3, 4]
    # Fast servers: the threads fight for the lock.
    assert clocks.windows(4, cores=1.05) == [3, 2, 1, 1]
    # One worker, busy but not saturated: it stays.
    assert clocks.windows(1, cores=0.85) == [1]


def test_threads_that_run_side_by_side_are_kept() -> None:
    # A plugin whose C code lets go of the interpreter lock, on a machine with cores to
    # spare: four workers use three cores, and none is taken away.
    clocks = Clocks()
    assert clocks.windows(3, cores=0.2) == [2, 3, 4]
    assert clocks.windows(3, cores=3.0) == [4, 4, 4]
