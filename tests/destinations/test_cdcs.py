"""The CDCS destination against the real CDCS (shared/peers/cdcs): what a user would check."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from nxdrop.app import App
from nxdrop.destinations.base import ExportContext, ExportResult
from nxdrop.destinations.cdcs import CDCSDestination
from nxdrop.exceptions import ConfigError, DestinationError, PermanentError, TransientError
from nxdrop.pipeline import Outcome
from nxdrop.settings import Settings
from tests.conftest import RECORDS
from tests.fixtures.cdcs_fake import FakeCDCS
from tests.fixtures.cdcs_server import CDCSClient, CDCSServer, SubPathProxy
from tests.fixtures.hostile import (
    ECHOES,
    HostileServer,
    certificate_authority,
    echo_authorization,
    hostile_servers,
    leaked_parts,
    relay_to,
)

cdcs = pytest.mark.cdcs
Place = Callable[..., Path]
MakeSettings = Callable[..., Settings]
MakeApp = Callable[..., App]

TEMPLATES = r"/rest/template-version-manager/global/$"
TEMPLATE_XSD = r"^/rest/template/\d+/$"
WORKSPACES = r"/rest/workspace/read_access/$"
CREATE = r"^/rest/data/$"
UPDATE = r"^/rest/data/\d+/$"
ASSIGN = r"^/rest/data/\d+/assign/\d+$"
BOGUS = (b"<project>", b"<bogus/><project>")  # well-formed, but not what the template allows


def unique_session() -> str:
    return f"2024-01-01_FEI-Titan-TEM_{uuid.uuid4().hex[:12]}"


def context_for(path: Path) -> ExportContext:
    """What the pipeline hands a destination, made by hand from a file."""
    stem = path.name.removesuffix(".xml")
    return ExportContext(
        xml_file_path=path,
        session_identifier=stem,
        instrument_pid="FEI-Titan-TEM",
        user=None,
        dt_from=None,
        dt_to=None,
    )


def rebuilt(content: bytes, version: str) -> bytes:
    """The same session's record rebuilt with other content (still valid): a new title."""
    return content.replace(b"<title>", f"<title>{version}: ".encode(), 1)


def cdcs_states(app: App, session: str) -> list[str]:
    """The ``upload_log.state`` of the CDCS attempts of a session, oldest first."""
    return [row.state for row in app.store.uploads(session) if row.destination_name == "cdcs"]


def own_count(cdcs_server: CDCSServer, session: str) -> int:
    """How many records titled ``session`` the token user (alice) owns."""
    found = alice(cdcs_server).call("GET", "rest/data/", params={"title": session})
    return int(found["count"])


def alice(cdcs_server: CDCSServer) -> CDCSClient:
    """A client with the token nxdrop uses: alice, who may publish."""
    return CDCSClient(cdcs_server.url, cdcs_server.user_token)


@pytest.fixture
def destination(
    make_settings: MakeSettings, cdcs_server: CDCSServer
) -> Callable[..., CDCSDestination]:
    """A configured CDCSDestination; keywords override the settings (``cdcs_url`` etc.)."""

    def make(**overrides: Any) -> CDCSDestination:
        values = {"cdcs_url": cdcs_server.url, "cdcs_token": cdcs_server.user_token}
        dest = CDCSDestination()
        dest.configure(make_settings(**{**values, **overrides}))
        return dest

    return make


@pytest.fixture
def record(place: Place) -> Callable[..., Path]:
    """A corpus record in the drop folder under a session identifier of its own."""
    return lambda corpus_name=RECORDS[0]: place(corpus_name, name=f"{unique_session()}.xml")


# -- the main path ---------------------------------------------------------------------


@cdcs
@pytest.mark.parametrize("corpus_name", RECORDS)
def test_record_arrives_byte_identical_and_published(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    corpus_name: str,
) -> None:
    path = record(corpus_name)
    session = path.name.removesuffix(".xml")

    result = destination().export(context_for(path))

    assert result.success
    assert result.destination_name == "cdcs"
    assert result.record_url == f"{cdcs_server.url}data?id={result.record_id}"
    stored = cdcs_server.client.record(str(result.record_id))
    sent = path.read_bytes()
    # CDCS keeps xml_content verbatim, CRLF included (example_record.xml has 1679 of them).
    assert stored["xml_content"].encode("utf-8") == sent
    assert stored["xml_content"].count("\r\n") == sent.count(b"\r\n")
    assert stored["title"] == session
    assert str(stored["template"]) == cdcs_server.template_id
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert result.metadata == {
        "template": cdcs_server.template_id,
        "workspace": str(cdcs_server.client.public_workspace()),
        "title": session,
    }


def test_corpus_crlf_record_really_has_crlf(corpus: Path) -> None:
    # The byte-identity test above means little unless the corpus keeps its CRLF.
    assert b"\r\n" in (corpus / "example_record.xml").read_bytes()


@cdcs
def test_unpublished_when_asked(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    result = destination(cdcs_assign_to_public_workspace=False).export(context_for(record()))
    assert cdcs_server.client.record(str(result.record_id))["workspace"] is None
    assert result.metadata["workspace"] is None


@cdcs
@pytest.mark.parametrize("suffix", ["", "/"])
def test_sub_path_url_with_and_without_slash(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    suffix: str,
) -> None:
    path = record()
    result = destination(cdcs_url=cdcs_proxy.url + suffix).export(context_for(path))

    assert result.record_url == f"{cdcs_proxy.url}/data?id={result.record_id}"
    assert cdcs_proxy.count("POST", CREATE) == 1
    stored = cdcs_server.client.record(str(result.record_id))
    assert stored["xml_content"].encode() == path.read_bytes()
    assert stored["workspace"] == cdcs_server.client.public_workspace()


# -- published in one request ----------------------------------------------------------


@cdcs
def test_a_record_is_created_published_in_one_request(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
) -> None:
    result = destination(cdcs_url=cdcs_proxy.url).export(context_for(record()))

    # Public on the server, and no assign call made it so: the POST did.
    assert cdcs_server.client.record(str(result.record_id))["workspace"] == (
        cdcs_server.client.public_workspace()
    )
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", ASSIGN) == 0


@cdcs
def test_a_user_who_may_not_publish_fails_clearly_and_nothing_is_created(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    dest = destination(cdcs_url=cdcs_proxy.url, cdcs_token=cdcs_server.user_without_publish_right())
    # CDCS answers this refusal with a 500, like a fault: it must not be retried as one.
    app = make_app(dest, retry_max_time=30)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.FAILED
    (result,) = report.results
    assert result.attempts == 1
    message = result.error_message or ""
    assert "may not publish" in message
    assert "rights to publish" in message  # CDCS's own words
    assert "NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE" in message
    assert cdcs_server.client.records_titled(session) == []  # no private record left behind
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert (drop / "failed" / path.name).is_file()


# -- templates -------------------------------------------------------------------------


@cdcs
@pytest.mark.parametrize("by", ["title", "id"])
def test_template_by_title_or_id(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    by: str,
) -> None:
    setting = cdcs_server.template_title if by == "title" else cdcs_server.template_id
    result = destination(cdcs_template=setting).export(context_for(record()))
    assert result.metadata["template"] == cdcs_server.template_id
    assert str(cdcs_server.client.record(str(result.record_id))["template"]) == (
        cdcs_server.template_id
    )


@cdcs
def test_unknown_template_names_the_variable(
    destination: Callable[..., CDCSDestination], record: Callable[..., Path]
) -> None:
    dest = destination(cdcs_template="No Such Template")
    with pytest.raises(PermanentError, match="NX_CDCS_TEMPLATE='No Such Template'"):
        dest.export(context_for(record()))
    ok, reason = dest.validate_config()
    assert not ok
    assert reason is not None
    assert "NX_CDCS_TEMPLATE" in reason


@cdcs
def test_several_templates_need_the_setting(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
) -> None:
    # Adding a second global template to the real CDCS would change it for every later
    # test (CDCS cannot delete one through REST), so the proxy plays that one endpoint.
    managers = [
        {"id": 1, "title": cdcs_server.template_title, "current": cdcs_server.template_id,
         "versions": [cdcs_server.template_id], "is_disabled": False},
        {"id": 99, "title": "Other Schema", "current": "999", "versions": ["999"],
         "is_disabled": False},
    ]  # fmt: skip
    cdcs_proxy.answer("GET", TEMPLATES, 200, managers)

    with pytest.raises(PermanentError) as caught:
        destination(cdcs_url=cdcs_proxy.url).export(context_for(record()))
    message = str(caught.value)
    assert "NX_CDCS_TEMPLATE" in message
    assert cdcs_server.template_title in message
    assert "Other Schema" in message
    assert cdcs_proxy.count("POST", CREATE) == 0

    chosen = destination(cdcs_url=cdcs_proxy.url, cdcs_template=cdcs_server.template_title)
    assert chosen.export(context_for(record())).metadata["template"] == cdcs_server.template_id


@cdcs
def test_template_and_workspace_looked_up_once_by_concurrent_workers(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_proxy: SubPathProxy,
) -> None:
    dest = destination(cdcs_url=cdcs_proxy.url)
    paths = [record(RECORDS[i % 2]) for i in range(6)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda p: dest.export(context_for(p)), paths))

    assert all(r.success for r in results)
    assert len({r.record_id for r in results}) == 6
    assert cdcs_proxy.count("GET", TEMPLATES) == 1
    assert cdcs_proxy.count("GET", TEMPLATE_XSD) == 1
    assert cdcs_proxy.count("GET", WORKSPACES) == 1


# -- no duplicates ---------------------------------------------------------------------


@cdcs
def test_second_export_of_same_content_reuses_the_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
) -> None:
    path = record()
    dest = destination(cdcs_url=cdcs_proxy.url)

    first = dest.export(context_for(path))
    second = dest.export(context_for(path))

    assert second.record_id == first.record_id
    assert len(cdcs_server.client.records_titled(path.name.removesuffix(".xml"))) == 1
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", UPDATE) == 0


@cdcs
def test_record_left_private_by_an_interrupted_attempt_is_found_and_published(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    # The earlier attempt died after CDCS created the record, before the assign.
    orphan = alice(cdcs_server).call(
        "POST",
        "rest/data/",
        json={"template": cdcs_server.template_id, "title": session,
              "xml_content": path.read_bytes().decode()},
    )  # fmt: skip
    assert orphan["workspace"] is None

    result = destination().export(context_for(path))

    assert result.record_id == str(orphan["id"])
    assert len(cdcs_server.client.records_titled(session)) == 1
    assert cdcs_server.client.record(orphan["id"])["workspace"] == (
        cdcs_server.client.public_workspace()
    )


# -- one session, one record -----------------------------------------------------------


@cdcs
@pytest.mark.parametrize("corpus_name", RECORDS)
def test_new_content_for_a_session_updates_its_one_record_in_place(
    destination: Callable[..., CDCSDestination],
    place: Place,
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
    corpus_name: str,
) -> None:
    session = unique_session()
    app = make_app(destination(cdcs_url=cdcs_proxy.url))
    first = app.pipeline.process(place(corpus_name, name=f"{session}.xml"))
    # The record builder rebuilds the session's record and drops it again.
    v2 = rebuilt((drop / "uploaded" / f"{session}.xml").read_bytes(), "v2")
    (drop / f"{session}.xml").write_bytes(v2)

    second = app.pipeline.process(drop / f"{session}.xml")

    assert first.ok and second.ok
    (one,), (two,) = first.results, second.results
    assert (two.record_id, two.record_url) == (one.record_id, one.record_url)
    stored = cdcs_server.client.record(str(two.record_id))
    assert stored["xml_content"].encode("utf-8") == v2  # byte for byte, CRLF included
    assert stored["title"] == session
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert len(cdcs_server.client.records_titled(session)) == 1
    assert cdcs_states(app, session) == ["succeeded", "updated"]
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", rf"^/rest/data/{one.record_id}/$") == 1
    # Published by its POST, and CDCS keeps the workspace through the PATCH.
    assert cdcs_proxy.count("PATCH", ASSIGN) == 0


@cdcs
def test_fresh_database_updates_the_record_cdcs_holds_instead_of_a_second(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    make_app: MakeApp,
    drop: Path,
    tmp_path: Path,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    v1 = path.read_bytes()
    first = make_app(destination()).pipeline.process(path)
    # The database is lost (or another daemon with its own log): CDCS holds version 1.
    fresh = make_app(destination(), data_path=tmp_path / "fresh-state")
    path.write_bytes(rebuilt(v1, "v2"))

    second = fresh.pipeline.process(path)

    assert first.ok and second.ok
    assert second.results[0].record_id == first.results[0].record_id
    assert len(cdcs_server.client.records_titled(session)) == 1
    stored = cdcs_server.client.record(str(second.results[0].record_id))
    assert stored["xml_content"].encode() == rebuilt(v1, "v2")
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert cdcs_states(fresh, session) == ["succeeded"]


@cdcs
def test_which_sessions_cdcs_holds_is_one_listing_for_many_and_answered_exactly(
    destination: Callable[..., CDCSDestination],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    corpus: Path,
) -> None:
    """A backlog in front of a CDCS holding records: which sessions it holds a record of is
    asked with one pattern of titles per listing, on CDCS's own database; what the loose
    pattern matches beyond the titles (another case, another character) is sorted out."""
    xml = (corpus / RECORDS[0]).read_text()
    base = unique_session()
    stored = {
        "own": f"{base}_plain",
        "odd": f"{base} Ångström (2)+µ.x[y]",
        "near": f"{base}_xzy",  # what "x.y" matches as a pattern
        "case": f"{base}_CASE",
    }
    for title in stored.values():
        alice(cdcs_server).call(
            "POST",
            "rest/data/",
            json={"template": cdcs_server.template_id, "title": title, "xml_content": xml},
        )
    others = f"{base}_others"  # only the token user's own records are the session's
    cdcs_server.client.call(
        "POST",
        "rest/data/",
        json={"template": cdcs_server.template_id, "title": others, "xml_content": xml},
    )
    asked = [unique_session() for _ in range(150)]
    asked += [f"{base}_x.y", f"{base}_case", others, stored["own"], stored["odd"]]

    held = destination(cdcs_url=cdcs_proxy.url).holds_records_of(asked)

    assert held == {stored["own"], stored["odd"]}
    [template, *listings] = cdcs_proxy.seen
    assert template == ("GET", "/rest/template-version-manager/global/")
    assert len(listings) == 3  # 155 titles, 75 a listing
    assert all(m == "GET" and re.match(r"/rest/data/\?.*regex=true", p) for m, p in listings)


@cdcs
def test_export_updates_the_most_recent_of_several_records_of_the_session(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    # Older nxdrop versions made a record per version; the newest is the one people use.
    path = record()
    session = path.name.removesuffix(".xml")
    content = path.read_bytes()
    made = [
        alice(cdcs_server).call(
            "POST",
            "rest/data/",
            json={
                "template": cdcs_server.template_id,
                "title": session,
                "xml_content": rebuilt(content, version).decode(),
            },
        )
        for version in ("v1", "v2")
    ]
    path.write_bytes(rebuilt(content, "v3"))

    result = destination().export(context_for(path))

    assert result.record_id == str(made[1]["id"])
    assert cdcs_server.client.record(made[1]["id"])["xml_content"].encode() == (
        rebuilt(content, "v3")
    )
    older = cdcs_server.client.record(made[0]["id"])
    assert older["xml_content"].encode() == rebuilt(content, "v1")
    assert older["workspace"] is None
    assert len(cdcs_server.client.records_titled(session)) == 2  # none added


@cdcs
@pytest.mark.parametrize("call", ["update", "reconcile"])
def test_record_edited_on_the_server_gets_this_content_back(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    call: str,
) -> None:
    path = record()
    dest = destination()
    earlier = dest.export(context_for(path))
    alice(cdcs_server).call(
        "PATCH",
        f"rest/data/{earlier.record_id}/",
        json={"xml_content": rebuilt(path.read_bytes(), "edited").decode()},
    )

    result = getattr(dest, call)(context_for(path), earlier)

    assert (result.record_id, result.record_url) == (earlier.record_id, earlier.record_url)
    stored = cdcs_server.client.record(str(earlier.record_id))
    assert stored["xml_content"].encode() == path.read_bytes()
    assert stored["workspace"] == cdcs_server.client.public_workspace()


# -- a stored id that is not (or no longer) ours ---------------------------------------

STRANGERS = {
    # The token user's own record of another session: what the same id names after the
    # server was reinstalled. The old reconcile published it.
    "own record, another session": ("user", "another title", False),
    # Another user's private record of this session: the token user cannot even read it.
    "another user's private record": ("admin", "this session", False),
    # Another user's published record of this session: readable, rightly titled, not ours.
    "another user's published record": ("admin", "this session", True),
}


@cdcs
@pytest.mark.parametrize("call", ["update", "reconcile"])
@pytest.mark.parametrize("stranger", list(STRANGERS))
def test_a_stored_id_naming_a_record_not_ours_leaves_it_untouched(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    call: str,
    stranger: str,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    owner, titled, published = STRANGERS[stranger]
    client = alice(cdcs_server) if owner == "user" else cdcs_server.client
    theirs = rebuilt(path.read_bytes(), "someone else's").decode()
    title = session if titled == "this session" else unique_session()
    made = client.call(
        "POST",
        "rest/data/",
        json={"template": cdcs_server.template_id, "title": title, "xml_content": theirs},
    )
    public = cdcs_server.client.public_workspace()
    if published:
        client.call("PATCH", f"rest/data/{made['id']}/assign/{public}")
    # What upload_log says this session's record is: that id, on this very server.
    stale = ExportResult(
        True,
        "cdcs",
        record_id=str(made["id"]),
        record_url=f"{cdcs_server.url}data?id={made['id']}",
        metadata={"template": cdcs_server.template_id, "workspace": str(public), "title": session},
    )

    result = getattr(destination(), call)(context_for(path), stale)

    left = cdcs_server.client.record(made["id"])
    assert left["xml_content"] == theirs
    assert left["title"] == title
    assert left["workspace"] == (public if published else None)
    assert result.record_id != str(made["id"])
    ours = cdcs_server.client.record(str(result.record_id))
    assert ours["title"] == session
    assert ours["xml_content"].encode() == path.read_bytes()
    assert ours["workspace"] == public
    assert own_count(cdcs_server, session) == 1


@cdcs
@pytest.mark.parametrize("call", ["update", "reconcile"])
def test_a_stored_id_that_was_deleted_gives_a_new_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    call: str,
) -> None:
    path = record()
    dest = destination()
    earlier = dest.export(context_for(path))
    cdcs_server.client.call("DELETE", f"rest/data/{earlier.record_id}/")
    if call == "update":
        path.write_bytes(rebuilt(path.read_bytes(), "v2"))

    anew = getattr(dest, call)(context_for(path), earlier)

    assert anew.record_id != earlier.record_id
    stored = cdcs_server.client.record(str(anew.record_id))
    assert stored["xml_content"].encode() == path.read_bytes()
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert own_count(cdcs_server, path.name.removesuffix(".xml")) == 1


@cdcs
def test_deleted_record_through_the_pipeline_is_logged_as_a_new_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    app = make_app(destination())
    first = app.pipeline.process(path)
    cdcs_server.client.call("DELETE", f"rest/data/{first.results[0].record_id}/")
    path.write_bytes(rebuilt((drop / "uploaded" / path.name).read_bytes(), "v2"))

    second = app.pipeline.process(path)

    assert second.ok
    assert second.results[0].record_id != first.results[0].record_id
    assert cdcs_states(app, session) == ["succeeded", "succeeded"]
    assert len(cdcs_server.client.records_titled(session)) == 1


# -- failures: the record's, or CDCS's ---------------------------------------------------


@cdcs
def test_a_schema_invalid_record_never_reaches_cdcs_and_its_error_names_the_problem(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record("example_record_curation.xml")
    path.write_bytes(path.read_bytes().replace(*BOGUS, 1))
    # No schema check of nxdrop's own (NX_SCHEMA_PATH=none): the template's is what is tested.
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30, schema_path="none")

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.FAILED
    (result,) = report.results
    assert not result.success
    assert result.attempts == 1
    message = result.error_message or ""
    # The template's own words, as CDCS would have answered them.
    assert f"CDCS template {cdcs_server.template_id} refuses the record" in message
    assert "Element '{https://data.nist.gov/od/dm/nexus/experiment/v1.0}bogus'" in message
    assert "This element is not expected" in message
    assert "not sent" in message
    assert cdcs_proxy.count("POST", CREATE) == 0
    assert cdcs_proxy.count("PATCH", r"^/rest/data/") == 0
    assert cdcs_server.client.records_titled(path.name.removesuffix(".xml")) == []
    assert (drop / "failed" / path.name).is_file()


@cdcs
def test_the_template_check_gives_cdcss_own_words(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    path = record("example_record_curation.xml")
    bad = path.read_bytes().replace(*BOGUS, 1)
    path.write_bytes(bad)
    # What CDCS itself answers to the same record, sent past nxdrop.
    answer = alice(cdcs_server).session.post(
        f"{cdcs_server.url}rest/data/",
        json={"template": cdcs_server.template_id, "title": unique_session(),
              "xml_content": bad.decode()},
        timeout=30,
    )  # fmt: skip

    with pytest.raises(PermanentError) as caught:
        destination().export(context_for(path))

    assert answer.status_code == 500
    assert str(caught.value).endswith(": " + answer.json()["message"])


@cdcs
def test_a_schema_invalid_update_is_never_sent_and_leaves_the_record_as_it_was(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record("example_record_curation.xml")
    session = path.name.removesuffix(".xml")
    v1 = path.read_bytes()
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30, schema_path="none")
    first = app.pipeline.process(path)
    path.write_bytes(v1.replace(*BOGUS, 1))

    second = app.pipeline.process(path)

    assert first.ok
    assert second.outcome is Outcome.FAILED
    (result,) = second.results
    assert result.attempts == 1
    message = result.error_message or ""
    record_id = first.results[0].record_id
    assert f"refuses the update of record {record_id}" in message
    assert "bogus" in message
    assert "not expected" in message
    assert cdcs_proxy.count("PATCH", rf"^/rest/data/{record_id}/$") == 0
    stored = cdcs_server.client.record(str(record_id))
    assert stored["xml_content"].encode() == v1
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert cdcs_states(app, session) == ["succeeded", "failed"]
    assert (drop / "failed" / path.name).is_file()


@cdcs
def test_schema_invalid_update_raises_permanent_error(
    destination: Callable[..., CDCSDestination], record: Callable[..., Path]
) -> None:
    path = record("example_record_curation.xml")
    dest = destination()
    earlier = dest.export(context_for(path))
    path.write_bytes(path.read_bytes().replace(*BOGUS, 1))
    with pytest.raises(PermanentError, match=f"refuses the update of record {earlier.record_id}"):
        dest.update(context_for(path), earlier)


@cdcs
def test_schema_invalid_record_raises_permanent_error(
    destination: Callable[..., CDCSDestination], record: Callable[..., Path]
) -> None:
    path = record("example_record_curation.xml")
    path.write_bytes(path.read_bytes().replace(*BOGUS, 1))
    with pytest.raises(PermanentError, match="refuses the record, so it was not sent") as caught:
        destination().export(context_for(path))
    assert caught.value.status_code is None  # no request made, so no status


SERVER_FAULT = {"message": "database is locked"}  # a 500 that CDCS gives for an outage


@cdcs
def test_a_500_for_a_valid_record_is_retried_and_makes_one_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record()
    session, content = path.name.removesuffix(".xml"), path.read_bytes()
    cdcs_proxy.answer("POST", CREATE, 500, SERVER_FAULT, times=1)
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED
    (result,) = report.results
    assert result.attempts == 2
    assert cdcs_proxy.count("POST", CREATE) == 2  # the refused one and the retry
    (stored,) = cdcs_server.client.records_titled(session)
    assert stored["xml_content"].encode() == content
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert str(stored["id"]) == result.record_id
    assert (drop / "uploaded" / path.name).is_file()


@cdcs
def test_a_500_whose_record_was_made_is_retried_onto_that_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    # CDCS saved the record, then failed (a search index down): the 500 lies about the work.
    cdcs_proxy.answer("POST", CREATE, 500, SERVER_FAULT, times=1, after=True)
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED
    assert report.results[0].attempts == 2
    assert cdcs_proxy.count("POST", CREATE) == 1  # the retry found it and sent nothing again
    (stored,) = cdcs_server.client.records_titled(session)
    assert str(stored["id"]) == report.results[0].record_id


@cdcs
def test_a_500_to_an_update_of_a_valid_record_is_retried(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30)
    first = app.pipeline.process(path)
    v2 = rebuilt((drop / "uploaded" / path.name).read_bytes(), "v2")
    path.write_bytes(v2)
    cdcs_proxy.answer("PATCH", UPDATE, 500, SERVER_FAULT, times=1)

    second = app.pipeline.process(path)

    assert second.outcome is Outcome.EXPORTED
    assert second.results[0].attempts == 2
    assert second.results[0].record_id == first.results[0].record_id
    (stored,) = cdcs_server.client.records_titled(session)
    assert stored["xml_content"].encode() == v2
    assert cdcs_states(app, session) == ["succeeded", "updated"]


@cdcs
@pytest.mark.parametrize("request_", ["POST", "PATCH"])
def test_a_500_that_lasts_says_it_is_cdcss_fault_and_is_transient(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    request_: str,
) -> None:
    path = record()
    dest = destination(cdcs_url=cdcs_proxy.url)
    earlier = dest.export(context_for(path)) if request_ == "PATCH" else None
    if earlier is not None:
        path.write_bytes(rebuilt(path.read_bytes(), "v2"))
    cdcs_proxy.answer(request_, CREATE if request_ == "POST" else UPDATE, 500, SERVER_FAULT)

    def send() -> ExportResult:
        return (
            dest.export(context_for(path))
            if earlier is None
            else dest.update(context_for(path), earlier)
        )

    with pytest.raises(TransientError) as caught:
        send()

    message = str(caught.value)
    assert caught.value.status_code == 500
    assert f"passes template {cdcs_server.template_id}'s XSD here" in message
    assert "fault of CDCS's" in message
    assert "database is locked" in message


@cdcs
def test_a_500_to_a_read_is_retried(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
) -> None:
    cdcs_proxy.answer("GET", TEMPLATE_XSD, 500, SERVER_FAULT, times=1)
    cdcs_proxy.answer("GET", r"^/rest/data/\?title=", 500, SERVER_FAULT, times=1)
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30)

    report = app.pipeline.process(record())

    assert report.outcome is Outcome.EXPORTED
    assert report.results[0].attempts == 3
    assert cdcs_proxy.count("POST", CREATE) == 1


@cdcs
def test_bad_token_fails_clearly_without_showing_it(
    destination: Callable[..., CDCSDestination], record: Callable[..., Path]
) -> None:
    token = "0123456789abcdef0123456789abcdef" + uuid.uuid4().hex[:8]
    dest = destination(cdcs_token=token)

    with pytest.raises(PermanentError) as caught:
        dest.export(context_for(record()))
    assert caught.value.status_code == 403
    assert "NX_CDCS_TOKEN" in str(caught.value)
    assert token not in str(caught.value)

    ok, reason = dest.validate_config()
    assert not ok
    assert reason is not None
    assert "NX_CDCS_TOKEN" in reason
    assert token not in reason


@cdcs
def test_transient_assign_failure_is_retried_onto_the_same_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    # A private record of this session: one an earlier nxdrop made, or left unpublished.
    private = alice(cdcs_server).call(
        "POST",
        "rest/data/",
        json={"template": cdcs_server.template_id, "title": session,
              "xml_content": path.read_bytes().decode()},
    )  # fmt: skip
    dest = destination(cdcs_url=cdcs_proxy.url)
    cdcs_proxy.answer("PATCH", r"/assign/", 503, {"message": "maintenance"}, times=1)

    with pytest.raises(TransientError, match="NOT published"):
        dest.export(context_for(path))
    result = dest.export(context_for(path))  # what the pipeline's retry does

    assert result.record_id == str(private["id"])
    assert len(cdcs_server.client.records_titled(session)) == 1
    assert cdcs_server.client.record(private["id"])["workspace"] == (
        cdcs_server.client.public_workspace()
    )
    assert cdcs_proxy.count("POST", CREATE) == 0


# -- validate_config and configure -----------------------------------------------------


@cdcs
def test_validate_config_reaches_the_server(
    destination: Callable[..., CDCSDestination], cdcs_proxy: SubPathProxy
) -> None:
    assert destination(cdcs_url=cdcs_proxy.url).validate_config() == (True, None)
    assert cdcs_proxy.count("GET", TEMPLATES) == 1
    assert cdcs_proxy.count("GET", TEMPLATE_XSD) == 1
    assert cdcs_proxy.count("GET", WORKSPACES) == 1


def test_validate_config_unreachable(make_settings: MakeSettings) -> None:
    dest = CDCSDestination()
    dest.configure(
        make_settings(cdcs_url=f"http://127.0.0.1:{_closed_port()}/", cdcs_token="t" * 40)
    )
    ok, reason = dest.validate_config()
    assert not ok
    assert "cannot connect" in (reason or "")


def test_enabled_only_with_url_and_token(make_settings: MakeSettings) -> None:
    for values, enabled in [
        ({}, False),
        ({"cdcs_url": "https://cdcs.example.org/"}, False),
        ({"cdcs_token": "secret"}, False),
        ({"cdcs_url": "https://cdcs.example.org/", "cdcs_token": "secret"}, True),
    ]:
        dest = CDCSDestination()
        dest.configure(make_settings(**values))
        assert dest.enabled is enabled, values
        assert (dest.name, dest.priority) == ("cdcs", 100)


def test_configure_does_not_contact_the_server(make_settings: MakeSettings) -> None:
    # 192.0.2.0/24 is TEST-NET: a connection attempt there would hang until the timeout.
    started = time.monotonic()
    CDCSDestination().configure(
        make_settings(cdcs_url="http://192.0.2.1/cdcs/", cdcs_token="t", http_timeout=30)
    )
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("url", ["ftp://cdcs.example.org/", "cdcs.example.org", "http://"])
def test_invalid_url_is_a_config_error(make_settings: MakeSettings, url: str) -> None:
    with pytest.raises(ConfigError, match="NX_CDCS_URL"):
        CDCSDestination().configure(make_settings(cdcs_url=url, cdcs_token="t"))


# -- reconcile -------------------------------------------------------------------------


@cdcs
def test_reconcile_reuses_the_record_and_publishes_it_if_need_be(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    path = record()
    earlier = destination(cdcs_assign_to_public_workspace=False).export(context_for(path))
    assert cdcs_server.client.record(str(earlier.record_id))["workspace"] is None

    again = destination().reconcile(context_for(path), earlier)

    assert (again.record_id, again.record_url) == (earlier.record_id, earlier.record_url)
    assert cdcs_server.client.record(str(earlier.record_id))["workspace"] == (
        cdcs_server.client.public_workspace()
    )


@cdcs
def test_redrop_through_the_pipeline_does_not_publish_twice(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    path = record()
    session = path.name.removesuffix(".xml")
    app = make_app(destination(cdcs_url=cdcs_proxy.url))
    first = app.pipeline.process(path)
    (drop / "uploaded" / path.name).rename(path)  # the operator drops it again

    second = app.pipeline.process(path)

    assert first.outcome is second.outcome is Outcome.EXPORTED
    assert second.results[0].record_id == first.results[0].record_id
    assert cdcs_states(app, session) == ["succeeded", "reused"]
    assert len(cdcs_server.client.records_titled(session)) == 1
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", UPDATE) == 0
    assert cdcs_proxy.count("PATCH", ASSIGN) == 0


# -- a hostile world: tokens echoed back, certificates nobody trusts ----------------------

ECHOED_TOKEN = "e5c4a1ed0123456789abcdef0123456789abcdef"


@pytest.fixture
def hostile() -> Iterator[Callable[..., HostileServer]]:
    """``hostile(behaviour, tls=None)``: a misbehaving server on 127.0.0.1."""
    with hostile_servers() as start:
        yield start


@pytest.mark.parametrize("status", [500, 503])
@pytest.mark.parametrize("kind", ECHOES)
def test_a_token_echoed_in_an_error_page_never_reaches_the_error(
    hostile: Callable[..., HostileServer],
    make_settings: MakeSettings,
    place: Place,
    kind: str,
    status: int,
) -> None:
    server = hostile(echo_authorization(kind, status))
    dest = CDCSDestination()
    dest.configure(make_settings(cdcs_url=server.url, cdcs_token=ECHOED_TOKEN))

    with pytest.raises(DestinationError) as caught:
        dest.export(context_for(place(name=f"{unique_session()}.xml")))
    ok, reason = dest.validate_config()

    # A 500 to a read is CDCS's own fault (a record cannot be wrong there): retried too.
    assert isinstance(caught.value, TransientError)
    assert server.authorizations()[0] == f"Token {ECHOED_TOKEN}"  # sent, and echoed back
    for message in (str(caught.value), reason or ""):
        assert f"HTTP {status}" in message
        assert leaked_parts(ECHOED_TOKEN, message) == []
        assert len(message) < 500  # the server's words in a line, never its page
    assert not ok
    if kind == "html":
        assert "Error: bad header Token ***" in str(caught.value)
    if kind == "json":
        assert "invalid credentials Token ***" in str(caught.value)


def test_an_untrusted_certificate_fails_the_record_at_once_and_no_token_is_sent(
    cdcs_fake: FakeCDCS,
    hostile: Callable[..., HostileServer],
    make_settings: MakeSettings,
    make_app: MakeApp,
    place: Place,
    drop: Path,
    tmp_path: Path,
) -> None:
    ca = certificate_authority(tmp_path, "127.0.0.1")
    front = hostile(relay_to(cdcs_fake.port), tls=ca.server)  # CDCS behind TLS
    url = f"https://127.0.0.1:{front.port}/"
    session = unique_session()

    def process(**tls: Any) -> tuple[Any, float]:
        dest = CDCSDestination()
        dest.configure(make_settings(cdcs_url=url, cdcs_token=cdcs_fake.user_token, **tls))
        app = make_app(dest, retry_max_time=30)  # a transient failure would be retried
        started = time.monotonic()
        report = app.pipeline.process(place(name=f"{session}.xml"))
        return report, time.monotonic() - started

    refused, took = process()  # no NX_CERT_BUNDLE: the system's CAs

    assert refused.outcome is Outcome.FAILED
    (result,) = refused.results
    assert result.attempts == 1
    assert "certificate of 127.0.0.1" in (result.error_message or "")
    assert "NX_CERT_BUNDLE" in (result.error_message or "")
    assert took < 10
    assert cdcs_fake.requests == []  # not one request, so not one token, reached CDCS
    assert (drop / "failed" / f"{session}.xml").is_file()

    published, _ = process(cert_bundle=ca.bundle)

    assert published.outcome is Outcome.EXPORTED
    assert [r["title"] for r in cdcs_fake.records_titled(session)] == [session]


# -- helpers ---------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
