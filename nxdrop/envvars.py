"""Variables read the way pydantic-settings reads them, without pydantic's import cost.

Names in any case, an empty value is "not set", env files parsed by python-dotenv (which
pydantic-settings uses), values converted by pydantic's lax rules for text, and errors in
pydantic's words. ``tests/test_settings.py`` holds both side by side.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from types import UnionType
from typing import Any, Literal, get_args, get_origin

from nxdrop.exceptions import ConfigError


def read_env_file(path: Path) -> dict[str, str | None]:
    """The variables of an env file, parsed as pydantic-settings parses it."""
    if not path.is_file():
        raise ConfigError(f"env file {path}: no such file")
    from dotenv import dotenv_values  # only where an env file is used

    try:
        return dotenv_values(path, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"env file {path}: cannot read it: {exc}") from None


def variables(source: Mapping[str, str | None], prefix: str) -> dict[str, str]:
    """The variables of ``source`` named ``prefix…``, in any case, by the rest of their
    name in lower case; an empty value means "not set"."""
    prefix = prefix.lower()
    return {
        key.lower().removeprefix(prefix): value
        for key, value in source.items()
        if value and key.lower().startswith(prefix)
    }


def without_none(hint: Any) -> Any:
    """``X`` for ``X | None``."""
    if isinstance(hint, UnionType):
        (hint,) = (arg for arg in get_args(hint) if arg is not type(None))
    return hint


def convert(kind: Any, given: Any) -> Any:
    """``given`` as ``kind``, with pydantic's lax rules and words for text."""
    if not isinstance(given, str):
        return float(given) if kind is float and isinstance(given, int) else given
    if kind in _PARSERS:
        return _PARSERS[kind](given)
    if get_origin(kind) is Literal:
        return _one_of(given, get_args(kind))
    if isinstance(kind, type) and issubclass(kind, StrEnum):
        return kind(_one_of(given, [member.value for member in kind]))
    return kind(given)  # str, Path, Secret


_INTEGER = re.compile(r"[+-]?[0-9](?:_?[0-9])*(?:\.0+)?", re.ASCII)
_TRUE = frozenset({"1", "on", "t", "true", "y", "yes"})
_FALSE = frozenset({"0", "off", "f", "false", "n", "no"})


def _integer(text: str) -> int:
    text = text.strip()
    if not _INTEGER.fullmatch(text):
        raise ValueError("Input should be a valid integer, unable to parse string as an integer")
    return int(text.partition(".")[0])


def _number(text: str) -> float:
    try:
        if text.isascii():
            return float(text)
    except ValueError:
        pass
    raise ValueError("Input should be a valid number, unable to parse string as a number")


def _boolean(text: str) -> bool:
    word = text.lower()
    if word not in _TRUE and word not in _FALSE:
        raise ValueError("Input should be a valid boolean, unable to interpret input")
    return word in _TRUE


_PARSERS: dict[Any, Callable[[str], Any]] = {int: _integer, float: _number, bool: _boolean}


def _one_of(text: str, choices: Sequence[str]) -> str:
    if text in choices:
        return text
    quoted = [repr(choice) for choice in choices]
    listed = f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]
    raise ValueError(f"Input should be {listed}")


def check_bounds(value: float, bounds: Mapping[str, float]) -> None:
    """Raise ``ValueError`` unless ``value`` is within ``bounds`` (pydantic's ``gt``, ``ge``,
    ``le``)."""
    # Written as "not (a op b)" so that NaN fails every bound, as it does in pydantic.
    if "gt" in bounds and not value > bounds["gt"]:
        raise ValueError(f"Input should be greater than {bounds['gt']}")
    if "ge" in bounds and not value >= bounds["ge"]:
        raise ValueError(f"Input should be greater than or equal to {bounds['ge']}")
    if "le" in bounds and not value <= bounds["le"]:
        raise ValueError(f"Input should be less than or equal to {bounds['le']}")
