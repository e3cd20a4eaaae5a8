"""The per-file job: strategies × failures, retries, reuse, updates, bad records, claims, and
where files end up."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyObserver

from nxdrop.app import App
from nxdrop.destinations import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import PermanentError, TransientError
from nxdrop.folders import DropFolder, WorkFolder
from nxdrop.pipeline import Outcome, Pipeline


class Scripted:
    """A plugin-like destination that does what its script says, one step per call."""

    def __init__(self, name: str, priority: int, *steps: str, retry_after: float = 0.01) -> None:
        self.name, self.priority = name, priority
        self.steps = list(steps)
        self.retry_after = retry_after
        self.calls: list[ExportContext] = []
        self.seen: list[dict[str, ExportResult]] = []

    enabled = True

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> Any:
        self.calls.append(context)
        self.seen.append(dict(context.previous_results))
        step = self.steps.pop(0) if len(self.steps) > 1 else self.steps[0]
        if step == "ok":
            return ExportResult(
                True,
                self.name,
                record_id=f"{self.name}-1",
                record_url=f"https://{self.name}.example/1",
            )
        if step == "fail":
            return ExportResult(False, self.name, error_message="said no")
        if step == "raise":
            raise RuntimeError("plugin bug")
        if step == "transient":
            raise TransientError("busy", status_code=503, retry_after=self.retry_after)
        if step == "permanent":
            raise PermanentError("rejected", status_code=400)
        if step == "none":
            return None
        raise AssertionError(step)


@pytest.fixture
def pipeline(make_app: Callable[..., App]) -> Callable[..., Pipeline]:
    def build(*destinations: Any, **settings: Any) -> Pipeline:
        return make_app(*destinations, **settings).pipeline

    return build


# strategy, scripts of destinations a (100), b (85), c (50), exported?, which were called
STRATEGY_TABLE = [
    ("all", ["ok", "ok", "ok"], True, "abc"),
    ("all", ["ok", "fail", "ok"], False, "abc"),
    ("all", ["raise", "ok", "ok"], False, "abc"),
    ("all", ["ok", "ok", "permanent"], False, "abc"),
    ("all", ["ok", "none", "ok"], False, "abc"),
    ("first_success", ["ok", "ok", "ok"], True, "a"),
    ("first_success", ["fail", "ok", "ok"], True, "ab"),
    ("first_success", ["raise", "permanent", "ok"], True, "abc"),
    ("first_success", ["fail", "raise", "fail"], False, "abc"),
    ("best_effort", ["fail", "ok", "raise"], True, "abc"),
    ("best_effort", ["ok", "fail", "fail"], True, "abc"),
    ("best_effort", ["fail", "permanent", "raise"], False, "abc"),
]


@pytest.mark.parametrize(("strategy", "scripts", "exported", "called"), STRATEGY_TABLE)
def test_strategy_decides_outcome_and_which_destinations_run(
    pipeline: Callable[..., Pipeline],
    place: Callable[..., Path],
    drop: Path,
    strategy: str,
    scripts: list[str],
    exported: bool,
    called: str,
) -> None:
    dests = [Scripted(n, p, s) for n, p, s in zip("abc", (100, 85, 50), scripts, strict=True)]
    p = pipeline(*dests, export_strategy=strategy)
    record = place()
    content = record.read_bytes()

    report = p.process(record)

    assert report.ok is exported
    assert "".join(d.name for d in dests if d.calls) == called
    assert not record.exists()
    folder = drop / ("uploaded" if exported else "failed")
    assert (folder / record.name).read_bytes() == content
    session = p.store.session(record.stem)
    assert session is not None
    assert session.record_status == ("COMPLETED" if exported else "BUILT_NOT_EXPORTED")
    logged = {u.destination_name: u.success for u in p.store.uploads(record.stem)}
    assert logged == {d.name: s == "ok" for d, s in zip(dests, scripts, strict=True) if d.calls}
    if not exported:
        report_file = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
        assert set(report_file["destinations"]) == set(called)
        for name in called:
            entry = report_file["destinations"][name]
            assert entry["success"] is (scripts["abc".index(name)] == "ok")
            assert entry["attempts"] == 1


def test_later_destination_sees_earlier_results(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    first, second = Scripted("cdcs", 100, "ok"), Scripted("elabftw", 85, "ok")
    pipeline(first, second).process(place())

    assert first.seen == [{}]
    cdcs = second.seen[0]["cdcs"]
    assert cdcs.success and cdcs.record_url == "https://cdcs.example/1"
    assert second.calls[0].get_result("cdcs") is cdcs
    assert second.calls[0].get_result("nowhere") is None


def test_context_describes_the_record(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "ok")
    pipeline(dest).process(place(name="2018-11-13_FEI-Titan-TEM_204.xml"))

    ctx = dest.calls[0]
    assert ctx.session_identifier == "2018-11-13_FEI-Titan-TEM_204"
    assert ctx.instrument_pid == "FEI-Titan-TEM"
    assert ctx.user == "Ned Land (ned)"
    assert ctx.dt_from is not None and ctx.dt_from.isoformat() == "2018-11-13T10:00:00-07:00"
    assert ctx.dt_to is not None and ctx.dt_to.isoformat() == "2018-11-13T15:00:00-07:00"
    assert ctx.xml_file_path.name == "2018-11-13_FEI-Titan-TEM_204.xml"


def test_transient_failures_are_retried_within_the_budget(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "transient", "transient", "ok")
    p = pipeline(dest, retry_max_time=30)
    record = place()

    assert p.process(record).ok
    assert len(dest.calls) == 3
    [row] = p.store.uploads(record.stem)
    assert row.success and row.attempts == 3


def test_retry_gives_up_when_the_server_asks_to_wait_past_the_budget(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "transient", retry_after=3600)
    p = pipeline(dest, retry_max_time=5)
    record = place()

    report = p.process(record)

    assert report.outcome is Outcome.FAILED and len(dest.calls) == 1
    error = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
    assert error["destinations"]["a"]["status_code"] == 503
    assert "gave up retrying" in error["destinations"]["a"]["error"]


def test_permanent_failures_are_not_retried(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "permanent")
    pipeline(dest, retry_max_time=30).process(place())
    assert len(dest.calls) == 1


def test_stop_during_retry_abandons_and_leaves_the_file_in_place(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "transient", retry_after=60)
    p = pipeline(dest, retry_max_time=600)
    record = place()
    original = dest.export

    def export_then_stop(context: ExportContext) -> Any:
        try:
            return original(context)
        finally:
            p.stop.request()  # as SIGTERM would, while the destination asks to wait

    dest.export = export_then_stop  # type: ignore[method-assign]
    report = p.process(record)

    assert report.outcome is Outcome.ABANDONED
    assert record.exists()
    assert not (drop / "failed" / record.name).exists()


def test_identical_record_is_not_sent_twice(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    p = pipeline(dest)
    first = p.process(place())
    again = p.process(place())  # the builder drops the same bytes once more

    assert first.ok and again.ok
    assert len(dest.calls) == 1
    assert again.results[0].record_url == first.results[0].record_url
    assert sorted(f.name for f in (drop / "uploaded").iterdir()) == [
        "example_record.1.xml",
        "example_record.xml",
    ]
    states = [u.state for u in p.store.uploads("example_record")]
    assert states == ["succeeded", "reused"]


def test_retry_after_partial_failure_sends_only_to_the_failed_destination(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    good, flaky = Scripted("cdcs", 100, "ok"), Scripted("elabftw", 85, "fail", "ok")
    p = pipeline(good, flaky)
    record = place()
    assert not p.process(record).ok

    p.folder.retry([record.name])  # what an operator does
    assert p.process(record).ok

    assert len(good.calls) == 1 and len(flaky.calls) == 2
    assert flaky.seen[1]["cdcs"].record_url == "https://cdcs.example/1"
    assert not (drop / "failed" / f"{record.name}.error.json").exists()
    assert p.store.session("example_record").record_status == "COMPLETED"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "empty"),
        (b"<Experiment><title>unclosed", "not well-formed"),
        (
            b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
            b"<Experiment>&e;</Experiment>",
            "DOCTYPE",
        ),
        (b"<html><body/></html>", "not a NexusLIMS"),
    ],
)
def test_bad_records_fail_without_contacting_any_destination(
    pipeline: Callable[..., Pipeline], drop: Path, content: bytes, reason: str
) -> None:
    dest = Scripted("a", 1, "ok")
    p = pipeline(dest)
    record = drop / "2024-01-01_bad.xml"
    record.write_bytes(content)

    report = p.process(record)

    assert report.outcome is Outcome.REJECTED and reason in (report.error or "")
    assert dest.calls == []
    assert (drop / "failed" / record.name).read_bytes() == content
    error = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
    assert reason in error["error"] and error["destinations"] == {}
    assert p.store.session("2024-01-01_bad").record_status == "ERROR"  # type: ignore[union-attr]


def test_too_large_and_schema_invalid_records_are_refused(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], corpus: Path, drop: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    small = pipeline(dest, max_record_bytes=1000)
    assert small.process(place()).outcome is Outcome.REJECTED

    strict = pipeline(dest, schema_path=corpus / "nexus-experiment.xsd")
    invalid = drop / "invalid.xml"
    invalid.write_bytes(
        (corpus / "example_record_curation.xml")
        .read_bytes()
        .replace(b"<title>", b"<bogus/><title>", 1)
    )
    report = strict.process(invalid)
    assert report.outcome is Outcome.REJECTED and "schema" in (report.error or "")
    assert strict.process(place("example_record_curation.xml")).ok
    assert len(dest.calls) == 1


def test_symbolic_link_is_refused_and_its_target_never_read(
    pipeline: Callable[..., Pipeline], drop: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<Experiment><title>secret</title></Experiment>")
    link = drop / "link.xml"
    link.symlink_to(secret)
    dest = Scripted("a", 1, "ok")

    report = pipeline(dest).process(link)

    assert report.outcome is Outcome.REJECTED and "symbolic link" in (report.error or "")
    assert dest.calls == []
    moved = drop / "failed" / "link.xml"
    assert moved.is_symlink() and secret.exists()


def test_files_outside_the_drop_folder_stay_where_they_are(
    pipeline: Callable[..., Pipeline], corpus: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    source = corpus / "example_record.xml"
    assert pipeline(dest).process(source).ok
    assert source.exists()


@pytest.mark.parametrize("strategy", ["all", "best_effort"])
def test_stop_between_destinations_leaves_the_file_for_the_next_start(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path, strategy: str
) -> None:
    first, second = Scripted("cdcs", 100, "ok"), Scripted("elabftw", 85, "ok")
    p = pipeline(first, second, export_strategy=strategy)
    original = first.export

    def export_then_stop(context: ExportContext) -> Any:
        try:
            return original(context)
        finally:
            p.stop.force()  # SIGTERM's deadline passes while CDCS is being called

    first.export = export_then_stop  # type: ignore[method-assign]
    record = place()

    report = p.process(record)

    assert report.outcome is Outcome.ABANDONED
    assert second.calls == []
    assert record.exists()
    assert list((drop / "uploaded").iterdir()) == []


def test_a_file_another_process_claimed_is_left_to_it(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    p = pipeline(dest)
    record = place()
    other, _ = WorkFolder.acquire(DropFolder(drop))  # another nxdrop on this host
    try:
        assert other.worker != p.work.worker
        claimed = other.claim(record)
        report = p.process(record)
    finally:
        other.release()
    assert report.outcome is Outcome.GONE
    assert dest.calls == []
    assert claimed is not None and claimed.exists()


# -- one session, one record ----------------------------------------------------------------


class Keeper(ExportDestination):
    """A stateful destination with the optional hooks: one record per session, updated in
    place; it remembers every call and what the context said."""

    def __init__(self, name: str = "keeper", endpoint: str = "keeper://one") -> None:
        self.name, self.priority, self._endpoint = name, 10, endpoint
        self.records: dict[str, bytes] = {}  # record id → content
        self.calls: list[tuple[str, ExportContext]] = []
        self.on_export: Callable[[ExportContext], None] = lambda context: None

    @property
    def endpoint(self) -> str:
        return self._endpoint

    def export(self, context: ExportContext) -> ExportResult:
        self.calls.append(("export", context))
        self.on_export(context)
        record_id = f"r{len(self.records) + 1}"
        self.records[record_id] = context.content
        return ExportResult(True, self.name, record_id=record_id)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        self.calls.append(("update", context))
        assert previous.record_id is not None
        self.records[previous.record_id] = context.content
        return ExportResult(True, self.name, record_id=previous.record_id)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        self.calls.append(("reconcile", context))
        return earlier


def version(corpus: Path, n: int) -> bytes:
    """The corpus record with a trailing comment: a rebuilt version ``n`` of one session."""
    return (corpus / "example_record.xml").read_bytes() + f"<!-- version {n} -->\n".encode()


def test_new_content_for_a_session_updates_its_one_record(
    pipeline: Callable[..., Pipeline], drop: Path, corpus: Path
) -> None:
    keeper = Keeper()
    p = pipeline(keeper)
    for n in (1, 2, 2):  # built, rebuilt, and the rebuild dropped again
        (drop / "x.xml").write_bytes(version(corpus, n))
        assert p.process(drop / "x.xml").ok

    assert keeper.records == {"r1": version(corpus, 2)}
    assert [kind for kind, _ in keeper.calls] == ["export", "update", "reconcile"]
    assert [u.state for u in p.store.uploads("x")] == ["succeeded", "updated", "reused"]
    assert [u.record_id for u in p.store.uploads("x")] == ["r1"] * 3
    assert sorted(f.name for f in (drop / "uploaded").iterdir()) == ["x.1.xml", "x.2.xml", "x.xml"]


def test_a_nexuslims_plugin_without_update_is_sent_the_new_version(
    pipeline: Callable[..., Pipeline], drop: Path, corpus: Path
) -> None:
    dest = Scripted("plain", 1, "ok")  # NexusLIMS's interface only: no hooks, no base class
    p = pipeline(dest)
    for n in (1, 2):
        (drop / "x.xml").write_bytes(version(corpus, n))
        assert p.process(drop / "x.xml").ok
    assert [c.content for c in dest.calls] == [version(corpus, 1), version(corpus, 2)]
    assert [u.state for u in p.store.uploads("x")] == ["succeeded", "updated"]


def test_a_result_from_another_endpoint_is_never_reused(
    pipeline: Callable[..., Pipeline],
    drop: Path,
    corpus: Path,
) -> None:
    staging = Keeper(endpoint="https://staging.example/")
    p = pipeline(staging)
    (drop / "x.xml").write_bytes(version(corpus, 1))
    assert p.process(drop / "x.xml").ok
    p.work.release()

    production = Keeper(endpoint="https://production.example/")  # the URL was changed
    p = pipeline(production)
    (drop / "x.xml").write_bytes(version(corpus, 1))
    assert p.process(drop / "x.xml").ok

    assert [kind for kind, _ in production.calls] == ["export"]
    rows = p.store.uploads("x")
    assert [(u.endpoint, u.state) for u in rows] == [
        ("https://staging.example/", "succeeded"),
        ("https://production.example/", "succeeded"),
    ]


def test_a_file_changed_while_it_is_exported_is_exported_again(
    pipeline: Callable[..., Pipeline], drop: Path, corpus: Path
) -> None:
    keeper = Keeper()

    def builder_appends_once(context: ExportContext) -> None:
        if len(keeper.calls) == 1:  # a writer that still had the file open adds to it
            with context.xml_file_path.open("ab") as fh:
                fh.write(b"<!-- appended -->\n")

    keeper.on_export = builder_appends_once
    p = pipeline(keeper)
    (drop / "x.xml").write_bytes(version(corpus, 1))

    report = p.process(drop / "x.xml")

    final = version(corpus, 1) + b"<!-- appended -->\n"
    assert report.ok
    assert keeper.records == {"r1": final}  # the destination holds what uploaded/ holds
    assert (drop / "uploaded" / "x.xml").read_bytes() == final
    assert [kind for kind, _ in keeper.calls] == ["export", "update"]


def test_a_file_that_keeps_changing_is_not_called_exported(
    pipeline: Callable[..., Pipeline], drop: Path, corpus: Path
) -> None:
    def append(context: ExportContext) -> None:
        with context.xml_file_path.open("ab") as fh:
            fh.write(b"<!-- more -->\n")

    class Restless(Keeper):  # the writer is faster than every export
        def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
            append(context)
            return super().update(context, previous)

    keeper = Restless()
    keeper.on_export = append
    p = pipeline(keeper)
    (drop / "x.xml").write_bytes(version(corpus, 1))

    report = p.process(drop / "x.xml")

    assert report.outcome is Outcome.FAILED and "kept changing" in (report.error or "")
    assert (drop / "failed" / "x.xml").exists()
    assert not (drop / "uploaded" / "x.xml").exists()


def test_the_next_attempt_after_a_crash_is_told_it_was_interrupted(
    pipeline: Callable[..., Pipeline], drop: Path, corpus: Path
) -> None:
    keeper = Keeper()
    p = pipeline(keeper)
    (drop / "x.xml").write_bytes(version(corpus, 1))
    record = p.reader.read(drop / "x.xml")
    # What a process killed mid-call leaves: an in-flight row, and the file in its folder.
    p.store.begin_attempt(record, keeper.name, keeper.endpoint, p.work.worker)
    p.work.claim(drop / "x.xml")
    p.work.release()  # the kernel releases the slot of a dead process

    again = pipeline(keeper)  # the next start takes the slot and recovers it
    assert again.work.worker == p.work.worker
    assert (drop / "x.xml").exists()  # put back
    assert [u.state for u in again.store.uploads("x")] == ["interrupted"]

    assert again.process(drop / "x.xml").ok
    [(kind, context)] = keeper.calls
    assert kind == "export" and context.interrupted
    assert [u.state for u in again.store.uploads("x")] == ["interrupted", "succeeded"]


def test_two_processes_export_one_session_one_after_the_other(
    pipeline: Callable[..., Pipeline],
    drop: Path,
    corpus: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keeper = Keeper()
    p = pipeline(keeper)
    # Another daemon sharing the database holds session x (it is exporting x.xml).
    assert p.store.lock_session("x", "elsewhere-0", "x.xml")
    (drop / "x.1.xml").write_bytes(version(corpus, 1))
    done: list[Outcome] = []
    worker = threading.Thread(target=lambda: done.append(p.process(drop / "x.1.xml").outcome))
    with caplog.at_level(logging.INFO, logger="nxdrop"):
        worker.start()
        wait_for(lambda: "another nxdrop is exporting session x" in caplog.text)
        assert keeper.calls == [] and done == []
        p.store.unlock_session("x", "elsewhere-0")
        worker.join(timeout=30)
    assert done == [Outcome.EXPORTED]
    assert keeper.records == {"r1": version(corpus, 1)}


def test_the_reason_is_in_failed_before_the_record(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    order: list[str] = []

    class Recorder(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            path = event.dest_path if event.event_type == "moved" else event.src_path
            name = os.path.basename(os.fsdecode(path))
            if name in ("x.xml", "x.xml.error.json") and name not in order:
                order.append(name)  # the first moment each name appears in failed/

    p = pipeline(Scripted("a", 1, "fail"))
    observer = InotifyObserver(generate_full_events=True)
    observer.schedule(Recorder(), str(drop / "failed"))
    observer.start()
    try:
        assert p.process(place(name="x.xml")).outcome is Outcome.FAILED
        wait_for(lambda: len(order) == 2)
    finally:
        observer.stop()
        observer.join()
    assert order == ["x.xml.error.json", "x.xml"]


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)
