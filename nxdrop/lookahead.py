"""The sessions about to be exported, so that a destination can look for many at once.

The intake notes each file it finds ready; the pipeline forgets the file once its job has
ended. A destination runner whose log cannot vouch for its endpoint asks the destination
about the next sessions in one go (:meth:`~nxdrop.destinations.base.ExportDestination.
holds_records_of`) instead of looking for each record's session on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Container

from nxdrop.records import session_identifier_of


class Lookahead:
    """File names in the order they became ready; shared by the main thread and workers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._names: dict[str, None] = {}  # an ordered set

    def expect(self, name: str) -> None:
        """A file named ``name`` is ready and waits for a worker."""
        with self._lock:
            self._names[name] = None

    def done(self, name: str) -> None:
        """The job of the file named ``name`` has ended (or will never run)."""
        with self._lock:
            self._names.pop(name, None)

    def clear(self) -> None:
        """Nothing waits any more (the intake stopped)."""
        with self._lock:
            self._names.clear()

    def batch(self, first: str, limit: int, skip: Container[str]) -> list[str]:
        """``first``, then the sessions of the files expected, oldest first, none in
        ``skip`` and each once: at most ``limit`` in all."""
        found = {first: None}
        with self._lock:
            for name in self._names:
                if len(found) >= limit:
                    break
                session = session_identifier_of(name)
                if session not in skip:
                    found[session] = None
        return list(found)
