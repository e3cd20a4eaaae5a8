"""Assembling nxdrop from its settings: destinations, store, working folder, pipeline."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from nxdrop.destinations.base import ExportDestination
from nxdrop.destinations.registry import Found, discover, enabled_destinations
from nxdrop.folders import DropFolder, WorkFolder
from nxdrop.metrics import Metrics, metrics_for
from nxdrop.pipeline import Pipeline
from nxdrop.runner import Stop
from nxdrop.settings import Settings
from nxdrop.store import Store

log = logging.getLogger(__name__)


@dataclass
class App:
    """Everything the exporting commands need, built once."""

    settings: Settings
    found: list[Found]
    destinations: list[ExportDestination]
    store: Store
    work: WorkFolder
    pipeline: Pipeline
    stop: Stop
    metrics: Metrics
    recovered: list[str] = field(default_factory=list)  # dead slots whose log is not yet fixed

    def connect(self) -> None:
        """Open the database, and write down what dead processes of this host left in it:
        their attempts in flight become ``interrupted``, their session locks are released.

        Raises ``ConfigError`` (the operator must act) or ``DatabaseUnavailable`` (wait).
        """
        self.store.open()
        if self.recovered:
            interrupted = self.store.recover(self.recovered)
            self.recovered = []
            if interrupted:
                log.warning(
                    "%d destination call%s were in flight when nxdrop last stopped: marked "
                    "interrupted; the next attempt looks for what they made before creating "
                    "anything",
                    interrupted,
                    "" if interrupted == 1 else "s",
                )
        self.store.heal()

    def put_back_held(self) -> int:
        """Return whatever the working folder still holds to the drop folder; how many."""
        back = 0
        for path in self.work.held():
            try:
                self.work.put_back(path, path.name)
            except FileNotFoundError:
                continue  # its worker moved it on just now
            back += 1
        return back

    def close(self) -> None:
        """Release the working folder (the next process of this host may take it) and the
        pipeline's destination threads."""
        self.pipeline.close()
        self.work.release()


def build_app(settings: Settings, destinations: list[ExportDestination] | None = None) -> App:
    """Load destinations (at least one must be enabled), take a working folder and put
    back what dead processes of this host left in theirs. The database is opened later,
    by :meth:`App.connect`: it may be down now and come back.

    ``destinations`` replaces the discovered ones (for embedding nxdrop, and for tests).
    Raises :class:`~nxdrop.exceptions.ConfigError` for anything the operator must fix.
    """
    found = discover(settings) if destinations is None else []
    if destinations is None:
        destinations = enabled_destinations(found)
    store = Store(settings.database_url)
    work, recovery = WorkFolder.acquire(DropFolder(settings.drop))
    stop, metrics = Stop(), metrics_for(settings)
    pipeline = Pipeline(settings, destinations, store, work, stop=stop, metrics=metrics)
    return App(
        settings, found, destinations, store, work, pipeline, stop, metrics, recovery.workers
    )
