"""The drop folder: what counts as a record, moves that never overwrite, retry, any name
the kernel allows, and a drop folder that cannot be used."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from nxdrop.exceptions import ConfigError
from nxdrop.folders import DropFolder, WorkFolder, error_file_for, is_record_name
from nxdrop.records import escape_name, session_identifier_of
from tests.test_fsops import LONG_NAMES

NAME_MAX = 255


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


ODD_NAMES = {
    **LONG_NAMES,
    "long-invalid-and-newline": os.fsdecode(b"a\nb\xff" + b"c" * 247 + b".xml"),
    "newline": "2024-01-15_FEI\n<3>FAKE ERROR.xml",
    "leading-dash": "-rf --all.xml",
    "invalid-utf8": os.fsdecode(b"bad-\xff\xfe-name.xml"),
}


def listing(folder: Path) -> list[bytes]:
    return sorted(os.listdir(os.fsencode(folder)))


@pytest.mark.parametrize("name", ODD_NAMES.values(), ids=ODD_NAMES.keys())
def test_any_name_moves_through_failed_uploaded_and_retry_and_nothing_is_lost(
    work: WorkFolder, drop: Path, name: str
) -> None:
    assert is_record_name(name) and len(os.fsencode(name)) <= NAME_MAX
    for n in range(3):  # the same name fails three times: three copies, three reasons
        (drop / name).write_bytes(f"failed {n}".encode())
        claimed = work.claim(drop / name)
        assert claimed is not None
        work.to_failed(claimed, name, {"error": f"attempt {n}"})
    for n in range(3):
        (drop / name).write_bytes(f"uploaded {n}".encode())
        claimed = work.claim(drop / name)
        assert claimed is not None
        work.to_uploaded(claimed, name)

    failed, uploaded = drop / "failed", drop / "uploaded"
    for folder in (failed, uploaded, drop / ".nxdrop" / "work" / "lab-0"):
        assert all(len(n) <= NAME_MAX for n in listing(folder))
    assert sorted(p.read_bytes() for p in uploaded.iterdir()) == [
        f"uploaded {n}".encode() for n in range(3)
    ]
    records = [p for p in failed.iterdir() if is_record_name(p.name)]
    assert sorted(p.read_bytes() for p in records) == [f"failed {n}".encode() for n in range(3)]
    reasons = sorted(json.loads(error_file_for(p).read_text())["error"] for p in records)
    assert reasons == ["attempt 0", "attempt 1", "attempt 2"]
    assert len(listing(failed)) == 6  # three records, three reasons: no stray file
    assert {session_identifier_of(p.name) for p in records} == {session_identifier_of(name)}
    assert work.held() == []

    # Retried by session, as an operator copies it from `nxdrop status` (escaped).
    back = DropFolder(drop).retry([escape_name(session_identifier_of(name))])

    assert len(back) == 3 and listing(failed) == []  # the reasons went with them
    assert sorted(p.read_bytes() for p in back) == [f"failed {n}".encode() for n in range(3)]
    assert all(p.parent == drop and len(os.fsencode(p.name)) <= NAME_MAX for p in back)


def test_the_reason_of_a_255_byte_name_has_a_name_that_fits_and_is_found_again(
    work: WorkFolder, drop: Path
) -> None:
    name = LONG_NAMES["utf8-3"]
    (drop / name).write_text("<Experiment/>")
    claimed = work.claim(drop / name)
    assert claimed is not None

    moved = work.to_failed(claimed, name, {"error": "why"})

    reason = error_file_for(moved)
    assert moved.name == name and reason.parent == drop / "failed"
    assert len(os.fsencode(reason.name)) <= NAME_MAX and reason.name.endswith(".error.json")
    assert json.loads(reason.read_text()) == {"error": "why"}
    assert error_file_for(drop / "failed" / "x.xml").name == "x.xml.error.json"
    assert DropFolder(drop).retry([name]) == [drop / name]
    assert not reason.exists()


def test_a_file_put_back_under_a_255_byte_name_taken_meanwhile_gets_a_copy_name(
    work: WorkFolder, drop: Path
) -> None:
    name = LONG_NAMES["ascii"]
    (drop / name).write_text("claimed")
    claimed = work.claim(drop / name)
    assert claimed is not None
    (drop / name).write_text("rebuilt meanwhile")

    back = work.put_back(claimed, name)

    assert back.parent == drop and back.name != name and len(os.fsencode(back.name)) <= NAME_MAX
    assert back.read_text() == "claimed" and (drop / name).read_text() == "rebuilt meanwhile"
    assert session_identifier_of(back.name) == session_identifier_of(name)
    assert sorted(n for _, n in DropFolder(drop).scan()) == sorted([name, back.name])


def test_a_long_host_name_still_makes_slot_names_that_fit(drop: Path) -> None:
    slot, _ = WorkFolder.acquire(DropFolder(drop), host="h" * 300)
    try:
        assert len(slot.worker) < NAME_MAX - len(".lock")
        assert slot.path.is_dir() and (drop / ".nxdrop" / "work" / f"{slot.worker}.lock").exists()
    finally:
        slot.release()


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_drop_folder_that_cannot_be_used_is_a_configuration_error(
    tmp_path: Path, where: str
) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("not a folder")
    drop = blocker if where == "a file" else blocker / "drop"

    with pytest.raises(ConfigError, match=r"NX_DROP_PATH=.*blocker"):
        WorkFolder.acquire(DropFolder(drop), host="lab")


def acquire_as(drop: Path, uid: int | None) -> str:
    """``WorkFolder.acquire`` in a child process, as user ``uid`` if given; what it said."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery, just the call and its answer
        code = 0
        try:
            os.close(read)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            try:
                WorkFolder.acquire(DropFolder(drop), host="lab")[0].release()
                answer = "acquired"
            except ConfigError as exc:
                answer = str(exc)
            os.write(write, answer.encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as fh:
        answer = fh.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return answer


def test_a_drop_folder_this_user_may_not_write_is_a_configuration_error() -> None:
    # A folder of its own under /tmp, so that another user can reach it.
    top = Path(tempfile.mkdtemp(prefix="nxdrop-readonly-"))
    try:
        top.chmod(0o755)
        folder = DropFolder(top / "drop")
        folder.create()
        for path in (folder.path, folder.uploaded, folder.failed, folder.work, folder.work.parent):
            path.chmod(0o555)
        # root may write anywhere: the check runs as `nobody` then.
        answer = acquire_as(folder.path, 65534 if os.geteuid() == 0 else None)
        assert answer.startswith(f"NX_DROP_PATH={folder.path}") and "not writable" in answer
    finally:
        for path in [top, *top.rglob("*")]:
            if path.is_dir():
                path.chmod(0o755)
        shutil.rmtree(top)


def test_run_once_with_a_drop_folder_that_is_a_file_exits_2_naming_the_variable(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "drop-is-a-file"
    blocker.write_text("oops")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(blocker),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        "NX_LOG_TARGET": "stderr",
    }

    result = subprocess.run(
        [sys.executable, "-m", "nxdrop", "run", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert result.returncode == 2, result.stderr
    assert "NX_DROP_PATH" in result.stderr and str(blocker) in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert blocker.read_text() == "oops"
