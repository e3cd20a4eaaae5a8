"""The pipeline: strategies × failures, retries, reuse, bad records, and where files end up."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nxdrop.destinations import ExportContext, ExportResult
from nxdrop.exceptions import PermanentError, TransientError
from nxdrop.folders import Claim, claim
from nxdrop.pipeline import Outcome, Pipeline
from nxdrop.settings import Settings
from nxdrop.store import Store


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
def pipeline(make_settings: Callable[..., Settings]) -> Callable[..., Pipeline]:
    def build(*destinations: Scripted, **settings: Any) -> Pipeline:
        s = make_settings(**settings)
        p = Pipeline(s, list(destinations), Store(s.database_url))
        p.folder.create()
        return p

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

    report = p.export_file(record)

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
    pipeline(first, second).export_file(place())

    assert first.seen == [{}]
    cdcs = second.seen[0]["cdcs"]
    assert cdcs.success and cdcs.record_url == "https://cdcs.example/1"
    assert second.calls[0].get_result("cdcs") is cdcs
    assert second.calls[0].get_result("nowhere") is None


def test_context_describes_the_record(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "ok")
    pipeline(dest).export_file(place(name="2018-11-13_FEI-Titan-TEM_204.xml"))

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

    assert p.export_file(record).ok
    assert len(dest.calls) == 3
    [row] = p.store.uploads(record.stem)
    assert row.success and row.attempts == 3


def test_retry_gives_up_when_the_server_asks_to_wait_past_the_budget(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "transient", retry_after=3600)
    p = pipeline(dest, retry_max_time=5)
    record = place()

    report = p.export_file(record)

    assert report.outcome is Outcome.FAILED and len(dest.calls) == 1
    error = json.loads((drop / "failed" / f"{record.name}.error.json").read_text())
    assert error["destinations"]["a"]["status_code"] == 503
    assert "gave up retrying" in error["destinations"]["a"]["error"]


def test_permanent_failures_are_not_retried(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "permanent")
    pipeline(dest, retry_max_time=30).export_file(place())
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
            p.stop.set()  # as SIGTERM would, while the destination asks to wait

    dest.export = export_then_stop  # type: ignore[method-assign]
    report = p.export_file(record)

    assert report.outcome is Outcome.ABANDONED
    assert record.exists()
    assert not (drop / "failed" / record.name).exists()


def test_identical_record_is_not_sent_twice(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path], drop: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    p = pipeline(dest)
    first = p.export_file(place())
    again = p.export_file(place())  # the builder drops the same bytes once more

    assert first.ok and again.ok
    assert len(dest.calls) == 1
    assert again.results[0].record_url == first.results[0].record_url
    assert again.results[0].metadata["reused_from"]
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
    assert not p.export_file(record).ok

    p.folder.retry([record.name])  # what an operator does
    assert p.export_file(record).ok

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

    report = p.export_file(record)

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
    assert small.export_file(place()).outcome is Outcome.REJECTED

    strict = pipeline(dest, schema_path=corpus / "nexus-experiment.xsd")
    invalid = drop / "invalid.xml"
    invalid.write_bytes(
        (corpus / "example_record_curation.xml")
        .read_bytes()
        .replace(b"<title>", b"<bogus/><title>", 1)
    )
    report = strict.export_file(invalid)
    assert report.outcome is Outcome.REJECTED and "schema" in (report.error or "")
    assert strict.export_file(place("example_record_curation.xml")).ok
    assert len(dest.calls) == 1


def test_symbolic_link_is_refused_and_its_target_never_read(
    pipeline: Callable[..., Pipeline], drop: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret.xml"
    secret.write_text("<Experiment><title>secret</title></Experiment>")
    link = drop / "link.xml"
    link.symlink_to(secret)
    dest = Scripted("a", 1, "ok")

    report = pipeline(dest).export_file(link)

    assert report.outcome is Outcome.REJECTED and "symbolic link" in (report.error or "")
    assert dest.calls == []
    moved = drop / "failed" / "link.xml"
    assert moved.is_symlink() and secret.exists()


def test_files_outside_the_drop_folder_stay_where_they_are(
    pipeline: Callable[..., Pipeline], corpus: Path
) -> None:
    dest = Scripted("a", 1, "ok")
    source = corpus / "example_record.xml"
    assert pipeline(dest).export_file(source).ok
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
            p.stop.set()  # SIGTERM's deadline passes while CDCS is being called

    first.export = export_then_stop  # type: ignore[method-assign]
    record = place()

    report = p.export_file(record)

    assert report.outcome is Outcome.ABANDONED
    assert second.calls == []
    assert record.exists()
    assert list((drop / "uploaded").iterdir()) == []


def test_a_file_another_process_is_exporting_is_left_to_it(
    pipeline: Callable[..., Pipeline], place: Callable[..., Path]
) -> None:
    dest = Scripted("a", 1, "ok")
    p = pipeline(dest)
    record = place()
    with claim(record) as held:  # as another nxdrop would hold it
        assert held is Claim.OURS
        report = p.export_file(record)
    assert report.outcome is Outcome.GONE
    assert dest.calls == []
    assert record.exists()
    assert p.export_file(record).ok
