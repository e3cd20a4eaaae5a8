"""The drop folder: what counts as a record, moves that never overwrite, retry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nxdrop.folders import Claim, DropFolder, claim, is_record_name


@pytest.mark.parametrize(
    ("name", "is_record"),
    [
        ("2021-08-04_FEI-Titan-TEM_3fa3.xml", True),
        ("x.xml", True),
        (".hidden.xml", False),
        ("x.xml.part", False),
        ("x.xml.tmp", False),
        ("x.xml~", False),
        ("x.part", False),
        ("x.XML", False),
        ("notes.txt", False),
        (".xml", False),
    ],
)
def test_record_names(name: str, is_record: bool) -> None:
    assert is_record_name(name) is is_record


def test_scan_takes_records_only(drop: Path) -> None:
    folder = DropFolder(drop)
    folder.create()
    for name in ("b.xml", "a.xml", ".c.xml", "d.xml.part", "notes.txt"):
        (drop / name).write_text("<Experiment/>")
    (drop / "sub").mkdir()
    (drop / "sub" / "e.xml").write_text("<Experiment/>")
    (drop / "link.xml").symlink_to(drop / "a.xml")

    assert sorted(p.name for p in folder.scan()) == ["a.xml", "b.xml", "link.xml"]
    assert folder.is_candidate(drop / "a.xml")
    assert not folder.is_candidate(drop / "sub" / "e.xml")
    assert not folder.is_candidate(drop / "uploaded")


def test_moves_never_overwrite(drop: Path) -> None:
    folder = DropFolder(drop)
    folder.create()
    targets = []
    for content in ("first", "second", "third"):
        (drop / "x.xml").write_text(content)
        targets.append(folder.move_to_uploaded(drop / "x.xml"))

    assert [t.name for t in targets] == ["x.xml", "x.1.xml", "x.2.xml"]
    assert [t.read_text() for t in targets] == ["first", "second", "third"]
    assert not (drop / "x.xml").exists()


def test_failed_gets_an_error_file_and_retry_moves_back(drop: Path) -> None:
    folder = DropFolder(drop)
    folder.create()
    (drop / "x.xml").write_text("<Experiment/>")
    moved = folder.move_to_failed(drop / "x.xml", {"error": "cdcs: HTTP 500"})

    assert json.loads((drop / "failed" / "x.xml.error.json").read_text()) == {
        "error": "cdcs: HTTP 500"
    }
    assert folder.retry(["x.xml"]) == [drop / "x.xml"]
    assert (drop / "x.xml").exists()
    assert not moved.exists()
    assert not (drop / "failed" / "x.xml.error.json").exists()


def test_retry_all_and_unknown_names(drop: Path) -> None:
    folder = DropFolder(drop)
    folder.create()
    for name in ("a.xml", "b.xml"):
        (drop / "failed" / name).write_text("<Experiment/>")
    with pytest.raises(FileNotFoundError, match=r"nope\.xml"):
        folder.retry(["nope.xml"])
    with pytest.raises(FileNotFoundError):
        folder.retry(["../a.xml"])
    assert sorted(p.name for p in folder.retry(None)) == ["a.xml", "b.xml"]
    assert list((drop / "failed").iterdir()) == []


def test_claim_locks_the_file_not_the_name(drop: Path) -> None:
    path = drop / "x.xml"
    path.write_text("<Experiment/>")
    with claim(path) as first:
        assert first is Claim.OURS
        with claim(path) as second:  # another open file description: as another process
            assert second is Claim.TAKEN
    with claim(path) as again:
        assert again is Claim.OURS
    with claim(drop / "missing.xml") as missing:
        assert missing is Claim.GONE
    (drop / "link.xml").symlink_to(path)
    with claim(drop / "link.xml") as link:
        assert link is Claim.OURS  # not opened: the reader refuses it


def test_a_new_file_under_a_claimed_name_is_free_to_take(drop: Path) -> None:
    path = drop / "x.xml"
    path.write_text("<Experiment/>")
    with claim(path) as first:
        assert first is Claim.OURS
        DropFolder(drop).move_to_uploaded(path)  # done by the holder; a new file arrives
        path.write_text("<Experiment>new</Experiment>")
        with claim(path) as second:
            assert second is Claim.OURS  # the new file is a different one, free to take
    with claim(drop / "uploaded" / "x.xml") as moved:
        assert moved is Claim.OURS
