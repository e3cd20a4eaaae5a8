"""The archive destination: path layout, idempotency, name clashes, safety."""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from nxdrop.destinations import ExportContext
from nxdrop.destinations.archive import ArchiveDestination
from nxdrop.reader import RecordReader
from nxdrop.settings import Settings
from tests.test_fsops import LONG_NAMES


@pytest.fixture
def archive(tmp_path: Path, make_settings: Callable[..., Settings]) -> ArchiveDestination:
    dest = ArchiveDestination()
    dest.configure(make_settings(archive_path=tmp_path / "archive"))
    return dest


def context(path: Path) -> ExportContext:
    return ExportContext.for_record(RecordReader(10**8).read(path))


def test_layout_url_and_id(
    archive: ArchiveDestination, place: Callable[..., Path], tmp_path: Path
) -> None:
    record = place(name="2018-11-13_FEI-Titan-TEM_204.xml")

    result = archive.export(context(record))

    copy = tmp_path / "archive" / "FEI-Titan-TEM" / "2018" / "11" / record.name
    assert copy.read_bytes() == record.read_bytes()
    assert result.success
    assert result.record_id == "FEI-Titan-TEM/2018/11/2018-11-13_FEI-Titan-TEM_204.xml"
    assert result.record_url == copy.as_uri()
    assert oct(copy.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in copy.parent.iterdir()] == [record.name]  # no temporary left


def test_same_bytes_again_are_recognised_not_rewritten(
    archive: ArchiveDestination, place: Callable[..., Path]
) -> None:
    first = archive.export(context(place()))
    copy = Path(first.metadata["path"])
    before = copy.stat()

    again = archive.export(context(place()))

    assert again.record_id == first.record_id
    after = copy.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_new_content_replaces_the_copy_and_keeps_the_earlier_versions(
    archive: ArchiveDestination, place: Callable[..., Path], drop: Path
) -> None:
    first = archive.export(context(place()))
    copy = Path(first.metadata["path"])
    original = copy.read_bytes()
    changed = drop / "example_record.xml"
    for n in (1, 2):
        changed.write_bytes(original + f"<!-- correction {n} -->".encode())
        again = archive.update(context(changed), first)
        assert again.record_id == first.record_id  # one session, one record
    assert archive.export(context(changed)).record_id == first.record_id  # recognised

    assert copy.read_bytes() == original + b"<!-- correction 2 -->"
    assert copy.with_name("example_record.v1.xml").read_bytes() == original
    assert copy.with_name("example_record.v2.xml").read_bytes() == (
        original + b"<!-- correction 1 -->"
    )
    assert sorted(p.name for p in copy.parent.iterdir()) == [
        "example_record.v1.xml",
        "example_record.v2.xml",
        "example_record.xml",
    ]


def test_an_update_that_moves_the_record_keeps_the_old_copy_as_a_version(
    archive: ArchiveDestination, drop: Path, corpus: Path, tmp_path: Path
) -> None:
    path = drop / "x.xml"
    content = (corpus / "example_record.xml").read_bytes()
    path.write_bytes(content)
    first = archive.export(context(path))
    path.write_bytes(content.replace(b"FEI-Titan-TEM", b"JEOL-ARM"))  # fixed instrument

    moved = archive.update(context(path), first)

    root = tmp_path / "archive"
    assert moved.record_id == "JEOL-ARM/2018/11/x.xml"
    assert not (root / "FEI-Titan-TEM/2018/11/x.xml").exists()
    assert (root / "FEI-Titan-TEM/2018/11/x.v1.xml").read_bytes() == content


def test_a_copy_removed_from_the_archive_is_written_again_not_reused(
    archive: ArchiveDestination, place: Callable[..., Path]
) -> None:
    ctx = context(place())
    first = archive.export(ctx)
    assert archive.reconcile(ctx, first) is first  # still there: reused as it is
    copy = Path(first.metadata["path"])
    copy.unlink()  # an operator tidied the archive

    again = archive.reconcile(ctx, first)

    assert again.record_id == first.record_id and copy.read_bytes() == ctx.content


def test_concurrent_exports_of_one_record_write_one_copy(
    archive: ArchiveDestination, place: Callable[..., Path], tmp_path: Path
) -> None:
    ctx = context(place())
    with ThreadPoolExecutor(max_workers=8) as pool:
        ids = set(pool.map(lambda _: archive.export(ctx).record_id, range(16)))
    assert len(ids) == 1
    assert len(list((tmp_path / "archive").rglob("*.xml"))) == 1


@pytest.mark.parametrize(
    ("instrument", "folder"),
    [
        ("../../etc", "etc"),
        (".hidden", "hidden"),
        ("FEI Titan/TEM", "FEI_Titan_TEM"),
        (None, "unknown-instrument"),
    ],
)
def test_instrument_names_cannot_escape_the_archive(
    archive: ArchiveDestination,
    place: Callable[..., Path],
    tmp_path: Path,
    instrument: str | None,
    folder: str,
) -> None:
    ctx = context(place())
    ctx.instrument_pid = instrument
    result = archive.export(ctx)
    assert result.record_id == f"{folder}/2018/11/example_record.xml"
    assert Path(result.metadata["path"]).resolve().is_relative_to(tmp_path / "archive")


def test_the_month_is_the_records_own(
    archive: ArchiveDestination, place: Callable[..., Path]
) -> None:
    ctx = context(place())
    ctx.dt_from = datetime.fromisoformat("2024-01-31T23:30:00-05:00")  # February in UTC
    assert archive.export(ctx).record_id == "FEI-Titan-TEM/2024/01/example_record.xml"
    ctx.dt_from = None
    assert archive.export(ctx).record_id == "FEI-Titan-TEM/undated/00/example_record.xml"


def test_enabled_validate_and_reason(
    tmp_path: Path, make_settings: Callable[..., Settings]
) -> None:
    off = ArchiveDestination()
    off.configure(make_settings())
    assert not off.enabled
    assert off.validate_config() == (False, "NX_ARCHIVE_PATH is not set")

    blocker = tmp_path / "file"
    blocker.write_text("")
    broken = ArchiveDestination()
    broken.configure(make_settings(archive_path=blocker / "archive"))
    ok, reason = broken.validate_config()
    assert not ok and reason is not None and "NX_ARCHIVE_PATH" in reason

    fine = ArchiveDestination()
    fine.configure(make_settings(archive_path=tmp_path / "new" / "archive"))
    assert fine.validate_config() == (True, None)
    assert os.access(tmp_path / "new" / "archive", os.W_OK)


def long_session_record(drop: Path, corpus: Path, name: str) -> Path:
    path = drop / name
    path.write_bytes((corpus / "example_record.xml").read_bytes())
    return path


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_a_255_byte_name_is_archived_with_its_versions_in_names_that_fit(
    archive: ArchiveDestination, drop: Path, corpus: Path, tmp_path: Path, name: str
) -> None:
    path = long_session_record(drop, corpus, name)
    original = path.read_bytes()
    first = archive.export(context(path))
    for n in (1, 2, 3):
        path.write_bytes(original + f"<!-- correction {n} -->".encode())
        assert archive.update(context(path), first).record_id == first.record_id

    folder = Path(first.metadata["path"]).parent
    names = sorted(os.listdir(os.fsencode(folder)))
    assert len(names) == 4 and all(len(n) <= 255 for n in names)  # no temporary left
    copy = Path(first.metadata["path"])
    assert copy.read_bytes() == original + b"<!-- correction 3 -->"
    versions = sorted(p.read_bytes() for p in folder.iterdir() if p != copy)
    assert versions == sorted(
        [original] + [original + f"<!-- correction {n} -->".encode() for n in (1, 2)]
    )
    assert Path(first.metadata["path"]).resolve().is_relative_to(tmp_path / "archive")


def marker(session: str) -> bytes:
    return f"<!-- {session.encode().hex()} -->".encode()


def test_sessions_whose_names_differ_only_in_characters_made_safe_keep_their_own_files(
    archive: ArchiveDestination, drop: Path, corpus: Path
) -> None:
    sessions = ["試料1", "実験1", "a b", "a_b", "a?b", "x", "x.v1", "-rf", "..", "é"]
    ids = {}
    for session in sessions:
        path = drop / f"{session}.xml"
        path.write_bytes((corpus / "example_record.xml").read_bytes() + marker(session))
        ids[session] = archive.export(context(path)).record_id

    assert len(set(ids.values())) == len(sessions)  # one file per session
    assert ids["試料1"].endswith("/試料1.xml") and ids["a_b"].endswith("/a_b.xml")
    assert ids["-rf"].endswith("/-rf.xml") and ids["x"].endswith("/x.xml")
    for session, record_id in ids.items():
        copy = archive.root / record_id  # type: ignore[operator]
        assert copy.read_bytes().endswith(marker(session))
        assert not copy.name.startswith(".")


def test_a_huge_instrument_name_still_makes_a_folder(
    archive: ArchiveDestination, place: Callable[..., Path], tmp_path: Path
) -> None:
    ctx = context(place())
    ctx.instrument_pid = "FEI-" + "Titan" * 100
    result = archive.export(ctx)
    instrument = result.record_id.split("/")[0]  # type: ignore[union-attr]
    assert len(instrument.encode()) <= 255 and instrument.startswith("FEI-Titan")
    assert Path(result.metadata["path"]).read_bytes() == ctx.content
