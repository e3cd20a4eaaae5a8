"""NX_CDCS_USER_OWNED_RECORDS against the real CDCS: each record given to the CDCS user of its
experimenter (change-owner, with a superuser's token), and still the session's one record."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nxdrop.app import App
from nxdrop.destinations.base import ExportContext
from nxdrop.destinations.cdcs import CDCSDestination, username_of
from nxdrop.exceptions import PermanentError
from nxdrop.pipeline import Outcome
from nxdrop.settings import Settings
from tests.conftest import RECORDS
from tests.fixtures.cdcs_server import CDCSClient, CDCSServer, SubPathProxy

cdcs = pytest.mark.cdcs
MakeSettings = Callable[..., Settings]
MakeApp = Callable[..., App]

CREATE = r"^/rest/data/$"
UPDATE = r"^/rest/data/\d+/$"
ASSIGN = r"^/rest/data/\d+/assign/\d+$"
GIVE = r"^/rest/data/\d+/change-owner/\d+$"


def unique_session() -> str:
    return f"2024-02-02_FEI-Titan-TEM_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def destination(
    make_settings: MakeSettings, cdcs_server: CDCSServer
) -> Callable[..., CDCSDestination]:
    """A CDCSDestination with the admin's token and records given to their users."""

    def make(**overrides: Any) -> CDCSDestination:
        values = {
            "cdcs_url": cdcs_server.url,
            "cdcs_token": cdcs_server.admin_token,
            "cdcs_user_owned_records": True,
        }
        dest = CDCSDestination()
        dest.configure(make_settings(**{**values, **overrides}))
        return dest

    return make


@pytest.fixture
def record(drop: Path, corpus: Path) -> Callable[..., Path]:
    """A corpus record in the drop folder, of a session of its own, by ``experimenter``."""

    def make(experimenter: str, corpus_name: str = RECORDS[0]) -> Path:
        content = (corpus / corpus_name).read_bytes()
        start, end = content.index(b"<experimenter>"), content.index(b"</experimenter>")
        path = drop / f"{unique_session()}.xml"
        named = b"<experimenter>" + experimenter.encode() + content[end:]
        path.write_bytes(content[:start] + named)
        return path

    return make


def context_for(path: Path, user: str | None) -> ExportContext:
    return ExportContext(
        xml_file_path=path,
        session_identifier=path.name.removesuffix(".xml"),
        instrument_pid="FEI-Titan-TEM",
        user=user,
        dt_from=None,
        dt_to=None,
    )


def rebuilt(content: bytes, version: str) -> bytes:
    return content.replace(b"<title>", f"<title>{version}: ".encode(), 1)


def user_id_of(cdcs_server: CDCSServer, username: str) -> str:
    users = cdcs_server.client.call("GET", "rest/user/")
    return str(next(u["id"] for u in users if u["username"] == username))


@cdcs
def test_a_record_is_given_to_the_cdcs_user_of_its_experimenter(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
) -> None:
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")

    result = destination(cdcs_url=cdcs_proxy.url).export(
        context_for(path, f"Jane Doe ({username})")
    )

    stored = cdcs_server.client.record(str(result.record_id))
    assert stored["user_id"] == str(user_id)
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert stored["xml_content"].encode() == path.read_bytes()
    assert (result.metadata["owner"], result.metadata["owner_id"]) == (username, str(user_id))
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", ASSIGN) == 0  # published by the POST itself
    assert cdcs_proxy.count("PATCH", GIVE) == 1


@cdcs
def test_a_redrop_and_a_rebuilt_record_reach_the_record_given_away(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
    drop: Path,
) -> None:
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})", RECORDS[1])
    session = path.name.removesuffix(".xml")
    app = make_app(destination(cdcs_url=cdcs_proxy.url))
    first = app.pipeline.process(path)
    # No longer the token user's own: only the admin list of the user's records shows it.
    mine = CDCSClient(cdcs_server.url, cdcs_server.admin_token).call(
        "GET", "rest/data/", params={"title": session}
    )
    assert mine["count"] == 0

    (drop / "uploaded" / path.name).rename(path)  # the operator drops it again
    again = app.pipeline.process(path)
    v2 = rebuilt((drop / "uploaded" / path.name).read_bytes(), "v2")
    path.write_bytes(v2)
    rebuilt_ = app.pipeline.process(path)

    assert first.ok and again.ok and rebuilt_.ok
    record_id = first.results[0].record_id
    assert again.results[0].record_id == rebuilt_.results[0].record_id == record_id
    (stored,) = cdcs_server.client.records_titled(session)
    assert str(stored["id"]) == record_id
    assert stored["xml_content"].encode() == v2
    assert stored["user_id"] == str(user_id)
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    states = [r.state for r in app.store.uploads(session) if r.destination_name == "cdcs"]
    assert states == ["succeeded", "reused", "updated"]
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", rf"^/rest/data/{record_id}/$") == 1
    assert cdcs_proxy.count("PATCH", GIVE) == 1


@cdcs
def test_a_fresh_database_finds_the_record_given_away_and_updates_it(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    make_app: MakeApp,
    tmp_path: Path,
) -> None:
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    session = path.name.removesuffix(".xml")
    v1 = path.read_bytes()
    first = make_app(destination()).pipeline.process(path)
    fresh = make_app(destination(), data_path=tmp_path / "fresh-state")  # the log is lost
    path.write_bytes(rebuilt(v1, "v2"))

    second = fresh.pipeline.process(path)

    assert first.ok and second.ok
    assert second.results[0].record_id == first.results[0].record_id
    (stored,) = cdcs_server.client.records_titled(session)
    assert stored["xml_content"].encode() == rebuilt(v1, "v2")
    assert stored["user_id"] == str(user_id)


@cdcs
def test_a_session_whose_record_was_given_away_is_held_when_many_are_asked_about(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    """The record given to its user is no longer among the token user's own: asked about
    many sessions at once, every user's records are looked through."""
    _, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    session = path.name.removesuffix(".xml")
    assert destination().export(context_for(path, f"Jane Doe ({username})")).success

    held = destination().holds_records_of([unique_session(), session, unique_session()])

    assert held == {session}


@cdcs
def test_a_record_given_away_is_still_updated_after_the_setting_is_switched_off(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    make_app: MakeApp,
    drop: Path,
) -> None:
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    session = path.name.removesuffix(".xml")
    first = make_app(destination()).pipeline.process(path)
    # The same log, the setting off: the log says whose the record is now.
    app = make_app(destination(cdcs_user_owned_records=False))
    v2 = rebuilt((drop / "uploaded" / path.name).read_bytes(), "v2")
    path.write_bytes(v2)

    second = app.pipeline.process(path)

    assert second.ok
    assert second.results[0].record_id == first.results[0].record_id
    (stored,) = cdcs_server.client.records_titled(session)
    assert (stored["xml_content"].encode(), stored["user_id"]) == (v2, str(user_id))


@cdcs
def test_a_lost_change_owner_is_retried_onto_the_same_record(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    make_app: MakeApp,
) -> None:
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    session = path.name.removesuffix(".xml")
    cdcs_proxy.answer("PATCH", GIVE, 503, {"message": "maintenance"}, times=1)
    app = make_app(destination(cdcs_url=cdcs_proxy.url), retry_max_time=30)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED
    assert report.results[0].attempts == 2
    (stored,) = cdcs_server.client.records_titled(session)
    assert stored["user_id"] == str(user_id)
    assert cdcs_proxy.count("POST", CREATE) == 1
    assert cdcs_proxy.count("PATCH", GIVE) == 2


@cdcs
def test_an_unknown_user_leaves_the_record_with_the_token_user_and_warns(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
    cdcs_proxy: SubPathProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    nobody = f"nobody-{uuid.uuid4().hex[:10]}"
    path = record(f"No Body ({nobody})")

    with caplog.at_level(logging.WARNING, logger="nxdrop.destinations.cdcs"):
        result = destination(cdcs_url=cdcs_proxy.url).export(
            context_for(path, f"No Body ({nobody})")
        )

    # As NexusLIMS: the export goes on, the record stays with the token's user, and says so.
    assert result.success
    stored = cdcs_server.client.record(str(result.record_id))
    assert stored["user_id"] == user_id_of(cdcs_server, "admin")
    assert stored["workspace"] == cdcs_server.client.public_workspace()
    assert result.metadata["owner"] is None
    assert result.metadata["owner_id"] == user_id_of(cdcs_server, "admin")
    assert f"no CDCS user named '{nobody}'" in caplog.text
    assert "stays with the token's user" in caplog.text
    assert cdcs_proxy.count("PATCH", GIVE) == 0


@cdcs
def test_another_users_record_of_the_session_is_left_alone(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    third_id, _ = cdcs_server.create_user("third")
    user_id, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    session = path.name.removesuffix(".xml")
    theirs = rebuilt(path.read_bytes(), "theirs").decode()
    made = cdcs_server.client.call(
        "POST",
        "rest/data/",
        json={"template": cdcs_server.template_id, "title": session, "xml_content": theirs},
    )
    cdcs_server.client.call("PATCH", f"rest/data/{made['id']}/change-owner/{third_id}")

    result = destination().export(context_for(path, f"Jane Doe ({username})"))

    assert result.record_id != str(made["id"])
    left = cdcs_server.client.record(made["id"])
    assert (left["xml_content"], left["user_id"]) == (theirs, str(third_id))
    ours = cdcs_server.client.record(str(result.record_id))
    assert ours["user_id"] == str(user_id)


@cdcs
def test_user_owned_records_need_a_superuser_token(
    destination: Callable[..., CDCSDestination],
    record: Callable[..., Path],
    cdcs_server: CDCSServer,
) -> None:
    _, username = cdcs_server.create_user()
    path = record(f"Jane Doe ({username})")
    dest = destination(cdcs_token=cdcs_server.user_token)  # alice: no admin

    with pytest.raises(PermanentError, match="superuser") as caught:
        dest.export(context_for(path, f"Jane Doe ({username})"))
    ok, reason = dest.validate_config()

    assert "NX_CDCS_USER_OWNED_RECORDS" in str(caught.value)
    # Refused before anything was written: no record of alice's to give away later.
    assert cdcs_server.client.records_titled(path.name.removesuffix(".xml")) == []
    assert not ok
    assert "NX_CDCS_USER_OWNED_RECORDS" in (reason or "")
    assert "superuser" in (reason or "")


@cdcs
def test_validate_config_accepts_a_superuser_token(
    destination: Callable[..., CDCSDestination],
) -> None:
    assert destination().validate_config() == (True, None)


@pytest.mark.parametrize(
    ("experimenter", "username"),
    [
        ("Ned Land (ned)", "ned"),  # NexusLIMS's NEMO harvester: "First Last (username)"
        ("Test User (testuser) ", "testuser"),
        ("ned", "ned"),  # no full name: the username alone
        ("  ned  ", "ned"),
        ("", None),
        (None, None),
    ],
)
def test_the_username_comes_from_the_experimenter(
    experimenter: str | None, username: str | None
) -> None:
    assert username_of(experimenter) == username
