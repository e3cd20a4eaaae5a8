"""The drop folder: what counts as a record, moves that never overwrite, retry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from nxdrop.folders import DropFolder, WorkFolder, is_record_name
from nxdrop.records import session_identifier_of


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

    assert sorted(name for _, name in folder.scan()) == ["a.xml", "b.xml", "link.xml"]
    assert folder.is_candidate(drop / "a.xml")
    assert not folder.is_candidate(drop / "sub" / "e.xml")
    assert not folder.is_candidate(drop / "uploaded")


@pytest.fixture
def work(drop: Path) -> Iterator[WorkFolder]:
    slot, _ = WorkFolder.acquire(DropFolder(drop), host="lab")
    yield slot
    slot.release()


def test_moves_never_overwrite_and_copy_names_stay_one_session(
    work: WorkFolder, drop: Path
) -> None:
    targets = []
    for name, content in (("x.xml", "first"), ("x.xml", "second"), ("x.1.xml", "third")):
        (drop / name).write_text(content)
        claimed = work.claim(drop / name)
        assert claimed is not None and claimed.parent == drop / ".nxdrop" / "work" / "lab-0"
        targets.append(work.to_uploaded(claimed, name))

    assert [t.name for t in targets] == ["x.xml", "x.1.xml", "x.2.xml"]
    assert [t.read_text() for t in targets] == ["first", "second", "third"]
    assert {session_identifier_of(t.name) for t in targets} == {"x"}
    assert work.held() == []


def test_a_claim_is_a_rename_and_only_one_claimant_gets_the_file(
    work: WorkFolder, drop: Path
) -> None:
    (drop / "x.xml").write_text("<Experiment/>")
    other, _ = WorkFolder.acquire(DropFolder(drop), host="lab")  # another process, same host
    try:
        assert other.worker == "lab-1"
        first, second = work.claim(drop / "x.xml"), other.claim(drop / "x.xml")
    finally:
        other.release()
    assert first is not None and first.read_text() == "<Experiment/>"
    assert second is None
    (drop / "x.xml").write_text("<Experiment>new</Experiment>")  # the builder writes anew
    again = work.claim(drop / "x.xml")
    assert again is not None and again.name == "x.1.xml" and first.exists()


def test_a_dead_process_slot_is_put_back_at_the_next_start(drop: Path) -> None:
    folder = DropFolder(drop)
    alive, _ = WorkFolder.acquire(folder, host="lab")
    dead, _ = WorkFolder.acquire(folder, host="lab")
    (drop / "a.xml").write_text("a")
    (drop / "b.xml").write_text("b")
    alive.claim(drop / "a.xml")
    dead.claim(drop / "b.xml")
    (drop / "b.xml").write_text("b, rebuilt meanwhile")
    dead.release()  # what the kernel does when the process dies

    mine, recovery = WorkFolder.acquire(folder, host="lab")
    try:
        assert mine.worker == "lab-1" and recovery.workers == ["lab-1"]
        assert sorted(p.name for p in recovery.put_back) == ["b.1.xml"]
        assert (drop / "b.1.xml").read_text() == "b"
        assert (drop / "b.xml").read_text() == "b, rebuilt meanwhile"
        assert [p.name for p in alive.held()] == ["a.xml"]  # a live process's are its own
    finally:
        mine.release()
        alive.release()


def test_failed_gets_an_error_file_and_retry_moves_back(work: WorkFolder, drop: Path) -> None:
    (drop / "x.xml").write_text("<Experiment/>")
    claimed = work.claim(drop / "x.xml")
    assert claimed is not None
    moved = work.to_failed(claimed, "x.xml", {"error": "cdcs: HTTP 500"})

    assert json.loads((drop / "failed" / "x.xml.error.json").read_text()) == {
        "error": "cdcs: HTTP 500"
    }
    folder = DropFolder(drop)
    assert folder.retry(["x.xml"]) == [drop / "x.xml"]
    assert (drop / "x.xml").exists()
    assert not moved.exists()
    assert not (drop / "failed" / "x.xml.error.json").exists()


def test_an_orphaned_reason_is_replaced_not_kept(work: WorkFolder, drop: Path) -> None:
    (drop / "failed" / "x.xml.error.json").write_text("{}")  # its record was retried by hand
    (drop / "x.xml").write_text("<Experiment/>")
    claimed = work.claim(drop / "x.xml")
    assert claimed is not None
    assert work.to_failed(claimed, "x.xml", {"error": "new"}).name == "x.xml"
    assert json.loads((drop / "failed" / "x.xml.error.json").read_text()) == {"error": "new"}


def test_retry_by_file_session_or_all_and_unknown_names(drop: Path) -> None:
    folder = DropFolder(drop)
    folder.create()
    for name in ("a.xml", "b.xml", "b.1.xml", "c.xml"):
        (drop / "failed" / name).write_text("<Experiment/>")
    with pytest.raises(FileNotFoundError, match=r"nope"):
        folder.retry(["a.xml", "nope"])
    assert (drop / "failed" / "a.xml").exists()  # nothing moved when one name is unknown
    with pytest.raises(FileNotFoundError):
        folder.retry(["../a.xml"])
    assert sorted(p.name for p in folder.retry(["b"])) == ["b.1.xml", "b.xml"]
    assert [p.name for p in folder.retry([str(drop / "failed" / "a.xml")])] == ["a.xml"]
    assert sorted(p.name for p in folder.retry(None)) == ["c.xml"]
    assert list((drop / "failed").iterdir()) == []


def test_the_working_folder_is_not_a_record_anywhere(work: WorkFolder, drop: Path) -> None:
    (drop / "x.xml").write_text("<Experiment/>")
    work.claim(drop / "x.xml")
    assert DropFolder(drop).scan() == []
    assert not DropFolder(drop).is_candidate(drop / ".nxdrop")
