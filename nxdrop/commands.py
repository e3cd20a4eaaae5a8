"""What the commands do (``cli`` only parses and calls these); each returns an exit code."""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from nxdrop.app import build_app
from nxdrop.exceptions import DatabaseUnavailable
from nxdrop.folders import DropFolder
from nxdrop.progress import Progress
from nxdrop.settings import Settings
from nxdrop.store import Store

EXIT_OK, EXIT_FAILED = 0, 1


def export(settings: Settings, files: list[Path]) -> int:
    """``nxdrop export FILE…``: 0 when every file was exported, else 1."""
    app = build_app(settings)
    try:
        app.connect()
    except DatabaseUnavailable as exc:
        print(f"nxdrop: the database is unavailable: {exc}", file=sys.stderr)
        app.close()
        return EXIT_FAILED
    try:
        progress = Progress(len(files))
        failed = 0
        for path in files:
            report = app.pipeline.process(path)
            progress.advance(report.ok)
            if not report.ok:
                failed += 1
                print(f"{path}: {report.outcome.value}: {report.error}", file=sys.stderr)
        return EXIT_FAILED if failed else EXIT_OK
    finally:
        app.close()


def run(settings: Settings, *, once: bool) -> int:
    """``nxdrop run [--once]``: the daemon, or one pass over the drop folder."""
    from nxdrop.daemon import Daemon

    app = build_app(settings)
    daemon = Daemon(app, watch=not once)
    try:
        app.connect()  # a configuration error stops here, with exit code 2
    except DatabaseUnavailable as exc:
        daemon.database_down(str(exc))  # not a configuration error: wait for it
    if once:
        summary = daemon.run_once()
        if summary.not_finished:
            print(
                f"nxdrop: {summary.not_finished} of {summary.found} files not exported",
                file=sys.stderr,
            )
        code = EXIT_OK if summary.ok else EXIT_FAILED
    else:
        code = daemon.run()
    app.close()
    if daemon.stuck:
        # A destination call that never returns holds a worker thread, and the interpreter
        # would wait for it at exit: leave now (its file is back in the drop folder).
        logging.shutdown()
        os._exit(code)
    return code


def retry(settings: Settings, names: list[str] | None) -> int:
    """``nxdrop retry``: move failed files (by name or session, or all) back to the drop folder."""
    folder = DropFolder(settings.drop)
    try:
        moved = folder.retry(names)
    except FileNotFoundError as exc:
        print(f"nxdrop: {exc}", file=sys.stderr)
        return EXIT_FAILED
    for path in moved:
        print(f"requeued {path}")
    if not moved:
        print(f"nothing to retry in {folder.failed}")
    return EXIT_OK


def status(settings: Settings, session: str | None, *, as_json: bool, limit: int) -> int:
    """``nxdrop status [SESSION]``: recent sessions, or one session's upload log."""
    store = Store(settings.database_url)
    try:
        return _status(store, session, as_json=as_json, limit=limit)
    except DatabaseUnavailable as exc:
        print(f"nxdrop: the database is unavailable: {exc}", file=sys.stderr)
        return EXIT_FAILED


def _status(store: Store, session: str | None, *, as_json: bool, limit: int) -> int:
    columns: tuple[str, ...]
    if session is None:
        rows: list[Any] = store.recent_sessions(limit)
        columns = ("session_identifier", "record_status", "instrument", "user", "timestamp")
    else:
        rows = store.uploads(session)
        columns = (
            "destination_name",
            "state",
            "timestamp",
            "attempts",
            "record_url",
            "error_message",
        )
        if not rows and store.session(session) is None:
            print(f"no session {session!r} in the log", file=sys.stderr)
            return EXIT_OK
    if as_json:
        print(json.dumps([asdict(r) for r in rows], default=_json_default, indent=2))
    else:
        print(
            _table(
                columns,
                [[_cell(getattr(r, c), whole=c == "record_url") for c in columns] for r in rows],
            )
        )
    return EXIT_OK


def _json_default(value: object) -> str:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def _cell(value: object, *, whole: bool = False) -> str:
    """A table cell: times local, long text cut (a URL never: it is there to be copied)."""
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")
    text = str(value).replace("\n", " ")
    return text if whole or len(text) <= 60 else text[:59] + "…"


def _table(columns: tuple[str, ...], rows: list[list[str]]) -> str:
    if not rows:
        return "(nothing logged yet)"
    header = [c.upper().replace("_", " ") for c in columns]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)
