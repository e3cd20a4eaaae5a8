"""Finding destinations: built-ins and plugins, through one path.

Built-ins are entry points like any plugin's (datasette's ``DEFAULT_PLUGINS``): they are
listed here rather than in ``pyproject.toml`` only so that a source checkout works without
being installed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from nxdrop.destinations.base import ExportDestination, as_destination
from nxdrop.entrypoints import EntryPoint, entry_points
from nxdrop.exceptions import ConfigError

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "nxdrop.destinations"

DEFAULT_DESTINATIONS: dict[str, str] = {
    "cdcs": "nxdrop.destinations.cdcs:CDCSDestination",
    "elabftw": "nxdrop.destinations.elabftw:ELabFTWDestination",
    "archive": "nxdrop.destinations.archive:ArchiveDestination",
}

NOTHING_ENABLED = (
    "no destination is enabled: set NX_CDCS_URL and NX_CDCS_TOKEN, or NX_ELABFTW_URL and "
    "NX_ELABFTW_API_KEY, or NX_ARCHIVE_PATH, or install a destination plugin "
    "(`nxdrop destinations` shows why each one is off)"
)


@dataclass
class Found:
    """One destination found, loaded or not, with what ``nxdrop destinations`` shows."""

    name: str
    source: str
    destination: ExportDestination | None = None
    error: str | None = None
    config_error: bool = False

    @property
    def priority(self) -> int:
        return self.destination.priority if self.destination is not None else 0

    @property
    def enabled(self) -> bool:
        if self.destination is None:
            return False
        try:
            return bool(self.destination.enabled)
        except Exception:
            log.exception("destination %s: its `enabled` raised", self.name)
            return False


def _entry_points() -> list[tuple[EntryPoint, str]]:
    builtin = [
        (EntryPoint(name, value, ENTRY_POINT_GROUP), "built-in")
        for name, value in DEFAULT_DESTINATIONS.items()
    ]
    plugins = []
    for ep in entry_points(ENTRY_POINT_GROUP):
        if ep.name in DEFAULT_DESTINATIONS and ep.value == DEFAULT_DESTINATIONS[ep.name]:
            continue  # nxdrop's own, when installed with them declared
        plugins.append((ep, f"plugin ({ep.dist or '?'})"))
    return builtin + plugins


def discover(settings: Settings) -> list[Found]:
    """Every destination found, highest priority first; a broken plugin is reported, not fatal."""
    found: list[Found] = []
    names: set[str] = set()
    for ep, source in _entry_points():
        item = _load(ep, source, settings)
        if item.name in names:
            item.destination, item.error = None, f"name {item.name!r} is already taken"
        names.add(item.name)
        found.append(item)
    found.sort(key=lambda f: (-f.priority, f.name))
    return found


def _load(ep: EntryPoint, source: str, settings: Settings) -> Found:
    try:
        destination = as_destination(ep.load()())
        if destination is None:
            return Found(ep.name, source, error="does not have the destination interface")
        destination.configure(settings)
    except ConfigError as exc:
        return Found(ep.name, source, error=str(exc), config_error=True)
    except Exception as exc:
        log.warning("destination %s (%s) cannot be loaded: %s", ep.name, ep.value, exc)
        return Found(ep.name, source, error=f"cannot be loaded: {type(exc).__name__}: {exc}")
    return Found(str(destination.name), source, destination=destination)


def enabled_destinations(found: list[Found]) -> list[ExportDestination]:
    """The enabled destinations in priority order.

    None at all, or one whose settings are wrong, is a configuration error: the daemon must
    not run without a destination the operator asked for.
    """
    for f in found:
        if f.config_error:
            raise ConfigError(f"destination {f.name}: {f.error}")
    enabled = [f.destination for f in found if f.destination is not None and f.enabled]
    if not enabled:
        raise ConfigError(NOTHING_ENABLED)
    return enabled
