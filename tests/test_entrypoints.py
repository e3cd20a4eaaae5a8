"""nxdrop's entry point reader against ``importlib.metadata``, on this very environment and
on a folder of distributions written as pip and setuptools write them."""

from __future__ import annotations

import importlib.metadata
import sys
from pathlib import Path

import pytest

from nxdrop.entrypoints import EntryPoint, entry_points
from tests.fixtures.plugins import install_plugin


def _stdlib(group: str, path: list[str]) -> list[tuple[str, str, str | None]]:
    dists = importlib.metadata.distributions(path=path)
    seen: set[str] = set()
    found = []
    for dist in dists:  # importlib.metadata.entry_points() keeps the first of each name
        key = dist._normalized_name  # type: ignore[attr-defined]
        if key in seen:
            continue
        seen.add(key)
        found += [(ep.name, ep.value, dist.name) for ep in dist.entry_points if ep.group == group]
    return found


def _ours(group: str, path: list[str]) -> list[tuple[str, str, str | None]]:
    return [(ep.name, ep.value, ep.dist) for ep in entry_points(group, path)]


@pytest.mark.parametrize("group", ["console_scripts", "pytest11", "nxdrop.destinations"])
def test_the_installed_entry_points_are_those_importlib_metadata_finds(group: str) -> None:
    # Compared as sets: the standard library lists a folder in the file system's order.
    assert set(_ours(group, sys.path)) == set(_stdlib(group, sys.path))
    assert _ours("console_scripts", sys.path), "this environment has console scripts"


def test_a_folder_of_distributions_reads_as_importlib_metadata_reads_it(tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    install_plugin(first, "alpha", "class A: pass\n", {"a": "alpha:A", "b": "alpha:A.__init__"})
    install_plugin(second, "alpha", "class B: pass\n", {"shadowed": "alpha:B"})  # same name
    egg = second / "Old_Style.egg-info"
    egg.mkdir()
    (egg / "PKG-INFO").write_text("Metadata-Version: 1.1\nName: Old-Style\n\nbody: x\n")
    (egg / "entry_points.txt").write_text(
        "# a comment\n[other]\nx = y:z\n\n  [nxdrop.destinations]  \n  # another\n"
        "old = old.module : Thing [extra]\nbare=old.module\n"
    )
    path = [str(first), str(second), str(tmp_path / "missing")]

    ours = _ours("nxdrop.destinations", path)
    assert ours == [
        ("a", "alpha:A", "alpha"),
        ("b", "alpha:A.__init__", "alpha"),
        ("old", "old.module : Thing [extra]", "Old-Style"),
        ("bare", "old.module", "Old-Style"),
    ]
    assert set(ours) == set(_stdlib("nxdrop.destinations", path))

    # Where the standard library raises (UnicodeDecodeError), the distribution is skipped.
    broken = tmp_path / "third" / "broken-1.0.dist-info"
    broken.mkdir(parents=True)
    (broken / "entry_points.txt").write_bytes(b"[nxdrop.destinations]\nx = \xff\n")
    assert _ours("nxdrop.destinations", [*path, str(broken.parent)]) == ours


def test_an_entry_point_loads_the_object_it_names() -> None:
    assert EntryPoint("x", "os.path:join", "g").load() is __import__("os").path.join
    assert EntryPoint("x", "os.path", "g").load() is __import__("os").path
    assert EntryPoint("x", "nxdrop.entrypoints:EntryPoint.load", "g").load() is EntryPoint.load
    with pytest.raises(ValueError, match="not an entry point value"):
        EntryPoint("x", "not a value!", "g").load()
