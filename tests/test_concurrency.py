"""How many exports run at once: all workers while records wait for servers, one while
nxdrop's own work keeps a core busy (more threads would only fight for the interpreter)."""

from __future__ import annotations

from nxdrop.concurrency import WINDOW, Concurrency


class Clocks:
    """A wall clock and a CPU clock that the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.used = 0.0

    def run(self, seconds: float, cores: float) -> None:
        self.now += seconds
        self.used += seconds * cores


def test_workers_are_added_while_records_wait_and_the_cpu_is_spare() -> None:
    clocks = Clocks()
    limit = Concurrency(4, clock=lambda: clocks.now, cpu=lambda: clocks.used)
    assert limit.limit == 1
    seen = []
    for _ in range(5):
        clocks.run(WINDOW, cores=0.1)  # waiting for slow servers
        limit.step(waiting=True)
        seen.append(limit.limit)
    assert seen == [2, 3, 4, 4, 4]  # never above NX_WORKERS


def test_no_worker_is_added_when_nothing_waits_or_within_a_window() -> None:
    clocks = Clocks()
    limit = Concurrency(4, clock=lambda: clocks.now, cpu=lambda: clocks.used)
    clocks.run(WINDOW, cores=0.0)
    limit.step(waiting=False)
    assert limit.limit == 1
    clocks.run(WINDOW / 2, cores=0.0)
    limit.step(waiting=True)  # half a window: too soon to tell
    assert limit.limit == 1
    assert limit.next_step() == 2 * WINDOW  # a window after the last look


def test_workers_are_taken_away_while_nxdrop_keeps_a_core_busy() -> None:
    clocks = Clocks()
    limit = Concurrency(4, clock=lambda: clocks.now, cpu=lambda: clocks.used)
    for _ in range(3):
        clocks.run(WINDOW, cores=0.2)
        limit.step(waiting=True)
    assert limit.limit == 4
    seen = []
    for _ in range(4):
        clocks.run(WINDOW, cores=1.05)  # fast servers: the threads fight for the lock
        limit.step(waiting=True)
        seen.append(limit.limit)
    assert seen == [3, 2, 1, 1]
    clocks.run(WINDOW, cores=0.85)  # one worker, busy but not saturated: it stays
    limit.step(waiting=True)
    assert limit.limit == 1


def test_threads_that_run_side_by_side_are_kept() -> None:
    # A plugin whose C code lets go of the interpreter lock, on a machine with cores to
    # spare: four workers use three cores, and none is taken away.
    clocks = Clocks()
    limit = Concurrency(4, clock=lambda: clocks.now, cpu=lambda: clocks.used)
    for _ in range(3):
        clocks.run(WINDOW, cores=0.2)
        limit.step(waiting=True)
    for _ in range(3):
        clocks.run(WINDOW, cores=3.0)
        limit.step(waiting=True)
    assert limit.limit == 4
