"""The eLabFTW destination against a stateful fake eLabFTW and the Prism mock of the spec.

The fake is the newest release it knows (``NEWEST``) unless a test says otherwise; the
tests that must hold on every supported server run against one that has the extended
search (5.6) and one that has not (5.3). ``test_elabftw_releases.py`` covers what differs
between releases; ``test_elabftw_document.py`` the document on its own.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import shutil
import socket
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import requests
import urllib3

from nxdrop.app import App
from nxdrop.destinations.base import ExportContext, ExportResult
from nxdrop.destinations.elabftw import ELabFTWDestination
from nxdrop.destinations.elabftw_api import METADATA_MERGE
from nxdrop.exceptions import ConfigError, DestinationError, PermanentError, TransientError
from nxdrop.pipeline import Outcome
from nxdrop.reader import RecordReader
from nxdrop.settings import Settings, Strategy
from tests.fixtures.elabftw_fake import FakeELabFTW, Prism
from tests.fixtures.hostile import (
    ECHOES,
    HostileServer,
    echo_authorization,
    hostile_servers,
    leaked_parts,
)

SESSION = "2018-11-13_FEI-Titan-TEM_204"
CDCS_URL = "https://cdcs.example.org/data?id=65a1&x=1"
TITLE = b"Test record with a multi-dataset file"
RELEASES = pytest.mark.parametrize(
    "release", ["5.6.0", "5.3.0"], ids=["extended-search", "text-search"]
)


@pytest.fixture
def destination(
    elabftw_fake: FakeELabFTW, make_settings: Callable[..., Settings]
) -> Callable[..., ELabFTWDestination]:
    """An eLabFTW destination configured for the fake; keywords override the settings."""

    def make(**overrides: Any) -> ELabFTWDestination:
        values = {"elabftw_url": elabftw_fake.url, "elabftw_api_key": elabftw_fake.api_key}
        dest = ELabFTWDestination()
        dest.configure(make_settings(**(values | overrides)))
        return dest

    return make


def context_for(path: Path, cdcs_url: str | None = None) -> ExportContext:
    """The context the pipeline builds, with a successful CDCS result if ``cdcs_url``."""
    context = ExportContext.for_record(RecordReader(10**8).read(path))
    if cdcs_url is not None:
        context.previous_results["cdcs"] = ExportResult(True, "cdcs", "65a1", cdcs_url)
    return context


def sha256(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def rebuild(path: Path, title: bytes = b"Rebuilt record") -> bytes:
    """Write a new version of the corpus record to ``path`` (another title); its bytes."""
    content = path.read_bytes()
    assert TITLE in content
    content = content.replace(TITLE, title)
    path.write_bytes(content)
    return content


def fields(experiment: dict[str, Any]) -> dict[str, Any]:
    """An experiment's extra fields, name → value, as eLabFTW shows them."""
    extra = json.loads(experiment["metadata"] or "{}").get("extra_fields", {})
    return {name: field["value"] for name, field in extra.items()}


def live_uploads(experiment: dict[str, Any]) -> list[bytes]:
    """The files attached to an experiment (deleted ones are not), oldest first."""
    return [u["content"] for u in experiment["uploads"] if u.get("state", 1) == 1]


def elabftw_log(app: App, session: str = SESSION) -> list[tuple[str, str | None]]:
    """``upload_log`` for eLabFTW, oldest first: (state, record_id)."""
    return [
        (row.state, row.record_id)
        for row in app.store.uploads(session)
        if row.destination_name == "elabftw"
    ]


def fake_api(fake: FakeELabFTW, method: str, path: str, **kwargs: Any) -> requests.Response:
    """A request to the fake as a person (or another program) with the key would send it."""
    headers = {"Authorization": fake.api_key}
    return requests.request(
        method, f"{fake.url}api/v2/{path}", headers=headers, timeout=10, **kwargs
    )


def stranger(exp_id: int, session: str, **extra: Any) -> dict[str, Any]:
    """An experiment nxdrop did not make for SESSION: another session's, made by hand."""
    metadata = {"extra_fields": {"Session ID": {"type": "text", "value": session}}}
    return {
        "id": exp_id,
        "title": f"Notes on {session}",
        "body": f"<p>{session}</p>",
        "metadata": json.dumps(metadata),
        "custom_id": None,
        "tags": [],
        "uploads": [],
        "state": 1,
        **extra,
    }


def searches(fake: FakeELabFTW) -> list[dict[str, str]]:
    """The searches the destination made, each as its query parameters."""
    return [{k: v[0] for k, v in r.query.items()} for r in fake.calls("GET", "experiments")]


class Tags(HTMLParser):
    """The elements and link targets of an HTML fragment, as a browser would see them."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.hrefs: list[str | None] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.hrefs += [v for k, v in attrs if k == "href"]


class Outline(HTMLParser):
    """A body as a reader sees it: its top-level blocks in order, a heading as its text, a
    list as the texts of its items; and the links, as (text, target)."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.blocks: list[tuple[str, Any]] = []
        self.links: list[tuple[str, str | None]] = []
        self._open: list[str] = []
        self._href: str | None = None
        self._link_text = ""
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self._open:
            self.blocks.append((tag, [] if tag == "ul" else ""))
        elif tag == "li":
            self.blocks[-1][1].append("")
        if tag == "a":
            self._href, self._link_text = dict(attrs).get("href"), ""
        self._open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a":
            self.links.append((self._link_text, self._href))
        if self._open and self._open[-1] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        if not self._open:
            if data.strip():
                self.blocks.append(("text", data.strip()))
            return
        if "a" in self._open:
            self._link_text += data
        kind, content = self.blocks[-1]
        if kind == "ul":
            if "li" in self._open:
                content[-1] += data
        else:
            self.blocks[-1] = (kind, content + data)


# -- configuration -----------------------------------------------------------------------


def test_enabled_only_with_url_and_key(make_settings: Callable[..., Settings]) -> None:
    for values in ({}, {"elabftw_url": "https://elab.example.org/"}, {"elabftw_api_key": "k"}):
        dest = ELabFTWDestination()
        dest.configure(make_settings(**values))
        assert not dest.enabled
        assert dest.disabled_reason is not None
        assert "NX_ELABFTW_URL" in dest.disabled_reason
        assert dest.validate_config()[0] is False


@pytest.mark.parametrize("url", ["elab.example.org", "ftp://elab.example.org/", "https://h/?x=1"])
def test_invalid_url_names_the_variable(url: str, make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ConfigError, match="NX_ELABFTW_URL"):
        ELabFTWDestination().configure(make_settings(elabftw_url=url, elabftw_api_key="k"))


def test_configure_does_not_touch_the_network(
    elabftw_fake: FakeELabFTW, destination: Callable[..., ELabFTWDestination]
) -> None:
    assert destination(elabftw_experiment_category="Microscopy").enabled
    assert elabftw_fake.requests == []


# -- the experiment NexusLIMS documents ----------------------------------------------------


def test_the_experiment_is_the_one_nexuslims_documents(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """Field by field, the contract's words: "title ``NexusLIMS Experiment - <session>``;
    body ``<h1>NexusLIMS Microscopy Session</h1>``, then ``<h2>Session Details</h2>`` with a
    list of Session ID, Instrument, User, Start, End, then ``<h2>Related Records</h2>`` with
    a "View in CDCS" link when CDCS holds the record; tags ``NexusLIMS``, the instrument and
    the user name; ``extra_fields`` for the session times, instrument, user and CDCS URL
    (NexusLIMS's field names); the XML attached"."""
    path = place(name=f"{SESSION}.xml")
    result = destination().export(context_for(path, CDCS_URL))

    [exp] = elabftw_fake.experiments.values()
    assert exp["title"] == "NexusLIMS Experiment - 2018-11-13_FEI-Titan-TEM_204"

    body = Outline(exp["body"])
    assert body.blocks == [
        ("h1", "NexusLIMS Microscopy Session"),
        ("h2", "Session Details"),
        (
            "ul",
            [
                "Session ID: 2018-11-13_FEI-Titan-TEM_204",
                "Instrument: FEI-Titan-TEM",
                "User: Ned Land (ned)",
                "Start: 2018-11-13T10:00:00-07:00",
                "End: 2018-11-13T15:00:00-07:00",
            ],
        ),
        ("h2", "Related Records"),
        ("ul", ["View in CDCS"]),
    ]
    assert body.links == [("View in CDCS", CDCS_URL)]
    assert exp["content_type"] == 1  # HTML

    assert exp["tags"] == ["NexusLIMS", "FEI-Titan-TEM", "Ned Land (ned)"]

    metadata = json.loads(exp["metadata"])
    groups = {g["id"]: g["name"] for g in metadata["elabftw"]["extra_fields_groups"]}
    assert groups == {1: "Session Information", 2: "Related Records"}
    assert metadata["elabftw"]["display_main_text"] is True
    shown = {
        name: (f["type"], f["value"], groups[f["group_id"]], f["position"], f["description"])
        for name, f in metadata["extra_fields"].items()
    }
    sha = sha256(path.read_bytes())
    assert shown == {
        "Session ID": ("text", SESSION, "Session Information", 1, "NexusLIMS session identifier"),
        "Instrument": (
            "text",
            "FEI-Titan-TEM",
            "Session Information",
            2,
            "Instrument persistent identifier",
        ),
        "Start Time": (
            "datetime-local",
            "2018-11-13T10:00",
            "Session Information",
            3,
            "Session start time",
        ),
        "End Time": (
            "datetime-local",
            "2018-11-13T15:00",
            "Session Information",
            4,
            "Session end time",
        ),
        "User": (
            "text",
            "Ned Land (ned)",
            "Session Information",
            5,
            "User who performed the session",
        ),
        # nxdrop's addition, beside NexusLIMS's fields.
        "SHA-256": (
            "text",
            sha,
            "Session Information",
            6,
            "SHA-256 of the attached NexusLIMS XML record",
        ),
        "CDCS Record": ("url", CDCS_URL, "Related Records", 10, "Link to CDCS record"),
    }

    [upload] = exp["uploads"]
    assert upload["content"] == path.read_bytes()  # byte for byte, CRLF and all
    assert b"\r\n" in upload["content"]
    assert (upload["real_name"], upload["content_type"]) == (f"{SESSION}.xml", "application/xml")
    assert upload["comment"] == "NexusLIMS XML record"

    assert result.success
    assert result.destination_name == "elabftw"
    assert result.record_id == "1"
    assert result.record_url == f"{elabftw_fake.url}experiments.php?mode=view&id=1"
    assert result.metadata == {"upload_id": 1, "cdcs_url": CDCS_URL}
    assert {r.headers["authorization"] for r in elabftw_fake.requests} == {elabftw_fake.api_key}


def test_without_cdcs_there_is_no_related_records_section(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    destination().export(context_for(place(name=f"{SESSION}.xml")))
    exp = elabftw_fake.experiments[1]
    assert [h for kind, h in Outline(exp["body"]).blocks if kind == "h2"] == ["Session Details"]
    assert "CDCS Record" not in fields(exp)
    groups = json.loads(exp["metadata"])["elabftw"]["extra_fields_groups"]
    assert groups == [{"id": 1, "name": "Session Information"}]


def test_category_and_status_by_title_or_id(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination(
        elabftw_experiment_category="microscopy",  # a title, past the default page of 15
        elabftw_experiment_status="2",  # an id
    )
    dest.export(context_for(place(name=f"{SESSION}.xml")))

    exp = elabftw_fake.experiments[1]
    assert (exp["category"], exp["status"]) == (20, 2)
    [listing] = elabftw_fake.calls("GET", "teams/3/experiments_categories")  # team of users/me
    assert int(listing.query["limit"][0]) > 15
    assert not elabftw_fake.calls("GET", "teams/.*/experiments_status")  # "2" is an id


@pytest.mark.parametrize("suffix", ["", "/", "/elab", "/elab/", "/a/b/"])
def test_record_url_and_id_from_location(
    suffix: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    for n in range(1, 5):  # someone else's experiments: the new one is 5
        elabftw_fake.experiments[n] = stranger(n, f"other-{n}")
    site = elabftw_fake.url.rstrip("/") + suffix
    result = destination(elabftw_url=site).export(context_for(place(name=f"{SESSION}.xml")))

    create = elabftw_fake.calls("POST", "experiments")[0]
    assert create.status == 201
    assert result.record_id == "5"  # from Location, whose host is not the one we called
    root = elabftw_fake.url.rstrip("/") + suffix.rstrip("/")
    assert result.record_url == f"{root}/experiments.php?mode=view&id=5"
    assert {r.raw_path.split("/api/v2/")[0] for r in elabftw_fake.requests} == {suffix.rstrip("/")}


def test_hostile_record_is_escaped_in_the_body(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    path = place(name=f"{SESSION}.xml")
    evil = '<script>alert("x")</script> & "q"'
    xml_evil = evil.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    content = path.read_bytes()
    content = content.replace(b"FEI-Titan-TEM", xml_evil.replace('"', "&quot;").encode())
    content = content.replace(b"Ned Land (ned)", xml_evil.encode())
    path.write_bytes(content)
    cdcs = 'https://cdcs.example.org/data?id=1"><script>alert(1)</script>'

    destination().export(context_for(path, cdcs))

    exp = elabftw_fake.experiments[1]
    body = Tags(exp["body"])
    assert "script" not in body.tags
    assert body.tags <= {"h1", "h2", "ul", "li", "strong", "a"}
    assert body.hrefs == [cdcs]  # one attribute, quotes escaped, not broken out of
    assert "<script" not in exp["body"]
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &quot;q&quot;" in exp["body"]
    assert next(items for kind, items in Outline(exp["body"]).blocks if kind == "ul")[1:3] == [
        f"Instrument: {evil}",
        f"User: {evil}",
    ]
    # Tags and extra fields are plain text (JSON); eLabFTW escapes them when shown.
    assert evil in exp["tags"]
    assert fields(exp)["User"] == evil


def test_javascript_cdcs_url_is_not_a_link(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    url = "javascript:alert(document.cookie)"
    destination().export(context_for(place(name=f"{SESSION}.xml"), url))
    exp = elabftw_fake.experiments[1]
    assert Tags(exp["body"]).hrefs == []
    assert url in exp["body"]
    assert json.loads(exp["metadata"])["extra_fields"]["CDCS Record"]["type"] == "text"


def test_bad_key_fails_clearly_without_the_key(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    key = "3-wrong-secret-key-0123456789"
    dest = destination(elabftw_api_key=key)
    with pytest.raises(PermanentError) as caught:
        dest.export(context_for(place(name=f"{SESSION}.xml")))
    assert caught.value.status_code == 401
    assert "HTTP 401" in str(caught.value)
    assert key not in str(caught.value)
    ok, reason = dest.validate_config()
    assert not ok
    assert reason is not None
    assert "401" in reason
    assert key not in reason
    assert elabftw_fake.experiments == {}


def test_key_echoed_by_a_proxy_is_scrubbed(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    original = elabftw_fake.handle
    elabftw_fake.handle = lambda req: (  # type: ignore[method-assign]
        (400, {}, {"message": f"bad header {req.headers['authorization']}"})
        if req.method == "POST"
        else original(req)
    )
    with pytest.raises(PermanentError) as caught:
        dest.export(context_for(place(name=f"{SESSION}.xml")))
    assert elabftw_fake.api_key not in str(caught.value)
    assert "***" in str(caught.value)


# -- no duplicates ---------------------------------------------------------------------------


@RELEASES
@pytest.mark.parametrize("lost_reply", [False, True], ids=["refused", "reply-lost"])
def test_transient_503_then_retry_makes_no_duplicate(
    release: str,
    lost_reply: bool,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    elabftw_fake.version = release
    dest = destination()
    context = context_for(place(name=f"{SESSION}.xml"))
    elabftw_fake.fail_next("POST", "experiments", 503, after=lost_reply)
    with pytest.raises(TransientError):
        dest.export(context)
    assert len(elabftw_fake.experiments) == int(lost_reply)

    result = dest.export(context)
    assert result.success
    assert list(elabftw_fake.experiments) == [1]
    exp = elabftw_fake.experiments[1]
    assert len(exp["uploads"]) == 1
    assert exp["tags"] == ["NexusLIMS", "FEI-Titan-TEM", "Ned Land (ned)"]
    assert len(elabftw_fake.calls("POST", "experiments")) == 1 + int(not lost_reply)


@pytest.mark.parametrize("status", [500, 503])
def test_upload_failure_then_retry_keeps_one_experiment(
    status: int,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    context = context_for(place(name=f"{SESSION}.xml"), CDCS_URL)
    elabftw_fake.fail_next("POST", "experiments/1/uploads", status)
    with pytest.raises(TransientError if status == 503 else PermanentError):
        dest.export(context)
    assert elabftw_fake.experiments[1]["uploads"] == []

    result = dest.export(context)  # the pipeline's retry, or the operator's
    assert list(elabftw_fake.experiments) == [1]
    assert len(elabftw_fake.experiments[1]["uploads"]) == 1
    assert (result.record_id, result.metadata["upload_id"]) == ("1", 1)
    assert not elabftw_fake.calls("PATCH", ".*")  # the link was there from the start


def test_pipeline_retries_transient_failures(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    app = make_app(destination(), retry_max_time=30)
    path = place(name=f"{SESSION}.xml")
    elabftw_fake.fail_next("POST", "experiments", 504, after=True)
    elabftw_fake.fail_next("POST", "experiments/1/uploads", 503, times=2)
    report = app.pipeline.process(path)
    assert report.outcome is Outcome.EXPORTED, report.error
    [result] = report.results
    assert (result.success, result.record_id, result.attempts) == (True, "1", 4)
    assert list(elabftw_fake.experiments) == [1]
    assert len(elabftw_fake.experiments[1]["uploads"]) == 1


def test_the_search_names_the_field_and_includes_archived_experiments(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """On eLabFTW 5.4+, the extended search for the exact field, normal and archived."""
    context = context_for(place(name=f"{SESSION}.xml"))
    destination().export(context)

    [first] = searches(elabftw_fake)  # one query for the hash and the session
    session = SESSION.replace("_", "\\_")  # "_" is a LIKE wildcard: escaped
    assert first["extended"] == (
        f'extrafield:"SHA-256":{context.sha256} OR extrafield:"Session ID":"{session}" '
        f'OR extrafield:"Session":"{session}"'
    )
    assert first["state"] == "1,2"
    assert "q" not in first


@RELEASES
def test_title_body_and_custom_id_matches_are_not_taken_for_ours(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """Experiments that quote the hash or the session, or whose custom_id is the session's
    leading number (the text search matches ``custom_id = 2018``), are left alone; on a
    server with the extended search they are not even listed."""
    elabftw_fake.version = release
    context = context_for(place(name=f"{SESSION}.xml"))
    elabftw_fake.experiments[1] = stranger(
        1, "other", title=f"Compare with {SESSION}", body=f"<p>{context.sha256}</p>"
    )
    elabftw_fake.experiments[2] = stranger(2, "other", title="Numbered", custom_id=2018)
    before = copy.deepcopy(elabftw_fake.experiments)

    assert destination().export(context).record_id == "3"

    assert {k: v for k, v in elabftw_fake.experiments.items() if k != 3} == before
    listed = set()
    for params in searches(elabftw_fake):  # what each search answered, asked again
        listed |= {
            hit["id"] for hit in fake_api(elabftw_fake, "GET", "experiments", params=params).json()
        }
    # The text search lists both (the fields say they are not ours); the extended one
    # lists only the experiment it made since.
    assert listed - {3} == ({1, 2} if release == "5.3.0" else set())


@RELEASES
def test_search_hits_of_other_sessions_are_left_alone(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """Only an experiment whose session field is this session exactly is taken as ours."""
    elabftw_fake.version = release
    lookalikes = [
        f"{SESSION}5",  # holds the identifier
        SESSION.replace("_", "-"),  # "_" is a wildcard in eLabFTW's search (SQL LIKE)
        SESSION.upper(),  # the search ignores case
    ]
    for n, session in enumerate(lookalikes, start=1):
        elabftw_fake.experiments[n] = stranger(n, session)
    elabftw_fake.experiments[4] = stranger(4, SESSION, metadata=None)  # no session field
    before = copy.deepcopy(elabftw_fake.experiments)
    # The search for the session finds all four: they are really put to the test.
    found = fake_api(elabftw_fake, "GET", "experiments", params={"q": f'"{SESSION}"'}).json()
    assert sorted(hit["id"] for hit in found) == [1, 2, 3, 4]

    result = destination().export(context_for(place(name=f"{SESSION}.xml")))

    assert result.record_id == "5"
    assert {k: v for k, v in elabftw_fake.experiments.items() if k != 5} == before
    assert fields(elabftw_fake.experiments[5])["Session ID"] == SESSION
    assert not elabftw_fake.calls("PATCH", "experiments/[1-4]")


@RELEASES
def test_an_archived_experiment_of_the_session_is_found_and_not_duplicated(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    """A scientist archived the experiment; an nxdrop with a fresh database (or a re-drop)
    finds it, archived as it is, and makes no second one; new content is refused, naming
    the experiment, since eLabFTW allows no change to an archived one."""
    elabftw_fake.version = release
    path = place(name=f"{SESSION}.xml")
    destination().export(context_for(path))  # by an nxdrop whose database is gone
    elabftw_fake.archive(1)
    assert fake_api(elabftw_fake, "GET", "experiments").json() == []  # not listed by default
    archived = copy.deepcopy(elabftw_fake.experiments[1])

    app = make_app(destination())
    report = app.pipeline.process(path)

    assert report.ok, report.error
    assert list(elabftw_fake.experiments) == [1]
    assert elabftw_fake.experiments[1] == archived  # untouched
    assert report.results[0].record_id == "1"
    assert report.results[0].metadata["archived"] is True

    shutil.move(drop / "uploaded" / path.name, path)
    rebuild(path)
    with pytest.raises(PermanentError, match=r"experiment 1 .*archived") as caught:
        destination().export(context_for(path))
    assert caught.value.status_code == 422
    assert list(elabftw_fake.experiments) == [1]
    assert elabftw_fake.experiments[1] == archived


# -- a hostile world ---------------------------------------------------------------------

ECHOED_KEY = "3-e5c4a1ed0123456789abcdef0123456789abcdef"


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    """``hostile(behaviour, tls=None)``: a misbehaving server on 127.0.0.1."""
    with hostile_servers() as start:
        yield start


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("kind", ECHOES)
def test_a_key_echoed_in_an_error_page_never_reaches_the_error(
    hostile: Callable[..., HostileServer],
    make_settings: Callable[..., Settings],
    place: Callable[..., Path],
    kind: str,
    status: int,
) -> None:
    server = hostile(echo_authorization(kind, status))
    dest = ELabFTWDestination()
    dest.configure(make_settings(elabftw_url=server.url, elabftw_api_key=ECHOED_KEY))

    with pytest.raises(DestinationError) as caught:
        dest.export(context_for(place(name=f"{SESSION}.xml")))
    ok, reason = dest.validate_config()

    assert isinstance(caught.value, PermanentError if status == 500 else TransientError)
    assert server.authorizations()[0] == ECHOED_KEY  # sent, and echoed back
    for message in (str(caught.value), reason or ""):
        assert f"HTTP {status}" in message
        assert leaked_parts(ECHOED_KEY, message) == []
        assert len(message) < 500  # the server's words in a line, never its page
    assert not ok
    if kind == "json":
        assert "invalid credentials ***" in str(caught.value)


def test_the_record_is_uploaded_with_its_length_and_its_exact_bytes(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    path = place(name=f"{SESSION}.xml")
    destination().export(context_for(path))
    (upload,) = elabftw_fake.calls("POST", r"experiments/\d+/uploads")
    assert upload.headers["content-length"] == str(len(upload.body))
    assert "transfer-encoding" not in upload.headers
    (attached,) = elabftw_fake.experiments[1]["uploads"]
    assert attached["content"] == path.read_bytes()


# -- category, status, team ------------------------------------------------------------


@pytest.mark.parametrize("release", ["5.6.0", "5.3.0"])
def test_another_teams_category_or_status_of_the_same_title_is_not_taken(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """Since 5.4 the lists hold other teams' entries that are not private: team 4's
    "Microscopy" (id 40) and "Success" (id 4) come after team 3's, and are not ours."""
    elabftw_fake.version = release
    listed = fake_api(elabftw_fake, "GET", "teams/3/experiments_categories?limit=100").json()
    other_team = [e["id"] for e in listed if e["title"] == "Microscopy" and e.get("team") == 4]
    assert other_team == ([40] if release == "5.6.0" else [])

    dest = destination(
        elabftw_experiment_category="Microscopy", elabftw_experiment_status="Success"
    )
    dest.export(context_for(place(name=f"{SESSION}.xml")))

    exp = elabftw_fake.experiments[1]
    assert (exp["category"], exp["status"]) == (20, 2)


def test_titles_resolved_once_and_unknown_titles_listed(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination(
        elabftw_experiment_category="Default",
        elabftw_experiment_status="SUCCESS",
        elabftw_team="3",
    )
    for n in range(3):  # three different records
        path = place(name=f"{SESSION}_{n}.xml")
        path.write_bytes(path.read_bytes() + f"<!-- {n} -->".encode())
        dest.export(context_for(path))
    assert [e["category"] for e in elabftw_fake.experiments.values()] == [1, 1, 1]
    assert [e["status"] for e in elabftw_fake.experiments.values()] == [2, 2, 2]
    assert len(elabftw_fake.calls("GET", "teams/3/experiments_.*")) == 2  # cached
    assert not elabftw_fake.calls("GET", "users/me")  # the team was given as an id

    ok, reason = destination(elabftw_experiment_status="Finished").validate_config()
    assert not ok
    assert reason is not None
    assert "NX_ELABFTW_EXPERIMENT_STATUS='Finished'" in reason
    # Only the team's own are offered.
    assert reason.endswith("available: 'Running', 'Success', 'Need to be redone'")


def test_two_entries_of_one_title_in_the_team_are_a_clear_error(
    elabftw_fake: FakeELabFTW, destination: Callable[..., ELabFTWDestination]
) -> None:
    elabftw_fake.categories.append(
        {"id": 21, "title": "Microscopy", "color": "ffffff", "team": 3, "ordering": 99}
    )
    ok, reason = destination(elabftw_experiment_category="Microscopy").validate_config()
    assert not ok
    assert reason is not None
    assert "NX_ELABFTW_EXPERIMENT_CATEGORY='Microscopy'" in reason
    assert "ids 20, 21" in reason


def test_team_current_needs_an_answer_from_users_me(
    elabftw_fake: FakeELabFTW, destination: Callable[..., ELabFTWDestination]
) -> None:
    elabftw_fake.user = {"userid": 7, "teams": [{"id": 3}, {"id": 4}]}  # which one?
    ok, reason = destination(elabftw_experiment_category="Default").validate_config()
    assert not ok
    assert reason is not None
    assert "NX_ELABFTW_TEAM" in reason
    elabftw_fake.user = {"userid": 7, "teams": [{"id": 3}]}
    assert destination(elabftw_experiment_category="Default").validate_config() == (True, None)


def test_validate_config(
    elabftw_fake: FakeELabFTW, destination: Callable[..., ELabFTWDestination]
) -> None:
    assert destination(elabftw_experiment_category="Microscopy").validate_config() == (True, None)
    assert elabftw_fake.calls("GET", "users/me")
    assert elabftw_fake.calls("GET", "info")
    elabftw_fake.fail_next("GET", "users/me", 500)
    ok, reason = destination().validate_config()
    assert not ok
    assert reason is not None
    assert "500" in reason
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}/"
    ok, reason = destination(elabftw_url=closed).validate_config()
    assert not ok
    assert reason is not None
    assert "cannot connect" in reason


# -- tags a team does not let users create ---------------------------------------------------


@RELEASES
def test_tags_the_team_forbids_leave_one_experiment_found_again_on_retry(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    """The team has the tag "NexusLIMS" but forbids users to create others: the experiment
    is made complete but for the tags it cannot have, which the result and the log name;
    a retry finds that one experiment; once an admin lets users create tags, the next
    export of the session adds them."""
    elabftw_fake.version = release
    elabftw_fake.user_create_tag = False
    elabftw_fake.team_tags = {"NexusLIMS"}  # an admin made it
    app = make_app(destination())
    path = place(name=f"{SESSION}.xml")

    report = app.pipeline.process(path)

    assert report.ok, report.error
    [exp] = elabftw_fake.experiments.values()
    assert exp["tags"] == ["NexusLIMS"]
    assert live_uploads(exp) == [(drop / "uploaded" / f"{SESSION}.xml").read_bytes()]
    [result] = report.results
    assert result.metadata["tags_missing"] == ["FEI-Titan-TEM", "Ned Land (ned)"]
    # One create, with the tags: stored, then refused for the new tag; found by its hash.
    [create] = elabftw_fake.calls("POST", "experiments")
    assert create.status == 400 and "FEI-Titan-TEM" in create.json()["tags"]
    refused = [r for r in elabftw_fake.calls("POST", r"experiments/\d+/tags") if r.status == 400]
    assert len(refused) == 2

    # The operator drops it again, with a fresh database: the same experiment.
    shutil.move(drop / "uploaded" / f"{SESSION}.xml", path)
    fresh = destination().export(context_for(path))
    assert fresh.record_id == str(exp["id"])
    assert list(elabftw_fake.experiments) == [exp["id"]]

    elabftw_fake.user_create_tag = True
    again = destination().export(context_for(path))
    assert "tags_missing" not in again.metadata
    assert elabftw_fake.experiments[exp["id"]]["tags"] == [
        "NexusLIMS",
        "FEI-Titan-TEM",
        "Ned Land (ned)",
    ]
    assert list(elabftw_fake.experiments) == [exp["id"]]


def test_a_create_carrying_a_forbidden_tag_stores_the_experiment_and_answers_400(
    elabftw_fake: FakeELabFTW,
) -> None:
    """Why a refused create is looked for: eLabFTW stores the experiment, then refuses the
    new tag, and its answer has no id (src/models/Experiments.php create → InsertTagsTrait)."""
    elabftw_fake.user_create_tag = False
    answer = fake_api(
        elabftw_fake, "POST", "experiments", json={"title": "x", "tags": ["brand new"]}
    )
    assert answer.status_code == 400
    assert answer.json()["description"] == "Users cannot create tags."
    assert "Location" not in answer.headers
    assert list(elabftw_fake.experiments) == [1]


# -- reconcile: the same record again ----------------------------------------------------


def test_reconcile_adds_the_cdcs_link_to_the_experiment(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    earlier = dest.export(context_for(path))  # CDCS failed the first time
    assert earlier.metadata["cdcs_url"] is None
    assert Tags(elabftw_fake.experiments[1]["body"]).hrefs == []

    same = dest.reconcile(context_for(path), earlier)  # still no CDCS: nothing to change
    assert (same.record_id, same.record_url, same.metadata) == (
        earlier.record_id,
        earlier.record_url,
        earlier.metadata,
    )
    assert not elabftw_fake.calls("PATCH", ".*")
    updated = dest.reconcile(context_for(path, CDCS_URL), earlier)

    assert list(elabftw_fake.experiments) == [1]
    exp = elabftw_fake.experiments[1]
    # The body is now the one made with the link from the start.
    assert Outline(exp["body"]).blocks[-2:] == [("h2", "Related Records"), ("ul", ["View in CDCS"])]
    assert Outline(exp["body"]).links == [("View in CDCS", CDCS_URL)]
    assert SESSION in exp["body"]  # the session details are still there
    assert fields(exp)["CDCS Record"] == CDCS_URL
    assert fields(exp)["Session ID"] == SESSION  # the other fields are kept
    assert (updated.success, updated.record_id, updated.record_url) == (
        True,
        "1",
        earlier.record_url,
    )
    assert updated.metadata == {"upload_id": 1, "cdcs_url": CDCS_URL}

    # Linked already: a look, and nothing else.
    before = len(elabftw_fake.requests)
    again = dest.reconcile(context_for(path, CDCS_URL), updated)
    assert [(r.method, r.path) for r in elabftw_fake.requests[before:]] == [
        ("GET", "experiments/1")
    ]
    assert (again.record_id, again.metadata) == ("1", updated.metadata)


class FlakyCDCS:
    """A stand-in CDCS that fails until told otherwise."""

    name, priority, enabled = "cdcs", 100, True

    def __init__(self, *, up: bool = False) -> None:
        self.up = up

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        if not self.up:
            return ExportResult(False, "cdcs", error_message="CDCS is down")
        return ExportResult(True, "cdcs", "65a1", CDCS_URL)


def test_redrop_after_cdcs_failure_links_the_existing_experiment(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    cdcs = FlakyCDCS()
    app = make_app(cdcs, destination(), export_strategy=Strategy.ALL)
    path = place(name=f"{SESSION}.xml")
    assert app.pipeline.process(path).outcome is Outcome.FAILED  # CDCS down, eLabFTW made it

    cdcs.up = True
    [failed] = (drop / "failed").glob("*.xml")
    shutil.move(failed, path)  # the operator's retry
    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED, report.error
    assert list(elabftw_fake.experiments) == [1]
    assert Tags(elabftw_fake.experiments[1]["body"]).hrefs == [CDCS_URL]
    assert report.results[1].metadata["cdcs_url"] == CDCS_URL
    assert len(elabftw_fake.calls("PATCH", "experiments/1")) == 1
    assert elabftw_log(app) == [("succeeded", "1"), ("reused", "1")]


def test_lost_reply_to_the_link_patch_links_once(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    """eLabFTW adds the link but its answer is lost: the retry finds the link there."""
    cdcs = FlakyCDCS()
    app = make_app(cdcs, destination(), export_strategy=Strategy.ALL, retry_max_time=30)
    path = place(name=f"{SESSION}.xml")
    assert app.pipeline.process(path).outcome is Outcome.FAILED  # CDCS down, eLabFTW made it
    cdcs.up = True
    elabftw_fake.fail_next("PATCH", "experiments/", 503, after=True)
    [failed] = (drop / "failed").glob("*.xml")
    shutil.move(failed, path)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED, report.error
    assert list(elabftw_fake.experiments) == [1]
    exp = elabftw_fake.experiments[1]
    assert Tags(exp["body"]).hrefs == [CDCS_URL]  # one link, not two
    assert exp["body"].count("Related Records") == 1
    assert fields(exp)["CDCS Record"] == CDCS_URL
    assert [r.status for r in elabftw_fake.calls("PATCH", "experiments/1")] == [503]
    elab = report.results[1]
    assert (elab.success, elab.record_id, elab.attempts) == (True, "1", 2)
    assert elab.metadata["cdcs_url"] == CDCS_URL
    assert elabftw_log(app) == [("succeeded", "1"), ("reused", "1")]


def test_reconcile_attaches_the_record_again_if_it_was_removed(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    earlier = dest.export(context_for(path))
    assert fake_api(elabftw_fake, "DELETE", "experiments/1/uploads/1").status_code == 204

    result = dest.reconcile(context_for(path), earlier)

    assert live_uploads(elabftw_fake.experiments[1]) == [path.read_bytes()]
    assert (result.record_id, result.metadata["upload_id"]) == ("1", 2)
    assert list(elabftw_fake.experiments) == [1]


# -- update: new content for the session ---------------------------------------------------


def test_new_content_for_a_session_updates_its_experiment(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    app = make_app(FlakyCDCS(up=True), destination())
    path = place(name=f"{SESSION}.xml")
    first_bytes = path.read_bytes()
    first = app.pipeline.process(path)
    assert first.ok, first.error
    # Someone adds a field of their own to the experiment meanwhile.
    exp = elabftw_fake.experiments[1]
    metadata = json.loads(exp["metadata"])
    metadata["extra_fields"]["Sample"] = {"type": "text", "value": "S-17"}
    exp["metadata"] = json.dumps(metadata)

    path.write_bytes(first_bytes)
    second_bytes = rebuild(path).replace(b"Ned Land (ned)", b"Pierre Aronnax (pa)")
    path.write_bytes(second_bytes)  # NexusLIMS rebuilt the record, with another user
    second = app.pipeline.process(path)

    assert second.ok, second.error
    assert list(elabftw_fake.experiments) == [1]  # one experiment for the session
    assert len(elabftw_fake.calls("POST", "experiments")) == 1
    exp = elabftw_fake.experiments[1]
    assert exp["title"] == f"NexusLIMS Experiment - {SESSION}"
    assert fields(exp)["SHA-256"] == sha256(second_bytes)
    assert fields(exp)["User"] == "Pierre Aronnax (pa)"
    assert "User: Pierre Aronnax (pa)" in Outline(exp["body"]).blocks[2][1]
    assert fields(exp)["CDCS Record"] == CDCS_URL
    assert Tags(exp["body"]).hrefs == [CDCS_URL]
    assert fields(exp)["Sample"] == "S-17"  # theirs, kept
    assert "Pierre Aronnax (pa)" in exp["tags"]
    assert live_uploads(exp) == [first_bytes, second_bytes]  # the earlier one stays
    old, new = first.results[1], second.results[1]
    assert (new.record_id, new.record_url) == (old.record_id, old.record_url)
    assert new.metadata == {"upload_id": 2, "cdcs_url": CDCS_URL}
    assert elabftw_log(app) == [("succeeded", "1"), ("updated", "1")]


@pytest.mark.parametrize(
    ("cdcs_then", "cdcs_now"), [(CDCS_URL, None), (None, CDCS_URL)], ids=["kept", "added"]
)
def test_update_keeps_or_adds_the_cdcs_link(
    cdcs_then: str | None,
    cdcs_now: str | None,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    earlier = dest.export(context_for(path, cdcs_then))
    rebuild(path)

    result = dest.update(context_for(path, cdcs_now), earlier)

    exp = elabftw_fake.experiments[1]
    assert fields(exp)["CDCS Record"] == CDCS_URL
    assert Tags(exp["body"]).hrefs == [CDCS_URL]
    groups = json.loads(exp["metadata"])["elabftw"]["extra_fields_groups"]
    assert {"id": 2, "name": "Related Records"} in groups
    assert (result.record_id, result.metadata["cdcs_url"]) == ("1", CDCS_URL)


@RELEASES
def test_a_fresh_database_finds_the_sessions_experiment(
    release: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    """An nxdrop whose database is new (or lost) finds the session's older experiment."""
    elabftw_fake.version = release
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    first_bytes = path.read_bytes()
    dest.export(context_for(path))  # made by an nxdrop whose database is gone
    second_bytes = rebuild(path)

    app = make_app(dest)
    report = app.pipeline.process(path)

    assert report.ok, report.error
    assert list(elabftw_fake.experiments) == [1]
    assert len(elabftw_fake.calls("POST", "experiments")) == 1
    exp = elabftw_fake.experiments[1]
    assert fields(exp)["SHA-256"] == sha256(second_bytes)
    assert live_uploads(exp) == [first_bytes, second_bytes]
    assert report.results[0].record_id == "1"
    assert elabftw_log(app) == [("succeeded", "1")]


@pytest.mark.parametrize("new_bytes", [False, True], ids=["same-bytes", "new-bytes"])
@pytest.mark.parametrize("fate", ["another-session", "deleted", "gone"])
def test_a_stored_id_that_is_not_ours_any_more_is_left_alone(
    fate: str,
    new_bytes: bool,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    """The log names experiment 1, but it is someone else's now, deleted, or gone."""
    app = make_app(destination())
    path = place(name=f"{SESSION}.xml")
    content = path.read_bytes()
    assert app.pipeline.process(path).ok
    if fate == "another-session":  # say, eLabFTW restored from a backup: ids used anew
        elabftw_fake.experiments[1] = stranger(1, "2019-01-01_Other_1")
    elif fate == "deleted":  # deleted in eLabFTW: kept, but no longer shown
        assert fake_api(elabftw_fake, "DELETE", "experiments/1").status_code == 204
        assert fake_api(elabftw_fake, "GET", "experiments/1").status_code == 403
    else:
        del elabftw_fake.experiments[1]
    before = copy.deepcopy(elabftw_fake.experiments.get(1))
    patched_before = len(elabftw_fake.calls("PATCH", ".*"))

    path.write_bytes(content)
    if new_bytes:
        content = rebuild(path)
    report = app.pipeline.process(path)

    assert report.ok, report.error
    assert elabftw_fake.experiments.get(1) == before  # untouched
    assert len(elabftw_fake.calls("PATCH", ".*")) == patched_before
    assert [k for k, e in elabftw_fake.experiments.items() if e.get("state") == 1 and k > 1] == [2]
    ours = elabftw_fake.experiments[2]
    assert (fields(ours)["Session ID"], fields(ours)["SHA-256"]) == (SESSION, sha256(content))
    assert live_uploads(ours) == [content]
    assert report.results[0].record_id == "2"
    assert elabftw_log(app) == [("succeeded", "1"), ("succeeded", "2")]  # a new record


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "experiments/1/uploads"), ("PATCH", "experiments/1")],
    ids=["upload", "patch"],
)
def test_update_after_a_lost_reply_does_nothing_twice(
    method: str,
    path: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    app = make_app(destination(), retry_max_time=30)
    record = place(name=f"{SESSION}.xml")
    first_bytes = record.read_bytes()
    assert app.pipeline.process(record).ok
    record.write_bytes(first_bytes)
    second_bytes = rebuild(record)
    elabftw_fake.fail_next(method, path, 503, after=True)  # done, but the answer is lost

    report = app.pipeline.process(record)

    assert report.ok, report.error
    [result] = report.results
    assert (result.record_id, result.attempts) == ("1", 2)
    exp = elabftw_fake.experiments[1]
    assert live_uploads(exp) == [first_bytes, second_bytes]  # one new upload, not two
    assert len(elabftw_fake.calls("POST", "experiments/1/uploads")) == 2
    assert len(elabftw_fake.calls("PATCH", "experiments/1")) == 1
    assert fields(exp)["SHA-256"] == sha256(second_bytes)
    assert elabftw_log(app) == [("succeeded", "1"), ("updated", "1")]


def test_update_of_an_experiment_locked_by_someone_else_fails_clearly(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    earlier = dest.export(context_for(path))
    exp = elabftw_fake.experiments[1]
    exp["locked"], exp["lockedby"] = 1, 99  # a colleague locked (or timestamped) it
    before = copy.deepcopy(elabftw_fake.experiments)
    rebuild(path)

    with pytest.raises(PermanentError) as caught:
        dest.update(context_for(path), earlier)

    assert caught.value.status_code == 403
    assert "experiment 1" in str(caught.value)
    assert "locked" in str(caught.value)
    assert elabftw_fake.experiments == before  # no second experiment either


# -- the Prism mock of the spec ---------------------------------------------------------


def violations(response: requests.Response) -> list[dict[str, Any]]:
    """What Prism found wrong with the request that got ``response`` (not with the answer
    Prism made up: the spec's ``info`` answer is a ``oneOf`` its example fits twice)."""
    header = response.headers.get("sl-violations")
    found = json.loads(header) if header else []
    return [v for v in found if v["location"][0] == "request"]


def answer_with(dest: ELabFTWDestination, path: str, shown: Any) -> None:
    """Prism is stateless and answers the spec's examples: make its answer to ``GET
    <path>`` (after Prism checked the request) be ``shown`` instead."""

    def answer(response: requests.Response, *args: Any, **kwargs: Any) -> None:
        request = response.request
        if request.method == "GET" and request.path_url == f"/api/v2/{path}":
            # nxdrop streams every answer from ``raw``: the body is replaced there.
            data = json.dumps(shown).encode()
            response.close()
            response.status_code, response.reason = 200, "OK"
            response.headers["Content-Length"] = str(len(data))
            response.headers.pop("Content-Encoding", None)
            response.raw = urllib3.HTTPResponse(
                io.BytesIO(data), headers=response.headers, status=200, preload_content=False
            )

    assert dest._client is not None
    dest._client.client.session.hooks["response"].append(answer)


@pytest.fixture(params=["5.6.0", "5.3.0"])
def prism_destination(
    request: pytest.FixtureRequest,
    elabftw_prism: Prism,
    make_settings: Callable[..., Settings],
) -> tuple[ELabFTWDestination, list[requests.Response]]:
    """A destination pointed at Prism, and every response it gets; the server says it is
    eLabFTW 5.6 (merges) or 5.3 (no extended search, no merge)."""
    dest = ELabFTWDestination()
    dest.configure(
        make_settings(
            elabftw_url=elabftw_prism.url,
            elabftw_api_key="3-0123456789abcdef",
            elabftw_experiment_category="STRING",  # Prism's placeholder title
            elabftw_experiment_status="1",
            elabftw_team="1",  # the spec's users/me has no team field
        )
    )
    seen: list[requests.Response] = []
    assert dest._client is not None
    dest._client.client.session.hooks["response"].append(lambda r, *a, **k: seen.append(r))
    # The spec's own example of info says 4.8.0 (and Prism cannot pick one of its oneOf).
    answer_with(dest, "info", {"elabftw_version": request.param})
    return dest, seen


@pytest.mark.prism
def test_prism_accepts_what_export_sends(
    prism_destination: tuple[ELabFTWDestination, list[requests.Response]],
    place: Callable[..., Path],
) -> None:
    dest, seen = prism_destination
    assert dest.validate_config() == (True, None)
    result = dest.export(context_for(place(name=f"{SESSION}.xml"), CDCS_URL))

    assert result.record_id == "42"
    assert result.metadata["upload_id"] == 42
    calls = [(r.request.method, r.request.path_url.split("?")[0]) for r in seen]
    assert set(calls) >= {
        ("GET", "/api/v2/users/me"),
        ("GET", "/api/v2/info"),
        ("GET", "/api/v2/teams/1/experiments_categories"),
        ("GET", "/api/v2/experiments"),
        ("POST", "/api/v2/experiments"),
        ("POST", "/api/v2/experiments/42/uploads"),
    }
    # The tags go with the create (its body checked against the spec below); the tag
    # calls of update and reconcile are checked in the test after this one.
    [create] = [r for r in seen if (r.request.method, r.request.path_url) == CREATE]
    assert json.loads(create.request.body or b"{}")["tags"] == [
        "NexusLIMS",
        "FEI-Titan-TEM",
        "Ned Land (ned)",
    ]
    assert [(r.request.path_url, violations(r)) for r in seen if violations(r)] == []


CREATE = ("POST", "/api/v2/experiments")


def pretend_ours(dest: ELabFTWDestination, sha: str) -> None:
    """Make Prism's answer to ``GET experiments/42`` show SESSION's experiment for ``sha``
    (with no upload, no tag, no CDCS link), so that the calls after it can be checked."""
    metadata = {
        "extra_fields": {
            "Session ID": {"type": "text", "value": SESSION, "group_id": 1},
            "SHA-256": {"type": "text", "value": sha, "group_id": 1},
        },
        "elabftw": {
            "extra_fields_groups": [
                {"id": 1, "name": "Session Information"},
                {"id": 2, "name": "Related Records"},
            ]
        },
    }
    shown = {
        "id": 42,
        "title": f"NexusLIMS Experiment - {SESSION}",
        "body": "<h1>NexusLIMS Microscopy Session</h1>",
        "content_type": 1,
        "metadata": json.dumps(metadata),
        "uploads": [],
    }
    answer_with(dest, "experiments/42", shown)


@pytest.mark.prism
@pytest.mark.parametrize("call", ["update", "reconcile"])
def test_prism_accepts_what_update_and_reconcile_send_but_the_metadata_type(
    call: str,
    prism_destination: tuple[ELabFTWDestination, list[requests.Response]],
    place: Callable[..., Path],
) -> None:
    """Every request ``update`` and ``reconcile`` send fits the spec, but one difference:
    the real server wants PATCH metadata (and metadatamerge) as a JSON string; the spec
    (Prism) an object."""
    dest, seen = prism_destination
    context = context_for(place(name=f"{SESSION}.xml"), CDCS_URL)
    pretend_ours(dest, "0" * 64 if call == "update" else context.sha256)
    earlier = ExportResult(True, "elabftw", "42", metadata={"upload_id": 7, "cdcs_url": None})
    merges = dest.api.version() >= METADATA_MERGE

    with pytest.raises(PermanentError, match="422"):
        getattr(dest, call)(context, earlier)

    assert [(r.request.method, r.request.path_url) for r in seen] == [
        ("GET", "/api/v2/info"),
        ("GET", "/api/v2/experiments/42"),
        ("POST", "/api/v2/experiments/42/uploads"),  # the record, attached again
        *[("POST", "/api/v2/experiments/42/tags")] * 3,
        ("PATCH", "/api/v2/experiments/42"),  # new content, or the CDCS link
    ]
    *answered, patch = seen[1:]
    assert [(r.status_code, violations(r)) for r in answered] == [(200, [])] + [(201, [])] * 4
    found = violations(patch)
    ours = [v for v in found if v["code"] not in ("anyOf", "required")]  # the other anyOf arm
    key = "metadatamerge" if merges else "metadata"
    assert [(v["location"], v["code"]) for v in ours] == [(["request", "body", key], "type")]
    sent = json.loads(patch.request.body or b"{}")
    # Update: the title is the session's already. Reconcile: the link, appended.
    assert set(sent) == ({"body", key} if call == "update" else {"bodyappend", key})
    # The same PATCH with the metadata as an object is what the spec wants: accepted.
    sent[key] = json.loads(sent[key])
    assert dest._client is not None
    again = dest._client.client.session.patch(str(patch.request.url), json=sent, timeout=10)
    assert (again.status_code, violations(again)) == (200, [])
