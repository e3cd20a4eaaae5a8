"""The entry points of the installed distributions, read as ``importlib.metadata`` reads them.

Importing ``importlib.metadata`` costs 30 to 50 ms at every start here (it brings
``email``, ``zipfile``, ``csv`` and more along), for what is a few small files to read:
each ``*.dist-info/entry_points.txt`` and ``*.egg-info/entry_points.txt`` on ``sys.path``,
in the INI-like format of the entry points specification. The rules are the standard
library's: the first distribution of a name on ``sys.path`` wins (names compared
normalised); lines are stripped and ``#`` starts a comment. Distributions inside zip files
on ``sys.path`` are not looked into, and a file that is not UTF-8 is skipped (the standard
library raises).
``tests/test_entrypoints.py`` holds it to ``importlib.metadata`` on this environment.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

_VALUE = re.compile(r"(?P<module>[\w.]+)\s*(:\s*(?P<attr>[\w.]+)\s*)?((?P<extras>\[.*\])\s*)?$")


@dataclass(frozen=True)
class EntryPoint:
    """One entry point: ``value`` is ``module:attribute``; ``dist`` its distribution's name."""

    name: str
    value: str
    group: str
    dist: str | None = None

    def load(self) -> Any:
        """Import the module and return the object the value names."""
        match = _VALUE.match(self.value)
        if match is None:
            raise ValueError(f"not an entry point value: {self.value!r}")
        found: Any = importlib.import_module(match.group("module"))
        for attr in filter(None, (match.group("attr") or "").split(".")):
            found = getattr(found, attr)
        return found


def entry_points(group: str, path: list[str] | None = None) -> list[EntryPoint]:
    """The entry points of ``group``, distribution by distribution in ``path`` order
    (default ``sys.path``)."""
    found: list[EntryPoint] = []
    seen: set[str] = set()
    for folder in sys.path if path is None else path:
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:
            continue  # missing, not a folder, or a zip file
        for entry in names:
            if not entry.lower().endswith((".dist-info", ".egg-info")):
                continue
            key = re.sub(r"[-_.]+", "_", entry.rpartition(".")[0].partition("-")[0]).lower()
            if key in seen:
                continue
            seen.add(key)
            info = os.path.join(folder or ".", entry)
            pairs = _section(_read(info, "entry_points.txt"), group)
            if pairs:
                dist = _name(_read(info, "METADATA") or _read(info, "PKG-INFO")) or key
                found += [EntryPoint(name, value, group, dist) for name, value in pairs]
    return found


def _read(folder: str, name: str) -> str:
    try:
        with open(os.path.join(folder, name), "rb") as fh:
            return fh.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _name(metadata: str) -> str | None:
    """The ``Name`` header of a distribution's metadata (headers end at the first blank line)."""
    for line in metadata.splitlines():
        if not line.strip():
            break
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() == "name":
            return value.strip()
    return None


def _section(text: str, group: str) -> list[tuple[str, str]]:
    """``name = value`` pairs of the section ``[group]`` (lines stripped, ``#`` comments)."""
    pairs: list[tuple[str, str]] = []
    section = None
    for line in map(str.strip, text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        elif section == group:
            name, sep, value = line.partition("=")
            if sep:
                pairs.append((name.strip(), value.strip()))
    return pairs
