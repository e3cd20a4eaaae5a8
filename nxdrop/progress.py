"""A one-line progress bar on a terminal; silent everywhere else (the journal, pipes)."""

from __future__ import annotations

import sys
from typing import TextIO


class Progress:
    """``[#####.....] 12/500 exported 11, failed 1`` redrawn in place on a TTY."""

    def __init__(self, total: int, stream: TextIO | None = None, width: int = 30) -> None:
        self.total, self.width = total, width
        self.stream = stream or sys.stderr
        self.enabled = total > 1 and self.stream.isatty()
        self.done = self.ok = 0

    def advance(self, ok: bool) -> None:
        """Count one finished file and redraw."""
        self.done += 1
        self.ok += ok
        if not self.enabled:
            return
        filled = self.width * self.done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(
            f"\r[{bar}] {self.done}/{self.total} exported {self.ok}, "
            f"not exported {self.done - self.ok}"
        )
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()
