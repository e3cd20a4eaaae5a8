"""The eLabFTW experiment as a document: pure functions, no server."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from nxdrop.destinations import elabftw_document as doc
from tests.destinations.test_elabftw import Outline

MST = timezone(timedelta(hours=-7))
SHA = "ab" * 32
CDCS = "https://cdcs.example.org/data?id=65a1&x=1"
FACTS = doc.Facts(
    session="2018-11-13_FEI-Titan-TEM_204",
    instrument="FEI-Titan-TEM",
    user="Ned Land (ned)",
    start=datetime(2018, 11, 13, 10, 0, tzinfo=MST),
    end=datetime(2018, 11, 13, 15, 0, tzinfo=MST),
    sha256=SHA,
)
LINKED = doc.Facts(**{**FACTS.__dict__, "cdcs_url": CDCS})


def made(facts: doc.Facts, **extra: Any) -> dict[str, Any]:
    """An experiment as eLabFTW shows one nxdrop made for ``facts``."""
    return {
        "id": 1,
        "title": doc.title(facts),
        "body": doc.body(facts),
        "content_type": doc.HTML,
        "metadata": json.dumps(doc.new_metadata(facts)),
        "tags": "|".join(doc.tags(facts)),
        **extra,
    }


def test_a_link_added_later_gives_the_document_made_with_it() -> None:
    assert doc.body(LINKED) == doc.body(FACTS) + doc.related_section(CDCS)
    patch = doc.changes(made(FACTS), LINKED, merge=True)
    assert patch["bodyappend"] == doc.related_section(CDCS)
    merged = json.loads(patch["metadatamerge"])
    assert merged == {"extra_fields": {"CDCS Record": doc.cdcs_field(CDCS, 1)}}
    # The experiment declares no "Related Records" group and a merge cannot declare one
    # (eLabFTW merges extra_fields only): the link joins the session's group.
    assert set(patch) == {"bodyappend", "metadatamerge"}


def test_a_link_written_whole_declares_its_group() -> None:
    patch = doc.changes(made(FACTS), LINKED, merge=False)
    metadata = json.loads(patch["metadata"])
    assert metadata["elabftw"]["extra_fields_groups"] == [
        {"id": 1, "name": "Session Information"},
        {"id": 2, "name": "Related Records"},
    ]
    assert metadata["extra_fields"]["CDCS Record"]["group_id"] == 2
    assert metadata == doc.new_metadata(LINKED)  # as if made with the link


def test_nothing_to_change_is_an_empty_patch() -> None:
    experiment = made(LINKED, body=doc.body(LINKED).replace('">', '" target="_blank">'))
    assert doc.changes(experiment, LINKED, merge=True) == {}
    assert doc.changes(experiment, FACTS, merge=True) == {}  # a link is never taken away


def test_new_content_merges_only_what_differs_and_keeps_theirs() -> None:
    experiment = made(LINKED)
    metadata = json.loads(experiment["metadata"])
    metadata["extra_fields"]["Sample"] = {"type": "text", "value": "S-17"}
    experiment["metadata"] = json.dumps(metadata)
    rebuilt = doc.Facts(**{**LINKED.__dict__, "sha256": "cd" * 32, "user": "Pierre (pa)"})

    patch = doc.changes(experiment, rebuilt, merge=True)

    assert list(patch) == ["body", "metadatamerge"]  # the SHA-256 last
    assert json.loads(patch["metadatamerge"]) == {
        "extra_fields": {"User": {"value": "Pierre (pa)"}, "SHA-256": {"value": "cd" * 32}}
    }
    whole = json.loads(doc.changes(experiment, rebuilt, merge=False)["metadata"])
    assert whole["extra_fields"]["Sample"] == {"type": "text", "value": "S-17"}


def test_a_field_that_must_go_is_written_whole() -> None:
    without_user = doc.Facts(**{**FACTS.__dict__, "sha256": "cd" * 32, "user": None})
    patch = doc.changes(made(FACTS), without_user, merge=True)
    assert "metadatamerge" not in patch
    assert "User" not in json.loads(patch["metadata"])["extra_fields"]


def test_every_value_is_escaped_and_only_http_urls_become_links() -> None:
    evil = '<img src=x onerror="alert(1)"> & co'
    facts = doc.Facts(evil, evil, evil, None, None, SHA, "javascript:alert(1)")
    html = doc.body(facts)
    outline = Outline(html)
    assert outline.links == []
    assert "<img" not in html
    assert outline.blocks[2] == (
        "ul",
        [f"Session ID: {evil}", f"Instrument: {evil}", f"User: {evil}"],
    )
    assert outline.blocks[-1] == ("ul", ["View in CDCS: javascript:alert(1)"])
    assert doc.extra_fields(facts, 1, 2)["CDCS Record"]["type"] == "text"
    assert doc.title(facts) == f"NexusLIMS Experiment - {evil}"  # text: eLabFTW escapes it


def test_tags_once_each_and_what_is_missing_ignoring_case() -> None:
    same = doc.Facts("s", "nexuslims", "", None, None, SHA)
    assert doc.tags(same) == ["NexusLIMS"]
    assert doc.tags(FACTS) == ["NexusLIMS", "FEI-Titan-TEM", "Ned Land (ned)"]
    assert doc.missing_tags({"tags": "nexuslims|Other"}, doc.tags(FACTS)) == [
        "FEI-Titan-TEM",
        "Ned Land (ned)",
    ]


def test_fields_of_a_record_without_user_or_times() -> None:
    bare = doc.Facts("s", "FEI-Titan-TEM", None, None, None, SHA)
    assert list(doc.extra_fields(bare, 1, None)) == ["Session ID", "Instrument", "SHA-256"]
    assert [b for b in Outline(doc.body(bare)).blocks if b[0] == "ul"] == [
        ("ul", ["Session ID: s", "Instrument: FEI-Titan-TEM"])
    ]


def test_the_experiment_nxdrop_made_before_is_read_as_ours() -> None:
    old = {
        "metadata": json.dumps(
            {
                "extra_fields": {
                    "Session": {"type": "text", "value": FACTS.session, "group_id": 1},
                    "SHA-256": {"type": "text", "value": SHA, "group_id": 1},
                    "CDCS record": {"type": "url", "value": CDCS, "group_id": 1},
                },
                "elabftw": {"extra_fields_groups": [{"id": 1, "name": "NexusLIMS"}]},
            }
        )
    }
    assert (doc.session_of(old), doc.sha_of(old), doc.cdcs_of(old)) == (FACTS.session, SHA, CDCS)
    moved = doc.rewritten_metadata(doc.metadata_of(old), LINKED)
    assert set(moved["extra_fields"]) == set(doc.extra_fields(LINKED, 1, 2))
    assert moved["elabftw"]["extra_fields_groups"] == [
        {"id": 1, "name": "Session Information"},  # ours, renamed
        {"id": 2, "name": "Related Records"},
    ]


def test_groups_people_made_are_kept_and_ours_get_free_ids() -> None:
    theirs = {
        "extra_fields": {"Sample": {"type": "text", "value": "S", "group_id": 1}},
        "elabftw": {"extra_fields_groups": [{"id": 1, "name": "Sample data"}]},
    }
    moved = doc.rewritten_metadata(theirs, LINKED)
    assert moved["elabftw"]["extra_fields_groups"] == [
        {"id": 1, "name": "Sample data"},
        {"id": 2, "name": "Session Information"},
        {"id": 3, "name": "Related Records"},
    ]
    assert moved["extra_fields"]["Sample"]["group_id"] == 1
    assert moved["extra_fields"]["Session ID"]["group_id"] == 2
    assert moved["extra_fields"]["CDCS Record"]["group_id"] == 3


def test_a_link_is_recognised_in_the_body_the_server_stored() -> None:
    stored = doc.body(LINKED).replace(
        "<a href=", '<a target="_blank" rel="noreferrer noopener" href='
    )
    assert doc.shows_link(stored, CDCS)
    assert not doc.shows_link(doc.body(FACTS), CDCS)
