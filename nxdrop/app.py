"""Assembling nxdrop from its settings: destinations, the store, the pipeline."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from nxdrop.destinations.base import ExportDestination
from nxdrop.destinations.registry import Found, discover, enabled_destinations
from nxdrop.pipeline import Pipeline
from nxdrop.settings import Settings
from nxdrop.store import Store


@dataclass
class App:
    """Everything a command needs, built once."""

    settings: Settings
    found: list[Found]
    destinations: list[ExportDestination]
    store: Store
    pipeline: Pipeline
    stop: threading.Event = field(default_factory=threading.Event)


def build_app(settings: Settings) -> App:
    """Load destinations (at least one must be enabled), open the database, make the folders.

    Raises :class:`~nxdrop.exceptions.ConfigError` for anything the operator must fix.
    """
    found = discover(settings)
    destinations = enabled_destinations(found)
    store = Store(settings.database_url)
    stop = threading.Event()
    pipeline = Pipeline(settings, destinations, store, stop=stop)
    pipeline.folder.create()
    return App(settings, found, destinations, store, pipeline, stop)
