"""``nxdrop status``: what became of the records, and why, in words an operator can act on.

The list shows recent sessions with their outcome and, for those not exported, the first
line of why. One session's story shows everything: its status (interrupted work named as
such), where its files are now, the reason a record was rejected, and every attempt at
every destination with its error in full, wrapped to the terminal.
"""

from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from nxdrop.folders import DropFolder
from nxdrop.store import AttemptState, RecordStatus, SessionRow, Store, UploadRow

NOT_EXPORTED = (RecordStatus.BUILT_NOT_EXPORTED.value, RecordStatus.ERROR.value)
INTERRUPTED = "INTERRUPTED"  # shown for EXPORTING when nobody is exporting it any more
WHY_WIDTH = 60  # characters of the reason in the list; the story has all of it


def shown_status(row: SessionRow, owner_alive: bool | None = None) -> str:
    """The status as an operator should read it: work that nobody (alive) holds was
    interrupted. ``owner_alive`` is ``None`` when it cannot be told (another host)."""
    if row.record_status == RecordStatus.EXPORTING and (row.owner is None or owner_alive is False):
        return INTERRUPTED
    return row.record_status


def with_owners(rows: list[SessionRow], folder: DropFolder) -> list[tuple[SessionRow, str]]:
    """Each row with its status as shown (a dead owner's work is interrupted)."""
    return [
        (r, shown_status(r, folder.slot_alive(r.owner) if r.owner is not None else None))
        for r in rows
    ]


@dataclass(frozen=True)
class Story:
    """One session: its row, its files now, and every attempt."""

    session: SessionRow
    status: str  # as shown
    places: list[tuple[str, Path]]
    attempts: list[UploadRow]

    def as_json(self) -> dict[str, Any]:
        return {
            "session": {**asdict(self.session), "status": self.status},
            "files": [{"where": place, "path": str(path)} for place, path in self.places],
            "attempts": [asdict(a) for a in self.attempts],
        }


def story(store: Store, folder: DropFolder, session: str) -> Story | None:
    """Everything about ``session``, or ``None`` if the log has never heard of it."""
    row = store.session(session)
    if row is None:
        return None
    [(_, status)] = with_owners([row], folder)
    return Story(row, status, folder.places(session), store.uploads(session))


def print_story(found: Story, out: TextIO) -> None:
    """The story, for a terminal."""
    row, status, width = found.session, found.status, _width(out)
    print(f"{row.session_identifier}: {status} ({_when(row.timestamp)})", file=out)
    if status == INTERRUPTED:
        print("  nxdrop stopped while exporting it; it runs again when nxdrop starts", file=out)
    elif row.owner is not None and row.owner_since is not None:
        print(f"  being exported by {row.owner} since {_when(row.owner_since)}", file=out)
    print(f"  instrument {row.instrument or '-'}, user {row.user or '-'}", file=out)
    if row.error_message:
        label = "rejected" if row.record_status == RecordStatus.ERROR else "why"
        _wrapped(f"{label}: {row.error_message}", width, out, indent="  ")
    print("files:", file=out)
    for place, path in found.places or [("nowhere", Path("(not in the drop folder any more)"))]:
        print(f"  {place:<9} {path}", file=out)
    print("attempts:" if found.attempts else "attempts: none (no destination was called)", file=out)
    for attempt in found.attempts:
        print(f"  {_attempt_line(attempt)}", file=out)
        if attempt.record_url and attempt.success:
            print(f"      {attempt.record_url}", file=out)
        if attempt.error_message:
            _wrapped(attempt.error_message, width, out, indent="      ")


def print_sessions(rows: list[tuple[SessionRow, str]], out: TextIO) -> None:
    """The list of sessions, for a terminal: a reason cut short, and where the rest is."""
    if not rows:
        print("(nothing logged yet)", file=out)
        return
    header = ("SESSION IDENTIFIER", "STATUS", "INSTRUMENT", "USER", "TIMESTAMP", "WHY")
    table = [
        (
            r.session_identifier,
            status,
            r.instrument or "-",
            r.user or "-",
            _when(r.timestamp),
            _short(r.error_message) if r.record_status != RecordStatus.COMPLETED else "",
        )
        for r, status in rows
    ]
    widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
    for line in (header, *table):
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip(), file=out)
    if any(r.record_status in NOT_EXPORTED for r, _ in rows):
        print("\nnxdrop status SESSION tells the whole story; --json gives everything.", file=out)


def sessions_json(rows: list[tuple[SessionRow, str]]) -> str:
    """The list of sessions, as JSON."""
    return _dumps([{**asdict(r), "status": status} for r, status in rows])


def story_json(found: Story) -> str:
    """One session's story, as JSON."""
    return _dumps(found.as_json())


def _attempt_line(attempt: UploadRow) -> str:
    state = attempt.state
    if state == AttemptState.IN_FLIGHT and attempt.attempts > 1:
        state = f"retrying (call {attempt.attempts})"
    elif state == AttemptState.IN_FLIGHT:
        state = "in flight"
    calls = f"{attempt.attempts} call{'s' if attempt.attempts != 1 else ''}"
    took = f", {attempt.duration_seconds:.1f} s" if attempt.duration_seconds is not None else ""
    http = f", HTTP {attempt.status_code}" if attempt.status_code else ""
    return (
        f"{_when(attempt.timestamp)}  {attempt.destination_name:<10} {state} ({calls}{took}{http})"
    )


def _wrapped(text: str, width: int, out: TextIO, *, indent: str) -> None:
    for paragraph in text.splitlines() or [""]:
        lines = textwrap.wrap(
            paragraph,
            width=max(40, width),
            initial_indent=indent,
            subsequent_indent=indent + "  ",
            break_long_words=False,  # a URL stays whole, to be copied
            break_on_hyphens=False,
        )
        for line in lines or [indent]:
            print(line, file=out)


def _short(text: str | None) -> str:
    if not text:
        return "-"
    line = " ".join(text.split())
    return line if len(line) <= WHY_WIDTH else line[: WHY_WIDTH - 1] + "…"


def _when(value: datetime) -> str:
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _width(out: TextIO) -> int:
    isatty = getattr(out, "isatty", None)
    return shutil.get_terminal_size((100, 24)).columns if isatty and isatty() else 100


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default, indent=2)


def _json_default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)
