"""What differs between eLabFTW releases: the versions nxdrop refuses, how it adds a link
without losing a person's edit, the editor of new experiments, and the experiments an
older nxdrop made."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nxdrop.app import App
from nxdrop.checks import check
from nxdrop.destinations.elabftw import ELabFTWDestination
from nxdrop.exceptions import PermanentError, TransientError
from nxdrop.pipeline import Outcome
from nxdrop.settings import Settings, Strategy
from tests.destinations.test_elabftw import (
    CDCS_URL,
    SESSION,
    FlakyCDCS,
    Outline,
    context_for,
    destination,
    fields,
    live_uploads,
    rebuild,
    sha256,
)
from tests.fixtures.elabftw_fake import FakeELabFTW, Logged

__all__ = ["destination"]  # the fixture, shared


# -- versions ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["5.0.3", "5.1.12"])
def test_an_elabftw_too_old_is_refused_by_check_and_by_export(
    version: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_settings: Callable[..., Settings],
    make_app: Callable[..., App],
    place: Callable[..., Path],
) -> None:
    """5.0 and 5.1 ignore body and metadata on create: nxdrop would never find its
    experiment again. ``nxdrop check`` says so, and nothing is ever sent to them."""
    elabftw_fake.version = version
    out = io.StringIO()
    settings = make_settings(elabftw_url=elabftw_fake.url, elabftw_api_key=elabftw_fake.api_key)

    assert check(settings, out) == 1

    [line] = [line for line in out.getvalue().splitlines() if "destination elabftw" in line]
    assert line.startswith("✗ destination elabftw (priority 85): ")
    assert f"eLabFTW {version} at {elabftw_fake.url}api/v2/ is not supported" in line
    assert "needs eLabFTW 5.2 or newer" in line
    assert "upgrade eLabFTW" in line

    app = make_app(destination())
    report = app.pipeline.process(place(name=f"{SESSION}.xml"))
    assert report.outcome is Outcome.FAILED
    assert f"eLabFTW {version}" in (report.results[0].error_message or "")
    with pytest.raises(PermanentError, match=r"5\.2 or newer"):
        destination().export(context_for(place(name=f"{SESSION}.xml")))
    assert elabftw_fake.experiments == {}
    assert [r.method for r in elabftw_fake.requests if r.path != "users/me"] == ["GET"] * 3


def test_the_oldest_supported_release_exports(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    elabftw_fake.version = "5.2.0"
    path = place(name=f"{SESSION}.xml")
    dest = destination()
    assert dest.validate_config() == (True, None)
    dest.export(context_for(path, CDCS_URL))
    [exp] = elabftw_fake.experiments.values()
    assert fields(exp)["SHA-256"] == sha256(path.read_bytes())
    assert live_uploads(exp) == [path.read_bytes()]


def test_a_server_that_does_not_tell_its_version_is_refused(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    elabftw_fake._info = dict  # type: ignore[method-assign]  # answers {}
    ok, reason = destination().validate_config()
    assert not ok
    assert reason is not None
    assert "does not tell the eLabFTW version" in reason
    with pytest.raises(PermanentError, match="does not tell the eLabFTW version"):
        destination().export(context_for(place(name=f"{SESSION}.xml")))
    assert elabftw_fake.experiments == {}


def test_the_version_is_read_once_and_a_failure_to_read_it_is_not_remembered(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    elabftw_fake.fail_next("GET", "info", 503)
    with pytest.raises(TransientError):
        dest.export(context_for(place(name=f"{SESSION}.xml")))
    for n in range(2):
        path = place(name=f"{SESSION}_{n}.xml")
        dest.export(context_for(path))
    assert [r.status for r in elabftw_fake.calls("GET", "info")] == [503, 200]
    assert len(elabftw_fake.experiments) == 2


@pytest.mark.parametrize("version", ["5.2.0", "5.3.0", "5.4.0"])
def test_a_new_experiment_is_html_whatever_the_keys_preferred_editor(
    version: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """Before 5.4 eLabFTW ignores ``content_type`` on create and uses the user's editor
    (Markdown for this key): nxdrop sets it to HTML after; 5.4 takes it at once."""
    elabftw_fake.version = version
    elabftw_fake.user["use_markdown"] = 1
    destination().export(context_for(place(name=f"{SESSION}.xml")))
    assert elabftw_fake.experiments[1]["content_type"] == 1
    patched = [r.json() for r in elabftw_fake.calls("PATCH", "experiments/1")]
    assert patched == ([] if version == "5.4.0" else [{"content_type": 1}])


# -- a person's edit is never overwritten -------------------------------------------------


def edit_between(fake: FakeELabFTW, experiment_id: int) -> list[str]:
    """A scientist edits experiment ``experiment_id`` right after nxdrop reads it, before
    nxdrop writes: a paragraph in the body, a field of their own. Returns what they did."""
    done: list[str] = []

    def scientist(req: Logged) -> None:
        if req.method == "GET" and req.path == f"experiments/{experiment_id}" and not done:
            exp = fake.experiments[experiment_id]
            exp["body"] += "<p>Tilted by 5° for the second series.</p>"
            metadata = json.loads(exp["metadata"])
            metadata["extra_fields"]["Sample"] = {"type": "text", "value": "S-17"}
            exp["metadata"] = json.dumps(metadata)
            done.append("edited")

    fake.after_request = scientist
    return done


@pytest.mark.parametrize("version", ["5.6.0", "5.5.0"])
def test_adding_the_link_keeps_a_scientists_edit_made_meanwhile(
    version: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    make_app: Callable[..., App],
    place: Callable[..., Path],
    drop: Path,
) -> None:
    """CDCS failed at first; when it has the record, the link is added to the experiment a
    scientist is editing. The body's part is appended, never rewritten; from 5.6 the field
    is merged in too, so their field stays; 5.5 has no merge: the metadata just read is
    written back, changed (the one place an edit made in between can still be lost)."""
    elabftw_fake.version = version
    cdcs = FlakyCDCS()
    app = make_app(cdcs, destination(), export_strategy=Strategy.ALL)
    path = place(name=f"{SESSION}.xml")
    assert app.pipeline.process(path).outcome is Outcome.FAILED  # CDCS down, eLabFTW made it
    edited = edit_between(elabftw_fake, 1)

    cdcs.up = True
    [failed] = (drop / "failed").glob("*.xml")
    shutil.move(failed, path)
    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED, report.error
    assert edited == ["edited"]
    exp = elabftw_fake.experiments[1]
    outline = Outline(exp["body"])
    assert ("p", "Tilted by 5° for the second series.") in outline.blocks  # theirs, kept
    assert outline.links == [("View in CDCS", CDCS_URL)]
    assert fields(exp)["CDCS Record"] == CDCS_URL
    [patch] = [r.json() for r in elabftw_fake.calls("PATCH", "experiments/1")]
    if version == "5.6.0":
        assert set(patch) == {"bodyappend", "metadatamerge"}
        assert fields(exp)["Sample"] == "S-17"  # theirs, kept
    else:
        assert set(patch) == {"bodyappend", "metadata"}
    assert list(elabftw_fake.experiments) == [1]


def test_new_content_on_5_6_merges_the_fields_and_keeps_a_field_added_meanwhile(
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    dest = destination()
    path = place(name=f"{SESSION}.xml")
    earlier = dest.export(context_for(path, CDCS_URL))
    second = rebuild(path)
    edit_between(elabftw_fake, 1)

    dest.update(context_for(path, CDCS_URL), earlier)

    exp = elabftw_fake.experiments[1]
    assert fields(exp)["SHA-256"] == sha256(second)
    assert fields(exp)["Sample"] == "S-17"
    [patch] = [r.json() for r in elabftw_fake.calls("PATCH", "experiments/1")]
    assert list(patch) == ["body", "metadatamerge"]  # the hash changes last


# -- experiments an older nxdrop made ------------------------------------------------------


def old_shape(path: Path, cdcs: str | None = None) -> dict[str, Any]:
    """The experiment an nxdrop older than NexusLIMS's shape made for SESSION: its title,
    its table, its fields ("Session", "Start", "End", "SHA-256", "CDCS record") in the
    group "NexusLIMS", the record attached."""
    content = path.read_bytes()
    sha = sha256(content)
    extra: dict[str, Any] = {
        "Session": {"type": "text", "value": SESSION, "position": 0, "group_id": 1},
        "Instrument": {"type": "text", "value": "FEI-Titan-TEM", "position": 1, "group_id": 1},
        "User": {"type": "text", "value": "Ned Land (ned)", "position": 2, "group_id": 1},
        "Start": {"type": "datetime-local", "value": "2018-11-13T10:00", "group_id": 1},
        "End": {"type": "datetime-local", "value": "2018-11-13T15:00", "group_id": 1},
        "SHA-256": {"type": "text", "value": sha, "position": 5, "group_id": 1},
        "Notes": {"type": "text", "value": "a person's"},
    }
    if cdcs:
        extra["CDCS record"] = {"type": "url", "value": cdcs, "group_id": 1}
    return {
        "id": 1,
        "title": f"Test record with a multi-dataset file ({SESSION})",
        "body": f"<p>NexusLIMS experiment record</p><table><tbody><tr><th>Session</th>"
        f"<td>{SESSION}</td></tr><tr><th>SHA-256</th><td>{sha}</td></tr></tbody></table>",
        "content_type": 1,
        "metadata": json.dumps(
            {
                "extra_fields": extra,
                "elabftw": {"extra_fields_groups": [{"id": 1, "name": "NexusLIMS"}]},
            }
        ),
        "custom_id": None,
        "tags": ["NexusLIMS", "FEI-Titan-TEM", "Ned Land (ned)"],
        "uploads": [
            {"id": 1, "real_name": f"{SESSION}.xml", "content": content, "hash": sha, "state": 1}
        ],
        "state": 1,
    }


@pytest.mark.parametrize("version", ["5.6.0", "5.3.0"])
def test_an_experiment_an_older_nxdrop_made_is_ours_and_not_duplicated(
    version: str,
    elabftw_fake: FakeELabFTW,
    destination: Callable[..., ELabFTWDestination],
    place: Callable[..., Path],
) -> None:
    """An installation upgraded from the previous shape: the same record again is found
    (and gets the link); a rebuilt one moves the experiment to NexusLIMS's shape."""
    elabftw_fake.version = version
    elabftw_fake.last_experiment = 1
    path = place(name=f"{SESSION}.xml")
    elabftw_fake.experiments[1] = old_shape(path)

    same = destination().export(context_for(path, CDCS_URL))

    assert same.record_id == "1"
    assert list(elabftw_fake.experiments) == [1]
    assert not elabftw_fake.calls("POST", "experiments")
    exp = elabftw_fake.experiments[1]
    assert Outline(exp["body"]).links == [("View in CDCS", CDCS_URL)]
    assert fields(exp)["CDCS Record"] == CDCS_URL

    second = rebuild(path)
    destination().export(context_for(path, CDCS_URL))

    assert list(elabftw_fake.experiments) == [1]
    exp = elabftw_fake.experiments[1]
    assert exp["title"] == f"NexusLIMS Experiment - {SESSION}"
    assert Outline(exp["body"]).blocks[0] == ("h1", "NexusLIMS Microscopy Session")
    metadata = json.loads(exp["metadata"])
    assert set(metadata["extra_fields"]) == {
        "Session ID",
        "Instrument",
        "Start Time",
        "End Time",
        "User",
        "SHA-256",
        "CDCS Record",
        "Notes",  # a person's, kept
    }
    assert metadata["extra_fields"]["SHA-256"]["value"] == sha256(second)
    assert metadata["elabftw"]["extra_fields_groups"] == [
        {"id": 1, "name": "Session Information"},
        {"id": 2, "name": "Related Records"},
    ]
    assert live_uploads(exp)[-1] == second
