"""Reading a record: the NexusLIMS schema by default, every safety check, flat memory, and
file names made safe to store and show."""

from __future__ import annotations

import gc
import hashlib
import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from nxdrop.activities import ActivityCollector
from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import ConfigError, RecordError
from nxdrop.reader import TREE_MAX, RecordReader
from nxdrop.records import escape_name, name_problem
from nxdrop.schemas import NEXUS_EXPERIMENT_XSD
from nxdrop.settings import Settings, load_settings

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((REPO / "examples" / "records").glob("*.xml"))
CORPUS_RECORDS = ("example_record.xml", "example_record_curation.xml")


@pytest.fixture(params=[TREE_MAX, 0], ids=["tree", "stream"])
def tree_max(request: pytest.FixtureRequest) -> int:
    """Both ways a record is parsed: into a tree (up to TREE_MAX bytes), or streamed."""
    return int(request.param)


@pytest.fixture
def reader(tree_max: int) -> RecordReader:
    """A reader as nxdrop builds it from the default settings."""
    settings = load_settings()
    return RecordReader(settings.max_record_bytes, settings.schema_path, tree_max=tree_max)


def test_the_package_ships_the_nexuslims_schema(corpus: Path) -> None:
    assert NEXUS_EXPERIMENT_XSD.read_bytes() == (corpus / "nexus-experiment.xsd").read_bytes()
    # It stands alone: nothing else to ship.
    assert b"<xs:import" not in NEXUS_EXPERIMENT_XSD.read_bytes()
    assert b"<xs:include" not in NEXUS_EXPERIMENT_XSD.read_bytes()


@pytest.mark.parametrize(
    "source", [*CORPUS_RECORDS, *(p.name for p in EXAMPLES)], ids=lambda name: name
)
def test_real_records_pass_the_default_schema(
    reader: RecordReader, corpus: Path, source: str
) -> None:
    path = corpus / source if source in CORPUS_RECORDS else REPO / "examples" / "records" / source
    record = reader.read(path)
    assert record.content == path.read_bytes()  # byte for byte, CRLF and all
    assert record.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert record.instrument_pid == "FEI-Titan-TEM"
    assert record.user and record.dt_from and record.title


def test_what_a_record_says_about_itself(reader: RecordReader, corpus: Path) -> None:
    record = reader.read(corpus / "example_record.xml", "2018-11-13_FEI-Titan-TEM_204.1.xml")
    assert record.session_identifier == "2018-11-13_FEI-Titan-TEM_204"
    assert record.title == "Test record with a multi-dataset file"
    assert record.user == "Ned Land (ned)"
    assert record.dt_from == datetime.fromisoformat("2018-11-13T10:00:00-07:00")
    assert record.dt_to == datetime.fromisoformat("2018-11-13T15:00:00-07:00")


def experiment(
    body: str, namespace: str = "https://data.nist.gov/od/dm/nexus/experiment/v1.0"
) -> bytes:
    return f'<?xml version="1.0"?>\n<Experiment xmlns="{namespace}">{body}</Experiment>'.encode()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (
            lambda xml: xml.replace(
                b"https://data.nist.gov/od/dm/nexus/experiment/v1.0", b"urn:another:namespace"
            ),
            "No matching global declaration available for the validation root",
        ),
        (
            lambda xml: xml.replace(
                b"<summary",
                b'<xi:include xmlns:xi="http://www.w3.org/2001/XInclude" href="/etc/passwd" '
                b'parse="text"/><summary',
                1,
            ),
            "{http://www.w3.org/2001/XInclude}include': This element is not expected",
        ),
        (
            lambda xml: xml.replace(b"</Experiment>", b"<bogus/></Experiment>"),
            "bogus': This element is not expected",
        ),
        (
            lambda xml: xml.replace(b"2018-11-13T10:00:00-07:00", b"last Tuesday", 1),
            "reservationStart': 'last Tuesday' is not a valid value",
        ),
    ],
    ids=["other-namespace", "xinclude", "unknown-element", "bad-date"],
)
def test_records_the_real_cdcs_refuses_are_refused_with_the_schemas_message(
    reader: RecordReader,
    corpus: Path,
    tmp_path: Path,
    mutate: Callable[[bytes], bytes],
    message: str,
) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(mutate((corpus / "example_record.xml").read_bytes()))

    with pytest.raises(RecordError, match="fails the schema") as refused:
        reader.read(path)
    assert message in str(refused.value)


class Recording(ExportDestination):
    """A destination that records every call."""

    name = "recording"
    priority = 10

    def __init__(self) -> None:
        self.calls: list[str] = []

    @property
    def enabled(self) -> bool:
        return True

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        self.calls.append(context.session_identifier)
        return ExportResult(success=True, destination_name=self.name)


def test_by_default_a_record_outside_the_schema_reaches_no_destination(
    make_settings: Callable[..., Settings], drop: Path, corpus: Path
) -> None:
    from nxdrop.app import build_app

    dest = Recording()
    app = build_app(make_settings(), [dest])
    try:
        other = drop / "other-namespace.xml"
        other.write_bytes(
            (corpus / "example_record.xml")
            .read_bytes()
            .replace(b"https://data.nist.gov/od/dm/nexus/experiment/v1.0", b"urn:other")
        )
        report = app.pipeline.process(other)
        assert report.error is not None and "fails the schema" in report.error
        assert dest.calls == []
        assert (drop / "failed" / "other-namespace.xml").exists()
    finally:
        app.close()


def test_the_schema_can_be_switched_off_or_replaced(
    monkeypatch: pytest.MonkeyPatch, corpus: Path, tmp_path: Path
) -> None:
    other_ns = tmp_path / "x.xml"
    other_ns.write_bytes(experiment("<title>t</title>", namespace="urn:other"))
    monkeypatch.setenv("NX_SCHEMA_PATH", "none")
    off = load_settings()
    assert RecordReader(off.max_record_bytes, off.schema_path).read(other_ns).title == "t"

    broken = tmp_path / "broken.xsd"
    broken.write_text("<xs:schema xmlns:xs='http://www.w3.org/2001/XMLSchema'><xs:element/>")
    with pytest.raises(ConfigError, match="NX_SCHEMA_PATH"):
        RecordReader(10**6, broken)


@pytest.mark.parametrize("schema", ["default", "none"])
@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", "the file is empty"),
        (b" \n\t\r\n", "the file is empty"),
        (b"<Experiment><title>unclosed", "not well-formed XML: "),
        (b"<Experiment><title>&undefined;</title></Experiment>", "'undefined' not defined"),
        (experiment("<title>t</title>") + b"<trailing/>", "Extra content at the end"),
        (
            b'<?xml version="1.0"?>\n<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]>\n'
            b"<Experiment>&e;</Experiment>",
            "carries a DOCTYPE",
        ),
        (b'<!DOCTYPE Experiment SYSTEM "http://127.0.0.1:9/x.dtd"><Experiment/>', "DOCTYPE"),
        (b'<!DOCTYPE x [<!ENTITY a "aaaa"> <!ENTITY b "&a;&a;', "DOCTYPE"),  # cut short
        (b"<html><body/></html>", "root element is <html>, not a NexusLIMS <Experiment>"),
    ],
    ids=[
        "empty",
        "blank",
        "unclosed",
        "undefined-entity",
        "trailing",
        "doctype-entity",
        "doctype-dtd",
        "doctype-broken",
        "html",
    ],
)
def test_bad_files_are_refused_with_the_precise_reason(
    tmp_path: Path, schema: str, content: bytes, reason: str, tree_max: int
) -> None:
    path = tmp_path / "bad.xml"
    path.write_bytes(content)
    xsd = NEXUS_EXPERIMENT_XSD if schema == "default" else None
    reader = RecordReader(10**6, xsd, tree_max=tree_max)

    with pytest.raises(RecordError) as refused:
        reader.read(path)
    assert reason in str(refused.value)
    assert "root" in reason or "DOCTYPE" in reason or "schema" not in str(refused.value)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda xml: xml[: len(xml) // 2], "not well-formed XML: "),
        (lambda xml: xml + b"<!-- never closed", "not well-formed XML: "),
        (lambda xml: xml + b"<?pi", "not well-formed XML: "),
        (lambda xml: xml.replace(b"<title>", b'<title xmlns:q="">', 1), "Empty XML namespace"),
        (lambda xml: xml.replace(b"<title>", b'<title xmlns:xml="urn:x">', 1), "xml namespace"),
    ],
    ids=["half-written", "open-comment-after-root", "open-pi-after-root", "empty-ns", "xml-ns"],
)
def test_what_a_validating_stream_would_let_through_is_refused(
    reader: RecordReader,
    corpus: Path,
    tmp_path: Path,
    mutate: Callable[[bytes], bytes],
    reason: str,
) -> None:
    # lxml's validating push parser takes each of these for a valid record.
    path = tmp_path / "x.xml"
    path.write_bytes(mutate((corpus / "example_record.xml").read_bytes()))
    with pytest.raises(RecordError, match=reason):
        reader.read(path)


def test_size_limit_symbolic_links_and_fifos(tmp_path: Path, corpus: Path) -> None:
    reader = RecordReader(1000, NEXUS_EXPERIMENT_XSD)
    with pytest.raises(RecordError, match="larger than NX_MAX_RECORD_BYTES=1000"):
        reader.read(corpus / "example_record.xml")

    link = tmp_path / "link.xml"
    link.symlink_to(corpus / "example_record_curation.xml")  # a valid record behind it
    with pytest.raises(RecordError, match="symbolic link"):
        reader.read(link)

    fifo = tmp_path / "fifo.xml"
    os.mkfifo(fifo)  # no writer: a blocking open would hang for ever
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(reader.read, fifo)
        with pytest.raises(RecordError, match="not a regular file"):
            future.result(timeout=30)


def test_a_file_longer_than_its_size_said_is_read_whole_up_to_the_limit() -> None:
    # A /proc file is regular and says 0 bytes: what a file growing while it is read shows.
    status = Path("/proc/self/status")
    assert status.stat().st_size == 0 and len(status.read_bytes()) > 100
    with pytest.raises(RecordError, match="grew past NX_MAX_RECORD_BYTES=100"):
        RecordReader(100).read(status)
    with pytest.raises(RecordError, match="not well-formed"):  # read whole: its text is no XML
        RecordReader(10**6).read(status)


def test_a_summary_date_that_is_not_a_date_is_refused_without_a_schema(
    tmp_path: Path, tree_max: int
) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(experiment("<summary><reservationStart>soon</reservationStart></summary>"))
    with pytest.raises(RecordError, match="summary/reservationStart 'soon' is not a date"):
        RecordReader(10**6, tree_max=tree_max).read(path)


def test_the_first_title_and_summary_count(tmp_path: Path, tree_max: int) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(
        experiment(
            "<title> first </title><title>second</title>"
            '<summary><experimenter>Ann</experimenter><instrument pid="A">a</instrument>'
            "<sub><experimenter>nested, not the summary's own</experimenter></sub></summary>"
            '<summary><experimenter>Bob</experimenter><instrument pid="B"/></summary>'
        )
    )
    record = RecordReader(10**6, tree_max=tree_max).read(path)
    assert (record.title, record.user, record.instrument_pid) == ("first", "Ann", "A")


def test_threads_reading_at_once_each_get_their_own_verdict(
    reader: RecordReader, corpus: Path, tmp_path: Path
) -> None:
    good = corpus / "example_record.xml"
    bad = tmp_path / "bad.xml"
    bad.write_bytes(good.read_bytes().replace(b"</Experiment>", b"<bogus/></Experiment>"))

    def verdict(path: Path) -> str:
        try:
            reader.read(path)
        except RecordError as exc:
            return "bogus" if "bogus" in str(exc) else str(exc)
        return "ok"

    paths = [good, bad] * 20
    with ThreadPoolExecutor(max_workers=8) as pool:
        verdicts = list(pool.map(verdict, paths))
    assert verdicts == ["ok", "bogus"] * 20


MEASURE = textwrap.dedent(
    """
    import resource, sys
    from pathlib import Path
    from nxdrop.reader import RecordReader
    from nxdrop.schemas import NEXUS_EXPERIMENT_XSD
    reader = RecordReader(50 * 2**20, NEXUS_EXPERIMENT_XSD)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    record = reader.read(Path(sys.argv[1]))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert record.instrument_pid == "FEI-Titan-TEM"
    print((after - before) * 1024, len(record.activities), len(record.activities[-1].files))
    """
)


def test_reading_a_large_record_costs_about_its_size_in_memory(
    corpus: Path, tmp_path: Path
) -> None:
    # Many small elements: a tree of them would take about 12 times the file, and their
    # activities as dicts of strings more than the file again.
    source = (corpus / "example_record.xml").read_bytes()
    first = source.index(b"<acquisitionActivity")
    last = source.rindex(b"</acquisitionActivity>") + len(b"</acquisitionActivity>")
    copies = (16 * 2**20) // (last - first)
    big = tmp_path / "big.xml"
    with big.open("wb") as fh:
        fh.write(source[:last])
        for _ in range(copies):
            fh.write(source[first:last])
        fh.write(source[last:])
    size = big.stat().st_size

    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(big)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )

    peak, activities, files = map(int, result.stdout.split())
    # The file's bytes, and its activities packed (about a third of their XML) beside them.
    assert peak < 2 * size, f"{peak / 2**20:.0f} MiB to read {size / 2**20:.0f} MiB"
    assert (activities, files) == (8 * (copies + 1), 6)  # every one of them, whole


@pytest.mark.parametrize(
    ("name", "shown", "problem"),
    [
        ("2024-01-15_FEI-Titan-TEM_9001.xml", "2024-01-15_FEI-Titan-TEM_9001.xml", None),
        ("-rf --all.xml", "-rf --all.xml", None),
        ("試料 1.xml", "試料 1.xml", None),
        (os.fsdecode(b"bad-\xff\xfe.xml"), "bad-\\xff\\xfe.xml", "not valid UTF-8"),
        ("x\n<3>FAKE ERROR.xml", "x\\n<3>FAKE ERROR.xml", "control characters"),
        ("tab\tcr\rbell\x07del\x7f.xml", "tab\\tcr\\rbell\\x07del\\x7f.xml", "control"),
        ("line\u2028sep.xml", "line\\u2028sep.xml", "control characters"),
        ("back\\slash.xml", "back\\slash.xml", None),
    ],
    ids=["nexuslims", "leading-dash", "unicode", "invalid", "newline", "controls", "u2028", "bs"],
)
def test_file_names_shown_safely_and_which_cannot_be_a_session(
    name: str, shown: str, problem: str | None
) -> None:
    assert escape_name(name) == shown
    assert escape_name(name).encode("utf-8")  # storable, as it is
    assert len(escape_name(name).splitlines()) == 1  # one log line
    found = name_problem(name)
    assert (found is None) if problem is None else (found is not None and problem in found)


# -- acquisition activities ----------------------------------------------------------------

NX = "{https://data.nist.gov/od/dm/nexus/experiment/v1.0}"


def activities_in(path: Path) -> list[dict[str, Any]]:
    """What the record's XML says of each activity, read with the standard library's parser
    (not nxdrop's) and none of nxdrop's rules: the reference the reader is held to."""
    expected = []
    for act in ET.parse(path).getroot().iter(f"{NX}acquisitionActivity"):
        setup = {p.get("name"): (p.text or "").strip() for p in act.iter(f"{NX}param")}
        datasets = []
        for ds in act.iter(f"{NX}dataset"):
            datasets.append(
                {
                    "name": ds.findtext(f"{NX}name"),
                    "location": ds.findtext(f"{NX}location"),
                    "preview": ds.findtext(f"{NX}preview"),
                    "description": ds.findtext(f"{NX}description"),
                    "type": ds.get("type"),
                    "role": ds.get("role"),
                    "meta": {m.get("name"): (m.text or "").strip() for m in ds.iter(f"{NX}meta")},
                }
            )
        expected.append(
            {
                "seqno": int(act.get("seqno", "")),
                "start": datetime.fromisoformat(act.findtext(f"{NX}startTime") or ""),
                "sample_id": act.findtext(f"{NX}sampleID"),
                "setup": setup,
                "datasets": datasets,
            }
        )
    return expected


@pytest.mark.parametrize("source", CORPUS_RECORDS)
def test_the_activities_are_what_the_record_says(
    reader: RecordReader, corpus: Path, source: str
) -> None:
    record = reader.read(corpus / source)
    expected = activities_in(corpus / source)

    assert len(record.activities) == len(expected) == {"example_record.xml": 8}.get(source, 2)
    for activity, want in zip(record.activities, expected, strict=True):
        assert activity.seqno == want["seqno"]
        assert activity.start == want["start"]
        assert activity.sample_id == want["sample_id"]
        assert activity.setup_params == want["setup"]
        datasets = want["datasets"]
        # NexusLIMS's parallel lists, one item per dataset
        assert activity.files == [d["location"] for d in datasets]  # nothing quoted here
        assert activity.previews == [d["preview"] for d in datasets]
        assert activity.unique_meta == [d["meta"] for d in datasets]
        assert activity.meta == [{**want["setup"], **d["meta"]} for d in datasets]
        assert activity.unique_params == set(want["setup"]).union(*(d["meta"] for d in datasets))
        assert activity.warnings == [[] for _ in datasets]
        # and each dataset as the record has it
        for dataset, d in zip(activity.datasets, datasets, strict=True):
            assert (dataset.name, dataset.location, dataset.preview) == (
                d["name"],
                d["location"],
                d["preview"],
            )
            assert (dataset.type, dataset.role, dataset.description) == (
                d["type"],
                d["role"],
                d["description"],
            )
            assert dataset.meta == d["meta"]
        # NexusLIMS's end is the last file's time: the latest Creation Time, else the start
        times = [
            datetime.fromisoformat(d["meta"]["Creation Time"])
            for d in datasets
            if "Creation Time" in d["meta"]
        ]
        assert activity.end == max([want["start"], *times])
        assert activity.mode == want["setup"].get("Imaging Mode", "")


def test_what_the_corpus_activities_hold(reader: RecordReader, corpus: Path) -> None:
    # A few values read off the file by eye, so the reference above is checked too.
    first, second = reader.read(corpus / "example_record.xml").activities[:2]
    assert first.start == datetime.fromisoformat("2018-11-13T11:01:00-07:00")
    assert first.end == datetime.fromisoformat("2018-11-13T11:04:30-07:00")  # the last file
    assert first.mode == "IMAGING"
    assert first.setup_params["Acquisition Device"] == "BM-UltraScan"
    assert first.setup_params["C1 Aperture (μm)"] == "2000"
    multi = "/Titan_TEM/researcher_a/project_alpha/20181113/multi_signal_file_001.dm3"
    assert first.files[4:6] == [multi, multi]  # one file, two signals
    assert [d.name for d in first.datasets[4:6]] == [
        "multi-dataset-file.dm3 (1 of 2)",
        "multi-dataset-file.dm3 (2 of 2)",
    ]
    assert [d.type for d in first.datasets[4:6]] == ["Image", "Spectrum"]
    assert first.unique_meta[0]["Exposure Time (s)"] == "1.0"
    assert first.meta[0]["Voltage"] == "300000.0"  # the setup's, in each file's whole
    assert second.start == datetime.fromisoformat("2018-11-13T12:30:00-07:00")

    curation = reader.read(corpus / "example_record_curation.xml").activities
    assert [len(a.datasets) for a in curation] == [3, 2]
    assert curation[0].sample_id == "curation-test-sample-001"
    assert curation[0].datasets[1].description == "Rated 5 only — tests max-fill circle display"
    assert curation[1].mode == ""  # the record does not say: NexusLIMS's default
    assert curation[1].end == curation[1].start  # no file times in this record


def test_activities_with_units_warnings_quoted_paths_and_gaps(
    tmp_path: Path, tree_max: int
) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(
        experiment(
            "<title>t</title>"
            '<acquisitionActivity seqno="3">'
            "<startTime>2024-01-15T09:30:00+01:00</startTime><sampleID> s-1 </sampleID>"
            '<setup><param name="Voltage" unit="kV">300</param>'
            '<param name="Stage Tilt" warning="true">1.5</param>'
            '<param name="Operation Mode">DIFFRACTION</param></setup>'
            '<!-- a comment --><?pi x?><notes source="ELN"><entry/></notes>'
            '<dataset type="Diffraction" role="Calibration">'
            "<name>a b.dm3</name><location>/data/a%20b.dm3</location><format>DM3</format>"
            "<description>first</description><description>second</description>"
            "<preview>/data/a%20b.dm3.thumb.png</preview><preview>/other.png</preview>"
            '<meta name="Creation Time">2024-01-15T10:00:00+01:00</meta>'
            '<meta name="Exposure" unit="s">2<!-- split -->.5</meta>'
            '<meta name="Empty"/><meta name="Odd" warning="true">x</meta>'
            "<curation><rating>3</rating></curation><unknown>kept out</unknown>"
            "</dataset>"
            "<dataset><name>bare.dm3</name><location>/data/bare.dm3</location></dataset>"
            "</acquisitionActivity>"
            "<acquisitionActivity><startTime>not a time</startTime>"
            "<dataset><name>one.tif</name><location>/one.tif</location>"
            '<meta name="Imaging Mode">SCANNING</meta></dataset>'
            "</acquisitionActivity>"
            "<acquisitionActivity/>"
        )
    )
    first, second, third = RecordReader(10**6, tree_max=tree_max).read(path).activities

    assert (first.seqno, first.sample_id, first.mode) == (3, "s-1", "DIFFRACTION")
    assert first.start == datetime.fromisoformat("2024-01-15T09:30:00+01:00")
    assert first.end == datetime.fromisoformat("2024-01-15T10:00:00+01:00")
    assert first.setup_params == {
        "Voltage": "300 kV",
        "Stage Tilt": "1.5",
        "Operation Mode": "DIFFRACTION",
    }
    assert first.files == ["/data/a b.dm3", "/data/bare.dm3"]  # as NexusLIMS had them
    assert first.previews == ["/data/a b.dm3.thumb.png", None]
    a, bare = first.datasets
    assert (a.location, a.preview) == ("/data/a%20b.dm3", "/data/a%20b.dm3.thumb.png")
    assert (a.type, a.role, a.format, a.description) == (
        "Diffraction",
        "Calibration",
        "DM3",
        "first\nsecond",
    )
    # A value split by a comment is whole, in both ways of parsing.
    assert a.meta == {
        "Creation Time": "2024-01-15T10:00:00+01:00",
        "Exposure": "2.5 s",
        "Empty": "",
        "Odd": "x",
    }
    assert first.warnings == [["Stage Tilt", "Odd"], ["Stage Tilt"]]
    assert (bare.type, bare.role, bare.format, bare.description, bare.meta) == (
        None,
        None,
        None,
        None,
        {},
    )
    assert first.unique_params == {
        "Voltage",
        "Stage Tilt",
        "Operation Mode",
        "Creation Time",
        "Exposure",
        "Empty",
        "Odd",
    }

    assert second.start is None and second.end is None and second.seqno is None
    assert second.mode == "SCANNING"  # one dataset, no setup: the dataset says it
    assert second.setup_params == {} and second.meta == [{"Imaging Mode": "SCANNING"}]

    assert (third.datasets, third.files, third.setup_params, third.mode) == ((), [], {}, "")


def test_a_record_without_activities_has_none(tmp_path: Path, tree_max: int) -> None:
    path = tmp_path / "x.xml"
    path.write_bytes(experiment("<title>t</title>"))
    assert RecordReader(10**6, tree_max=tree_max).read(path).activities == ()


def test_the_record_head_is_its_metadata(reader: RecordReader, corpus: Path) -> None:
    assert reader.read(corpus / "example_record.xml").metadata == {
        "title": "Test record with a multi-dataset file",
        "id": "204",
        "instrument_name": "FEI Titan TEM",
        "motivation": "Testing of the NexusLIMS frontend",
        "reservation_url": "http://nemo.localhost/event_details/reservation/204/",
    }
    assert reader.read(corpus / "example_record_curation.xml").metadata["id"] == "9001"


def test_the_activities_are_read_once_and_only_when_asked_for(
    reader: RecordReader, corpus: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Most destinations never read them, and they cost more than the rest of the parse.
    packed: list[etree._Element] = []
    pack = ActivityCollector._pack

    def counted(self: ActivityCollector, element: etree._Element) -> Any:
        packed.append(element)
        return pack(self, element)

    monkeypatch.setattr(ActivityCollector, "_pack", counted)
    record = reader.read(corpus / "example_record.xml")
    assert packed == []
    first = record.activities
    assert len(first) == 8 and len(packed) == 8 * 7  # a setup and six datasets each
    assert record.activities is first and len(packed) == 8 * 7  # kept: the same objects


def test_the_activities_hold_nothing_of_the_parse(reader: RecordReader, corpus: Path) -> None:
    # Everything an activity keeps is text: no lxml element, so no tree stays alive
    # through it, however long the record's export takes.
    activities = reader.read(corpus / "example_record.xml").activities
    seen: set[int] = set()
    todo: list[object] = list(activities)
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, type):
            continue
        seen.add(id(obj))
        assert not isinstance(obj, etree._Element), obj
        todo.extend(gc.get_referents(obj))
    assert len(seen) > 100  # the walk did reach the datasets
