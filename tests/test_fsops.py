"""Filesystem primitives with any name the kernel allows: 255 bytes, multi-byte UTF-8,
bytes that are not UTF-8; every name made fits, every move succeeds, nothing is lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from nxdrop.fsops import (
    NAME_MAX,
    SESSION_MAX,
    base_stem,
    copy_names,
    fit_name,
    move_to_free_name,
    name_bytes,
    write_atomically,
    write_temporary,
)


def name_of(stem: str, total: int = NAME_MAX, suffix: str = ".xml") -> str:
    """``stem`` repeated and cut so that ``<stem…><suffix>`` takes exactly ``total`` bytes
    (padded with ``_`` where a multi-byte character would not fit)."""
    budget = total - len(os.fsencode(suffix))
    out = ""
    for char in stem * total:
        if name_bytes(out + char) > budget:
            break
        out += char
    return out + "_" * (budget - name_bytes(out)) + suffix


LONG_NAMES = {
    "ascii": name_of("2024-01-15_FEI-Titan-TEM_"),
    "utf8-2": name_of("é"),
    "utf8-3": name_of("試料"),
    "utf8-4": name_of("🔬"),
    "invalid-utf8": os.fsdecode(os.fsencode(name_of("x", NAME_MAX - 2)[:-4]) + b"\xff\xfe.xml"),
}


def test_the_long_names_are_what_the_tests_claim() -> None:
    for name in LONG_NAMES.values():
        assert len(os.fsencode(name)) == NAME_MAX


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_fit_name_cuts_at_a_character_and_marks_the_cut(name: str) -> None:
    stem = name.removesuffix(".xml")
    fitted = fit_name(stem, ".error.json")

    assert len(os.fsencode(fitted)) <= NAME_MAX
    assert fitted.endswith(".error.json")
    kept, mark = fitted.removesuffix(".error.json").rsplit("~", 1)
    assert stem.startswith(kept)  # a beginning of the name, cut between two characters
    assert name_bytes(kept) > NAME_MAX - len(".error.json") - len(mark) - 1 - 4  # no more cut
    assert len(mark) == 8
    assert fit_name(stem, ".error.json") == fitted  # found again from the name alone


def test_fit_name_keeps_a_name_that_fits_and_tells_long_names_apart() -> None:
    assert fit_name("x", ".xml") == "x.xml"
    assert fit_name("a" * 251, ".xml") == "a" * 251 + ".xml"  # exactly 255 bytes
    one, two = "a" * 300 + "1", "a" * 300 + "2"  # the same beginning
    assert fit_name(one, ".xml") != fit_name(two, ".xml")
    assert len(fit_name("é" * 200, limit=9)) == 9  # no room for any of it: the mark alone
    assert name_bytes(fit_name("x" * 1000, ".xml", limit=20)) <= 20


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_copy_names_of_a_long_name_fit_and_stay_one_session(name: str, tmp_path: Path) -> None:
    names = copy_names(tmp_path, name)
    first = [next(names) for _ in range(12)]

    assert first[0].name == name
    assert all(len(os.fsencode(p.name)) <= NAME_MAX for p in first)
    assert len({p.name for p in first}) == 12
    assert {base_stem(p.name) for p in first} == {base_stem(name)}
    assert name_bytes(base_stem(name)) <= SESSION_MAX
    assert all(p.name.endswith(".xml") for p in first)


def test_copy_numbers_are_read_back_for_short_names() -> None:
    names = copy_names(Path("f"), "x.1.xml")
    assert [next(names).name for _ in range(3)] == ["x.1.xml", "x.2.xml", "x.3.xml"]
    assert base_stem("x.3.xml") == base_stem("x.xml") == "x"


@pytest.mark.parametrize(
    "name",
    [*LONG_NAMES.values(), "two\nlines.xml", "-rf.xml", " spaced name .xml"],
    ids=[*LONG_NAMES.keys(), "newline", "leading-dash", "spaces"],
)
def test_moves_of_colliding_names_all_succeed_and_nothing_is_lost(
    name: str, tmp_path: Path
) -> None:
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    moved = []
    for n in range(5):
        path = source / name
        path.write_bytes(f"version {n}".encode())
        moved.append(move_to_free_name(path, target, name))

    assert list(source.iterdir()) == []
    names = sorted(os.listdir(os.fsencode(target)))
    assert len(names) == 5 and all(len(n) <= NAME_MAX for n in names)
    assert sorted(p.read_bytes() for p in moved) == [f"version {n}".encode() for n in range(5)]
    assert {base_stem(p.name) for p in moved} == {base_stem(name)}


@pytest.mark.parametrize("name", LONG_NAMES.values(), ids=LONG_NAMES.keys())
def test_temporary_and_atomic_writes_next_to_a_255_byte_name(name: str, tmp_path: Path) -> None:
    tmp = write_temporary(tmp_path, name, b"data")
    assert tmp.name.startswith(".") and tmp.name.endswith(".tmp")
    assert len(os.fsencode(tmp.name)) <= NAME_MAX
    tmp.unlink()

    write_atomically(tmp_path / name, b"first")
    write_atomically(tmp_path / name, b"second")
    assert (tmp_path / name).read_bytes() == b"second"
    assert os.listdir(tmp_path) == [name]  # no temporary left behind
