"""What the intake is told about a file: a path, and whether it looks complete.

Apart from :mod:`nxdrop.watcher` so that a process that does not watch (``run --once``,
``export``) never imports watchdog.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path


class Kind(Enum):
    """What an event says about a file."""

    READY = "ready"  # closed after writing, or renamed into the folder: take it now
    CHANGED = "changed"  # appeared or changed, and no close event will come: let it settle
    WRITING = "writing"  # a writer has it open and will close it: wait for the close


@dataclass(frozen=True)
class Sighting:
    """One candidate path named by an event."""

    path: Path
    kind: Kind


# Where sightings go; ``None`` sights nothing but wakes the daemon to look at the watcher
# now (the kernel dropped events, or a thread of the observer ended).
Sink = Callable[[Sighting | None], None]
