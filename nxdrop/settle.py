"""Telling when a file with no close event is complete: its size and mtime stood still.

The observer reports a close after writing where it can (inotify); where it cannot (polling,
a hard link, a file found by a rescan) the :class:`SettleTracker` waits until the file's
size, mtime and inode have not changed for the settle time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nxdrop.records import Signature, signature_of


@dataclass
class _Entry:
    signature: Signature | None
    since: float
    writing: bool


class SettleTracker:
    """Files waiting to be complete: due once size and mtime stood still long enough.

    "Long enough" is ``settle_seconds``; it is ``patience`` for a file known to be open
    for writing (its close event should come; patience covers a close the kernel dropped)
    and for an empty file (far more often a writer that has not started than a record).
    Not thread-safe: the daemon's main thread owns it.
    """

    def __init__(
        self,
        settle_seconds: float,
        patience: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settle_seconds = settle_seconds
        self.patience = max(patience, settle_seconds)
        self.clock = clock
        self._entries: dict[Path, _Entry] = {}

    def note(self, path: Path, *, writing: bool = False, age: float = 0.0) -> None:
        """``path`` changed ``age`` seconds ago (a scan knows its mtime): its wait restarts."""
        entry = self._entries.get(path)
        now = self.clock()
        if entry is None:
            self._entries[path] = _Entry(signature_of(path), now - max(age, 0.0), writing)
        else:
            entry.since = now
            entry.writing = entry.writing or writing

    def events_lost(self) -> None:
        """Close events may have been lost (observer restarted, queue overflow): from now on
        every tracked file is due once it has settled, not when its close event comes."""
        for entry in self._entries.values():
            entry.writing = False

    def forget(self, path: Path) -> None:
        """Stop tracking ``path`` (it became ready some other way)."""
        self._entries.pop(path, None)

    def clear(self) -> None:
        """Stop tracking everything."""
        self._entries.clear()

    def due(self) -> list[Path]:
        """The files that have settled, no longer tracked; vanished files are dropped."""
        now = self.clock()
        ready = []
        for path, entry in list(self._entries.items()):
            signature = signature_of(path)
            if signature is None:
                del self._entries[path]
            elif signature != entry.signature:
                entry.signature, entry.since = signature, now
            elif now - entry.since >= (
                self.patience if entry.writing or signature[0] == 0 else self.settle_seconds
            ):
                del self._entries[path]
                ready.append(path)
        return ready

    def __contains__(self, path: object) -> bool:
        return path in self._entries

    def __len__(self) -> int:
        return len(self._entries)
