"""The context a destination gets, as NexusLIMS 2.x makes it, and the porting promise shown:
a LabArchives destination written for NexusLIMS runs in nxdrop by changing its imports.

The plugin (``tests/plugins/labnotebook``) is installed for a real ``nxdrop run --once`` the
way pip would install it, exports to a stateful fake of the LabArchives API
(``tests/fixtures/labarchives_fake.py``), and links to the record on the real CDCS.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import re
import shutil
import sqlite3
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

import pytest

from nxdrop.app import App
from nxdrop.destinations import AcquisitionActivity, ExportContext, ExportResult
from nxdrop.reader import TREE_MAX, RecordReader
from nxdrop.schemas import NEXUS_EXPERIMENT_XSD
from tests.conftest import RECORDS
from tests.fixtures.cdcs_server import CDCSServer
from tests.fixtures.labarchives_fake import FakeLabArchives, Node
from tests.fixtures.plugins import env_with_path

PLUGIN = Path(__file__).resolve().parent / "plugins" / "labnotebook"
NX = "{https://data.nist.gov/od/dm/nexus/experiment/v1.0}"
START = datetime.fromisoformat("2018-11-13T10:00:00-07:00")
END = datetime.fromisoformat("2018-11-13T15:00:00-07:00")


@pytest.fixture
def labarchives() -> Iterator[FakeLabArchives]:
    """A running fake of one user's LabArchives notebook."""
    with FakeLabArchives.running() as fake:
        yield fake


@pytest.fixture(params=[TREE_MAX, 0], ids=["tree", "stream"])
def reader(request: pytest.FixtureRequest) -> RecordReader:
    """A reader as nxdrop builds it, each of the two ways a record is parsed."""
    return RecordReader(10**8, NEXUS_EXPERIMENT_XSD, tree_max=int(request.param))


# -- the context as NexusLIMS makes it -------------------------------------------------------


def test_a_context_is_made_the_way_nexuslims_makes_one(tmp_path: Path) -> None:
    xml = tmp_path / "s.xml"
    xml.write_bytes(b"<Experiment/>")
    earlier = {"cdcs": ExportResult(True, "cdcs", "7", "https://cdcs/data?id=7")}
    event = object()  # NexusLIMS's ReservationEvent, which nxdrop never has

    # NexusLIMS's positional order, every field
    ctx = ExportContext(
        xml, "s", "FEI-Titan-TEM", START, END, "ned", {"k": "v"}, earlier, [], event
    )
    assert (ctx.xml_file_path, ctx.session_identifier, ctx.instrument_pid) == (
        xml,
        "s",
        "FEI-Titan-TEM",
    )
    assert (ctx.dt_from, ctx.dt_to, ctx.user) == (START, END, "ned")
    assert (ctx.metadata, ctx.previous_results, ctx.activities) == ({"k": "v"}, earlier, [])
    assert ctx.reservation_event is event

    # as NexusLIMS's export_records makes it, by keyword; the rest are NexusLIMS's defaults
    ctx = ExportContext(
        xml_file_path=xml,
        session_identifier="s",
        instrument_pid="FEI-Titan-TEM",
        dt_from=START,
        dt_to=END,
        user="ned",
        activities=[],
        reservation_event=None,
    )
    assert (ctx.metadata, ctx.previous_results, ctx.reservation_event) == ({}, {}, None)
    # nxdrop's own fields keep their defaults, and a hand-made context reads its file
    assert (ctx.record, ctx.attempt, ctx.interrupted) == (None, 1, False)
    assert ctx.content == b"<Experiment/>"

    # the shortest NexusLIMS call: user defaults to None
    assert ExportContext(xml, "s", "p", START, END).user is None


def test_nxdrops_old_argument_order_is_refused_naming_the_order(tmp_path: Path) -> None:
    # Before NexusLIMS's order nxdrop's was (..., instrument_pid, user, dt_from, dt_to).
    with pytest.raises(TypeError, match=r"dt_from must be a datetime or None, not str 'ned'"):
        ExportContext(tmp_path / "s.xml", "s", "p", "ned", START, END)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"user must be a str or None.*dt_from, dt_to, user"):
        ExportContext(tmp_path / "s.xml", "s", "p", None, START, END)  # type: ignore[arg-type]
    # A call with no user and no dates means the same in both orders, and still works.
    assert ExportContext(tmp_path / "s.xml", "s", "p", None, None, None).user is None


def test_results_are_added_and_asked_for_as_in_nexuslims(tmp_path: Path) -> None:
    ctx = ExportContext(tmp_path / "s.xml", "s", "p", START, END)
    assert ctx.get_result("cdcs") is None and not ctx.has_successful_export("cdcs")

    failed = ExportResult(False, "cdcs", error_message="HTTP 500")
    ctx.add_result("cdcs", failed)
    assert ctx.get_result("cdcs") is failed and not ctx.has_successful_export("cdcs")

    done = ExportResult(True, "cdcs", "7", "https://cdcs/data?id=7")
    ctx.add_result("cdcs", done)  # a later result replaces the earlier one
    assert ctx.previous_results == {"cdcs": done}
    assert ctx.has_successful_export("cdcs") and ctx.successful_result("cdcs") is done
    assert not ctx.has_successful_export("elabftw")


@pytest.mark.parametrize("source", RECORDS)
def test_a_records_context_holds_its_activities_and_head(
    reader: RecordReader, corpus: Path, source: str
) -> None:
    record = reader.read(corpus / source)
    ctx = ExportContext.for_record(record)
    root = ET.parse(corpus / source).getroot()

    assert ctx.xml_file_path == corpus / source and ctx.record is record
    assert ctx.user == root.findtext(f"{NX}summary/{NX}experimenter")
    assert ctx.dt_from == datetime.fromisoformat(
        root.findtext(f"{NX}summary/{NX}reservationStart") or ""
    )
    assert ctx.reservation_event is None  # a drop folder has no calendar
    assert ctx.metadata == {
        "title": root.findtext(f"{NX}title"),
        "id": root.findtext(f"{NX}id"),
        "instrument_name": root.findtext(f"{NX}summary/{NX}instrument"),
        "motivation": root.findtext(f"{NX}summary/{NX}motivation"),
        "reservation_url": root.find(f"{NX}summary").get("ref"),  # type: ignore[union-attr]
    }
    starts = [a.findtext(f"{NX}startTime") for a in root.iter(f"{NX}acquisitionActivity")]
    assert isinstance(ctx.activities, list)
    assert all(isinstance(a, AcquisitionActivity) for a in ctx.activities)
    assert [a.start.isoformat() if a.start else None for a in ctx.activities] == starts
    # each context's own: a destination that writes into it changes no other context
    ctx.metadata["note"] = "mine"
    ctx.activities.clear()
    again = ExportContext.for_record(record)
    assert "note" not in again.metadata and len(again.activities) == len(starts)
    # what the pipeline does to a context between destinations and attempts keeps it all
    moved = dataclasses.replace(again, previous_results={}, interrupted=True)
    assert (moved.activities, moved.metadata) == (again.activities, again.metadata)


class Seeing:
    """A NexusLIMS-style destination (no base class) that keeps every context it is given."""

    def __init__(self, name: str, priority: int) -> None:
        self.name, self.priority = name, priority
        self.contexts: list[ExportContext] = []

    enabled = True

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        self.contexts.append(context)
        return ExportResult(True, self.name, "1", f"https://{self.name}.example/1")


def test_every_destination_sees_the_records_activities(
    make_app: Callable[..., App], place: Callable[..., Path], corpus: Path
) -> None:
    cdcs, later = Seeing("cdcs", 100), Seeing("later", 50)
    report = make_app(cdcs, later).pipeline.process(place(RECORDS[0], "2018-11-13_T_1.xml"))

    assert report.ok
    [first], [second] = cdcs.contexts, later.contexts
    assert first.activities == second.activities  # the same activities, read once
    assert [len(a.files) for a in second.activities] == [6] * 8
    assert second.metadata["title"] == "Test record with a multi-dataset file"
    assert second.reservation_event is None
    assert second.has_successful_export("cdcs") and not first.has_successful_export("cdcs")
    assert second.get_result("cdcs") == report.results[0]


def test_activities_no_destination_reads_are_never_parsed(
    make_app: Callable[..., App],
    place: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read: list[bytes] = []
    monkeypatch.setattr(RecordReader, "_activities", lambda self, content: read.append(content))
    cdcs, later = Seeing("cdcs", 100), Seeing("later", 50)  # neither reads them
    report = make_app(cdcs, later).pipeline.process(place(RECORDS[0], "2018-11-13_T_2.xml"))

    assert report.ok and len(later.contexts) == 1
    assert read == []  # every context was made and copied without them


# -- the porting promise: NexusLIMS's LabArchives destination, by its imports ---------------


def activities_of(path: Path) -> list[tuple[str, list[str]]]:
    """Each activity's start and its files, each once, in order, as the XML says (with the
    standard library's parser, not nxdrop's)."""
    found = []
    for act in ET.parse(path).getroot().iter(f"{NX}acquisitionActivity"):
        files = [unquote(d.findtext(f"{NX}location") or "") for d in act.iter(f"{NX}dataset")]
        found.append((act.findtext(f"{NX}startTime") or "", list(dict.fromkeys(files))))
    return found


def session_page(fake: FakeLabArchives, date: str, session: str) -> Node:
    """The one page the plugin made for ``session``, where NexusLIMS's destination puts it."""
    folder = fake.path("NexusLIMS Records", "FEI-Titan-TEM")
    assert folder is not None, "no instrument folder"
    pages = [n for n in fake.children(folder.tree_id) if n.display_text.endswith(session)]
    assert [p.display_text for p in pages] == [f"{date} \u2014 {session}"]
    assert pages[0].is_page
    return pages[0]


def test_a_nexuslims_labarchives_destination_exports_through_nxdrop(
    cdcs_server: CDCSServer,
    labarchives: FakeLabArchives,
    corpus: Path,
    drop: Path,
    tmp_path: Path,
) -> None:
    # The plugin imports nothing of nxdrop's but nxdrop.destinations, and subclasses nothing.
    source = (PLUGIN / "nxlabnotebook.py").read_text()
    imports = re.findall(r"^(?:from|import) (\S+)", source, re.M)
    assert [i for i in imports if i.startswith("nxdrop")] == ["nxdrop.destinations"]
    assert "class LabArchivesDestination:" in source

    env = env_with_path(
        PLUGIN,
        NX_DATA_PATH=str(tmp_path / "state"),
        NX_DROP_PATH=str(drop),
        NX_CDCS_URL=cdcs_server.url,
        NX_CDCS_TOKEN=cdcs_server.user_token,
        NX_CDCS_TEMPLATE=cdcs_server.template_title,
        NX_RETRY_MAX_TIME="30",
        **labarchives.env,
    )
    tag = uuid.uuid4().hex[:8]  # the CDCS server outlives test runs
    names = {f"2024-01-15_FEI-Titan-TEM_{tag}_{i}.xml": record for i, record in enumerate(RECORDS)}
    for name, record in names.items():
        shutil.copyfile(corpus / record, drop / name)

    run = subprocess.run(
        [sys.executable, "-m", "nxdrop", "run", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )

    assert run.returncode == 0, run.stderr
    assert labarchives.password not in run.stdout + run.stderr
    db = sqlite3.connect(tmp_path / "state" / "nxdrop.db")
    for name, record in names.items():
        session, path = name.removesuffix(".xml"), corpus / record
        assert (drop / "uploaded" / name).read_bytes() == path.read_bytes()
        rows = {
            r[0]: r[1:]
            for r in db.execute(
                "SELECT destination_name, success, record_id, record_url, error_message "
                "FROM upload_log WHERE session_identifier = ?",
                (session,),
            )
        }
        assert sorted(rows) == ["cdcs", "labarchives"]
        assert rows["labarchives"][0] == 1, rows["labarchives"][3]

        # the CDCS record the plugin linked to is there, with this session's record
        _, cdcs_id, cdcs_url, _ = rows["cdcs"]
        assert cdcs_url == f"{cdcs_server.url}data?id={cdcs_id}"
        assert cdcs_server.client.record(cdcs_id)["title"] == session

        # one page, where NexusLIMS's destination puts it, dated from the record (dt_from)
        date = ET.parse(path).getroot().findtext(f"{NX}summary/{NX}reservationStart") or ""
        page = session_page(labarchives, date[:10], session)
        assert (
            rows["labarchives"][2]
            == f"{labarchives.url[:-4]}/#/{labarchives.notebook}/{page.tree_id}"
        )
        summary, *activities, attachment = page.entries

        # the summary: the session from the context, and the CDCS link from get_result
        assert rows["labarchives"][1] == summary["eid"]
        html = summary["entry_data"]
        assert f"<strong>Session ID</strong>: {session}</li>" in html
        assert "<strong>Instrument</strong>: FEI-Titan-TEM</li>" in html
        assert f'<li><a href="{cdcs_url}">View in CDCS</a></li>' in html

        # one entry per <acquisitionActivity>, each with its start and its files
        expected = activities_of(path)
        assert len(activities) == len(expected) == {"example_record.xml": 8}.get(record, 2)
        for entry, (start, files) in zip(activities, expected, strict=True):
            assert f"<strong>Start</strong>: {start}</li>" in entry["entry_data"]
            assert re.findall(r"<code>(.*?)</code>", entry["entry_data"]) == files

        # and the record itself, byte for byte, under its own name
        assert (attachment["filename"], attachment["content"]) == (name, path.read_bytes())
    # every call was signed as LabArchives requires
    assert labarchives.calls and all(accepted for _, accepted in labarchives.calls)


def load_plugin() -> ModuleType:
    """The plugin's module, imported in this process from where it lies."""
    spec = importlib.util.spec_from_file_location("nxlabnotebook", PLUGIN / "nxlabnotebook.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FailingCDCS:
    """A stand-in for CDCS that fails: the plugin must then link to nothing."""

    name, priority, enabled = "cdcs", 100, True

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        return ExportResult(False, self.name, error_message="HTTP 400: not valid")


def test_without_a_cdcs_record_the_plugin_links_to_none(
    make_app: Callable[..., App],
    place: Callable[..., Path],
    labarchives: FakeLabArchives,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key, value in labarchives.env.items():
        monkeypatch.setenv(key, value)
    plugin = load_plugin().LabArchivesDestination()
    app = make_app(FailingCDCS(), plugin, export_strategy="best_effort")

    report = app.pipeline.process(place(RECORDS[1], "2024-01-15_FEI-Titan-TEM_x.xml"))

    assert report.ok  # best_effort: LabArchives has it
    page = session_page(labarchives, "2024-01-15", "2024-01-15_FEI-Titan-TEM_x")
    summary, *activities, _ = page.entries
    assert "Related Records" not in summary["entry_data"]  # has_successful_export said no
    assert "href" not in summary["entry_data"]
    assert len(activities) == 2


def test_a_plugin_failure_is_the_records_failure_and_says_why(
    make_app: Callable[..., App],
    place: Callable[..., Path],
    labarchives: FakeLabArchives,
    monkeypatch: pytest.MonkeyPatch,
    drop: Path,
) -> None:
    for key, value in {**labarchives.env, "NX_LABARCHIVES_ACCESS_PASSWORD": "wrong"}.items():
        monkeypatch.setenv(key, value)
    app = make_app(load_plugin().LabArchivesDestination())

    report = app.pipeline.process(place(RECORDS[1], "2024-01-15_FEI-Titan-TEM_y.xml"))

    assert not report.ok
    why: dict[str, Any] = json.loads(
        (drop / "failed" / "2024-01-15_FEI-Titan-TEM_y.xml.error.json").read_text()
    )
    assert "Invalid signature" in why["destinations"]["labarchives"]["error"]
    assert labarchives.nodes == {}  # nothing was made
    assert labarchives.calls == [("get_tree_level", False)]
