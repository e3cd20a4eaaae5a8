"""A one-line progress bar on a terminal; silent everywhere else (the journal, pipes)."""

from __future__ import annotations

import sys
from typing import TextIO

from nxdrop.journal import TerminalHandler


class Progress:
    """``[#####.....] 12/500 exported 11, not exported 1`` redrawn in place on a TTY.

    Where log lines go to the same terminal, the bar is drawn through their handler, which
    clears it before a line and draws it again below (:class:`~nxdrop.journal.TerminalHandler`).
    """

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
        line = (
            f"[{bar}] {self.done}/{self.total} exported {self.ok}, "
            f"not exported {self.done - self.ok}"
        )
        final = self.done == self.total
        handler = TerminalHandler.of(self.stream)
        if handler is not None:
            handler.show(line, final=final)
            return
        self.stream.write(TerminalHandler.CLEAR + line + ("\n" if final else ""))
        self.stream.flush()
