"""``nxdrop backfill DESTINATION``: a destination added later gets the records it missed.

A facility that ran CDCS alone for a year adds eLabFTW: every record in ``uploaded/`` that
eLabFTW does not hold yet (by the log, at its endpoint) is sent to it, the newest file of
each session, with what the other destinations hold of that session as their earlier
results, so the experiment links to its CDCS record. Each session is sent under its lock,
through the destination's usual look-before-create, and logged like any attempt: a second
run (after an interruption) sends only what is still missing, and never makes a second
record.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nxdrop.app import App
from nxdrop.exceptions import ConfigError, DatabaseUnavailable, RecordError
from nxdrop.folders import is_record_name
from nxdrop.records import escape_name, session_identifier_of
from nxdrop.runner import Abandoned

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a backfill did, for its last line and its exit code."""

    candidates: int = 0
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    left: int = 0  # not tried: nxdrop was stopped

    @property
    def ok(self) -> bool:
        return not self.failed and not self.left


class Backfill:
    """Sends the records of ``uploaded/`` that ``destination`` lacks."""

    def __init__(self, app: App, destination: str) -> None:
        enabled = [r.name for r in app.pipeline.runners]
        if destination not in enabled:
            raise ConfigError(
                f"backfill: {destination!r} is not an enabled destination "
                f"(enabled: {', '.join(enabled) or 'none'}; `nxdrop destinations` says why)"
            )
        self.app = app
        self.destination = destination
        self.runner = next(r for r in app.pipeline.runners if r.name == destination)

    def candidates(
        self, *, since: datetime | None = None, sessions: Collection[str] = ()
    ) -> list[tuple[str, Path]]:
        """(session, its newest file in ``uploaded/``) for every session the destination
        does not hold, oldest first; only those ``sessions``, exported ``since``, if given."""
        wanted = set(sessions)
        newest: dict[str, tuple[float, Path]] = {}
        for path, mtime in self._uploaded():
            session = escape_name(session_identifier_of(path.name))
            if wanted and session not in wanted:
                continue
            if since is not None and mtime < since.timestamp():
                continue
            if session not in newest or mtime > newest[session][0]:
                newest[session] = (mtime, path)
        key = (self.destination, self.runner.destination.endpoint)
        missing = []
        for session, (mtime, path) in newest.items():
            held = self.app.store.standings(session).get(key)
            if held is None or held.latest_success is None:
                missing.append((mtime, session, path))
        return [(session, path) for _, session, path in sorted(missing)]

    def run(
        self, todo: list[tuple[str, Path]], done: Callable[[bool], None] = lambda ok: None
    ) -> Summary:
        """Send each of ``todo`` (``done`` is told of each); stop between two when nxdrop is
        asked to stop, and at a database outage."""
        summary = Summary(candidates=len(todo))
        for number, (session, path) in enumerate(todo):
            if self.app.stop.requested.is_set():
                summary.left = len(todo) - number
                break
            try:
                ok = self._send(session, path)
            except (Abandoned, DatabaseUnavailable) as exc:
                log.warning("backfill stopped: %s", exc)
                summary.left = len(todo) - number
                break
            summary.sent += ok
            if not ok:
                summary.failed.append(session)
            done(ok)
        return summary

    def _send(self, session: str, path: Path) -> bool:
        fields = {"SESSION_ID": session, "DESTINATION": self.destination}
        try:
            result = self.app.pipeline.resend(path, self.destination)
        except RecordError as exc:
            log.error("%s: cannot be sent: %s", path.name, exc, extra=fields)
            return False
        except FileNotFoundError:
            log.warning("%s: gone from uploaded/ meanwhile", path.name, extra=fields)
            return False
        return result.success

    def _uploaded(self) -> Iterator[tuple[Path, float]]:
        folder = self.app.work.drop.uploaded
        with os.scandir(folder) as it:
            for entry in it:
                if is_record_name(entry.name) and entry.is_file(follow_symlinks=False):
                    yield folder / entry.name, entry.stat(follow_symlinks=False).st_mtime
