"""Destinations side by side: those that do not read each other run at the same time for one
record, one that reads another waits for it alone, one that declares nothing waits for every
destination before it, and ``first_success`` keeps its strict order.

Real threads, gated by Events and Barriers: two destinations that must meet at a Barrier can
only both pass it if they are in their export at the same time, so one that ran after the
other times out and fails the test (a sequential nxdrop fails these tests that way).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from nxdrop.app import App
from nxdrop.destinations import ExportContext, ExportDestination, ExportResult
from nxdrop.destinations.archive import ArchiveDestination
from nxdrop.destinations.cdcs import CDCSDestination
from nxdrop.destinations.elabftw import ELabFTWDestination
from nxdrop.exceptions import TransientError
from nxdrop.pipeline import Outcome, Pipeline, waits_for
from nxdrop.runner import Abandoned

TIMEOUT = 10.0  # seconds: a gate nobody opens fails the test; it never hangs it


class Timeline:
    """What happened, in order, across threads: ``("start", name)`` and ``("end", name)``."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.inside: set[str] = set()
        self.most_at_once = 0

    def note(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name))
            if what == "start":
                self.inside.add(name)
                self.most_at_once = max(self.most_at_once, len(self.inside))
            elif what == "end":
                self.inside.discard(name)

    def index(self, what: str, name: str) -> int:
        return self.events.index((what, name))

    def started(self) -> list[str]:
        return [name for what, name in self.events if what == "start"]


class Plain:
    """A NexusLIMS-style destination: no base class, no ``reads``. ``during(context)`` runs
    inside its export (a gate); ``succeed`` says what it returns."""

    enabled = True

    def __init__(
        self,
        name: str,
        priority: int,
        timeline: Timeline,
        during: Callable[[ExportContext], None] = lambda context: None,
        *,
        succeed: bool = True,
    ) -> None:
        self.name, self.priority = name, priority
        self.timeline, self.during, self.succeed = timeline, during, succeed
        self.seen: list[dict[str, ExportResult]] = []

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        self.timeline.note("start", self.name)
        self.seen.append(dict(context.previous_results))
        try:
            self.during(context)
        finally:
            self.timeline.note("end", self.name)
        if not self.succeed:
            return ExportResult(False, self.name, error_message="said no")
        return ExportResult(
            True, self.name, record_id="1", record_url=f"https://{self.name}.example/1"
        )


class Declared(Plain, ExportDestination):
    """The same, subclassing ``ExportDestination`` and declaring what it reads."""

    def __init__(self, name: str, priority: int, reads: Iterable[str], *args: Any, **kw: Any):
        super().__init__(name, priority, *args, **kw)
        self.reads = frozenset(reads)


def meet(barrier: threading.Barrier) -> Callable[[ExportContext], None]:
    """A gate passed only when every party of ``barrier`` is in its export at once."""

    def wait(context: ExportContext) -> None:
        barrier.wait(TIMEOUT)  # BrokenBarrierError when the others never come

    return wait


@pytest.fixture
def pipeline(make_app: Callable[..., App]) -> Callable[..., Pipeline]:
    def build(*destinations: Any, **settings: Any) -> Pipeline:
        return make_app(*destinations, **settings).pipeline

    return build


def test_the_built_ins_declare_what_they_read() -> None:
    cdcs, elabftw, archive = CDCSDestination(), ELabFTWDestination(), ArchiveDestination()
    assert (cdcs.reads, elabftw.reads, archive.reads) == (frozenset(), {"cdcs"}, frozenset())
    # eLabFTW waits for CDCS alone; the archive for nobody
    assert waits_for([cdcs, elabftw, archive]) == [(), (0,), ()]
    # eLabFTW without CDCS runs at once
    assert waits_for([elabftw, archive]) == [(), ()]


@pytest.mark.parametrize("strategy", ["all", "best_effort"])
def test_independent_destinations_export_one_record_at_the_same_time(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], strategy: str
) -> None:
    timeline, both = Timeline(), threading.Barrier(2)
    cdcs = Declared("cdcs", 100, (), timeline, meet(both))
    archive = Declared("archive", 50, (), timeline, meet(both))
    p = pipeline(cdcs, archive, export_strategy=strategy)

    report = p.process(place())

    assert report.ok, report.error  # both passed the barrier: they were in export at once
    assert [r.destination_name for r in report.results] == ["cdcs", "archive"]
    assert all(r.success for r in report.results)
    assert cdcs.seen == archive.seen == [{}]  # neither waited for the other


def test_a_reader_waits_for_what_it_reads_and_the_rest_runs_beside(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    timeline, cdcs_and_archive, elab_started = Timeline(), threading.Barrier(2), threading.Event()

    def elab_starts(context: ExportContext) -> None:
        elab_started.set()

    def archive_waits_for_elab(context: ExportContext) -> None:
        cdcs_and_archive.wait(TIMEOUT)
        # eLabFTW does not wait for the archive: it starts while the archive is still in
        # its export (else this gate would never open)
        assert elab_started.wait(TIMEOUT), "eLabFTW waited for the archive"

    cdcs = Declared("cdcs", 100, (), timeline, meet(cdcs_and_archive))
    elabftw = Declared("elabftw", 85, {"cdcs"}, timeline, elab_starts)
    archive = Declared("archive", 50, (), timeline, archive_waits_for_elab)
    p = pipeline(cdcs, elabftw, archive)

    report = p.process(place())

    assert report.ok, report.error
    assert timeline.index("end", "cdcs") < timeline.index("start", "elabftw")
    assert timeline.index("start", "elabftw") < timeline.index("end", "archive")
    # exactly what it read: CDCS's result, never the archive's (which had not finished)
    [seen] = elabftw.seen
    assert list(seen) == ["cdcs"] and seen["cdcs"] == report.results[0]
    assert seen["cdcs"].record_url == "https://cdcs.example/1"


def test_a_reader_runs_when_what_it_reads_failed(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    timeline = Timeline()
    cdcs = Declared("cdcs", 100, (), timeline, succeed=False)
    elabftw = Declared("elabftw", 85, {"cdcs"}, timeline)
    p = pipeline(cdcs, elabftw)
    record = place()

    report = p.process(record)

    assert report.outcome is Outcome.FAILED
    [seen] = elabftw.seen  # it ran, without a link
    assert not seen["cdcs"].success
    assert [r.success for r in report.results] == [False, True]
    error = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
    assert list(error["destinations"]) == ["cdcs", "elabftw"]


def test_a_destination_declaring_nothing_waits_for_every_one_before_it(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    timeline, first_two = Timeline(), threading.Barrier(2)
    cdcs = Declared("cdcs", 100, (), timeline, meet(first_two))
    other = Declared("other", 90, (), timeline, meet(first_two))
    plugin = Plain("plugin", 60, timeline)  # NexusLIMS's interface only
    p = pipeline(cdcs, other, plugin)

    report = p.process(place())

    assert report.ok, report.error
    for earlier in ("cdcs", "other"):
        assert timeline.index("end", earlier) < timeline.index("start", "plugin")
    [seen] = plugin.seen
    assert seen == {"cdcs": report.results[0], "other": report.results[1]}


def test_first_success_runs_one_at_a_time_in_priority_order_and_stops_at_a_success(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    timeline = Timeline()
    a = Declared("a", 100, (), timeline, succeed=False)
    b = Declared("b", 85, (), timeline)
    c = Declared("c", 50, (), timeline)
    p = pipeline(c, a, b, export_strategy="first_success")  # given in any order

    report = p.process(place())

    assert report.ok
    assert timeline.most_at_once == 1
    assert timeline.started() == ["a", "b"]  # c never runs
    assert [(r.destination_name, r.success) for r in report.results] == [
        ("a", False),
        ("b", True),
    ]
    assert list(b.seen[0]) == ["a"]


def test_a_stop_while_two_run_puts_the_file_back_only_after_both_returned(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    timeline, both, release = Timeline(), threading.Barrier(2), threading.Event()
    holder: list[Pipeline] = []

    def stop_and_retry(context: ExportContext) -> None:
        both.wait(TIMEOUT)
        holder[0].stop.force()  # SIGTERM's deadline passes while both are exporting
        raise TransientError("busy", status_code=503, retry_after=60)  # → Abandoned

    def hold(context: ExportContext) -> None:
        both.wait(TIMEOUT)
        assert release.wait(TIMEOUT)

    cdcs = Declared("cdcs", 100, (), timeline, stop_and_retry)
    archive = Declared("archive", 50, (), timeline, hold)
    late = Plain("late", 10, timeline)  # waits for both: never started after the stop
    p = pipeline(cdcs, archive, late, retry_max_time=600)
    holder.append(p)
    record = place()
    abandoned = threading.Event()
    original = p.runners[0].run

    def run_cdcs(*args: Any) -> ExportResult:
        try:
            return original(*args)
        except Abandoned:
            abandoned.set()
            raise

    p.runners[0].run = run_cdcs  # type: ignore[method-assign]
    put_back_while: list[set[str]] = []
    put_back = p.work.put_back

    def noting_put_back(*args: Any) -> Path:
        with timeline.lock:
            put_back_while.append(set(timeline.inside))
        return put_back(*args)

    p.work.put_back = noting_put_back  # type: ignore[method-assign]
    reports: list[Any] = []
    worker = threading.Thread(target=lambda: reports.append(p.process(record)))
    worker.start()
    try:
        assert abandoned.wait(TIMEOUT)
        # The archive is still exporting: the file must wait for it. (Half a second for a
        # wrong nxdrop to put it back early; the right one waits for the gate below.)
        worker.join(0.5)
        assert worker.is_alive() and not record.exists()
    finally:
        release.set()
        worker.join(TIMEOUT)

    [report] = reports
    assert report.outcome is Outcome.ABANDONED
    assert record.exists() and list((drop / "uploaded").iterdir()) == []
    assert put_back_while == [set()]  # nothing was exporting when the file went back
    assert sorted(timeline.started()) == ["archive", "cdcs"]  # `late` never started
    states = {u.destination_name: u.state for u in p.store.uploads(record.stem)}
    assert states == {"cdcs": "failed", "archive": "succeeded"}  # no attempt left in flight


def test_results_and_the_log_are_in_priority_order_whoever_finishes_first(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    # The lowest priority finishes first and the highest last, all at once.
    timeline, all_three = Timeline(), threading.Barrier(3)
    archive_done, elab_done = threading.Event(), threading.Event()

    def first_of_all(context: ExportContext) -> None:
        all_three.wait(TIMEOUT)

    def second(context: ExportContext) -> None:
        all_three.wait(TIMEOUT)
        assert archive_done.wait(TIMEOUT)

    def last(context: ExportContext) -> None:
        all_three.wait(TIMEOUT)
        assert elab_done.wait(TIMEOUT)

    cdcs = Declared("cdcs", 100, (), timeline, last)
    elabftw = Declared("elabftw", 85, (), timeline, second, succeed=False)
    archive = Declared("archive", 50, (), timeline, first_of_all)
    original = {d.name: d.export for d in (archive, elabftw)}

    def finishing(name: str, done: threading.Event) -> Callable[[ExportContext], ExportResult]:
        def export(context: ExportContext) -> ExportResult:
            try:
                return original[name](context)
            finally:
                done.set()

        return export

    archive.export = finishing("archive", archive_done)  # type: ignore[method-assign]
    elabftw.export = finishing("elabftw", elab_done)  # type: ignore[method-assign]
    p = pipeline(archive, cdcs, elabftw, export_strategy="best_effort")
    record = place()

    report = p.process(record)

    assert report.ok, report.error
    ends = [name for what, name in timeline.events if what == "end"]
    assert ends == ["archive", "elabftw", "cdcs"]
    assert [r.destination_name for r in report.results] == ["cdcs", "elabftw", "archive"]
    assert [r.success for r in report.results] == [True, False, True]
    logged = {u.destination_name: (u.success, u.state) for u in p.store.uploads(record.stem)}
    assert logged == {
        "cdcs": (True, "succeeded"),
        "elabftw": (False, "failed"),
        "archive": (True, "succeeded"),
    }
    assert report.error == "elabftw: said no"
    assert p.store.session(record.stem).record_status == "COMPLETED"  # type: ignore[union-attr]


def test_reading_a_destination_that_runs_later_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    timeline = Timeline()
    early = Declared("early", 100, {"late", "absent"}, timeline)
    late = Declared("late", 10, (), timeline)
    with caplog.at_level("WARNING", logger="nxdrop"):
        assert waits_for([early, late]) == [(), ()]
    assert "early (priority 100) reads late (priority 10)" in caplog.text
    assert "absent" not in caplog.text  # not enabled: simply absent


def test_a_plain_destination_may_declare_reads_itself(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    timeline, both = Timeline(), threading.Barrier(2)
    cdcs = Declared("cdcs", 100, (), timeline)
    other = Declared("other", 90, (), timeline, meet(both))
    plugin = Plain("plugin", 60, timeline, meet(both))
    plugin.reads = ["cdcs"]  # type: ignore[attr-defined]  # any collection of names
    p = pipeline(cdcs, other, plugin)

    report = p.process(place())

    assert report.ok, report.error  # it ran beside `other`, which it does not read
    assert list(plugin.seen[0]) == ["cdcs"]


def test_a_closed_pool_leaves_the_worker_to_run_them_all(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    timeline = Timeline()
    cdcs = Declared("cdcs", 100, (), timeline)
    archive = Declared("archive", 50, (), timeline)
    p = pipeline(cdcs, archive)
    p.close()  # as at the very end of a stop: no helper thread can be had

    report = p.process(place())

    assert report.ok
    assert [r.destination_name for r in report.results] == ["cdcs", "archive"]
    assert timeline.most_at_once == 1
