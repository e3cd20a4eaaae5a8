"""What the commands do (``cli`` only parses and calls these); each returns an exit code."""

from __future__ import annotations

import logging
import os
import signal
import sys
from datetime import datetime
from pathlib import Path

from nxdrop import status as status_view
from nxdrop.app import build_app
from nxdrop.exceptions import DatabaseUnavailable
from nxdrop.folders import DropFolder
from nxdrop.progress import Progress
from nxdrop.settings import Settings
from nxdrop.store import Store

EXIT_OK, EXIT_FAILED = 0, 1


def _unavailable(exc: DatabaseUnavailable) -> int:
    """A command that needs the database while it is down: say so, exit 1."""
    print(f"nxdrop: the database is unavailable: {exc}", file=sys.stderr)
    return EXIT_FAILED


def export(settings: Settings, files: list[Path]) -> int:
    """``nxdrop export FILE…``: 0 when every file was exported, else 1."""
    app = build_app(settings)
    try:
        app.connect()
    except DatabaseUnavailable as exc:
        app.close()
        return _unavailable(exc)
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


def status(
    settings: Settings,
    session: str | None,
    *,
    as_json: bool,
    limit: int,
    failed: bool = False,
    since: datetime | None = None,
    instrument: str | None = None,
) -> int:
    """``nxdrop status [SESSION]``: recent sessions, or one session's whole story."""
    store = Store(settings.database_url)
    try:
        if session is not None:
            found = status_view.story(store, DropFolder(settings.drop), session)
            if found is None:
                print(f"no session {session!r} in the log", file=sys.stderr)
                return EXIT_FAILED
            if as_json:
                print(status_view.story_json(found))
            else:
                status_view.print_story(found, sys.stdout)
            return EXIT_OK
        statuses = status_view.NOT_EXPORTED if failed else ()
        recent = store.recent_sessions(limit, statuses=statuses, since=since, instrument=instrument)
        rows = status_view.with_owners(recent, DropFolder(settings.drop))
    except DatabaseUnavailable as exc:
        return _unavailable(exc)
    if as_json:
        print(status_view.sessions_json(rows))
    else:
        status_view.print_sessions(rows, sys.stdout)
    return EXIT_OK


def status_page(settings: Settings, path: Path, *, days: int) -> int:
    """``nxdrop status --html FILE``: one self-contained page for people without a terminal."""
    from nxdrop.report import write_report

    store = Store(settings.database_url)
    try:
        write_report(store, path, days=days)
    except DatabaseUnavailable as exc:
        return _unavailable(exc)
    print(f"wrote {path}")
    return EXIT_OK


def backfill(
    settings: Settings,
    destination: str,
    *,
    since: datetime | None,
    sessions: list[str],
    dry_run: bool,
) -> int:
    """``nxdrop backfill DESTINATION``: 0 when every missing record was sent, else 1."""
    from nxdrop.backfill import Backfill
    from nxdrop.service import STOP_SIGNALS

    app = build_app(settings)
    try:
        app.connect()
        job = Backfill(app, destination)
        todo = job.candidates(since=since, sessions=sessions)
        if dry_run:
            for session, path in todo:
                print(f"would send {session} ({path.name})")
            print(f"backfill {destination}: {len(todo)} records would be sent (dry run)")
            return EXIT_OK
        progress = Progress(len(todo))
        previous = {sig: signal.signal(sig, lambda *_: app.stop.request()) for sig in STOP_SIGNALS}
        try:
            summary = job.run(todo, progress.advance)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    except DatabaseUnavailable as exc:
        return _unavailable(exc)
    finally:
        app.close()
    print(
        f"backfill {destination}: {summary.sent} of {summary.candidates} sent"
        + (f", {len(summary.failed)} failed" if summary.failed else "")
        + (f", {summary.left} left (stopped; run it again to go on)" if summary.left else "")
    )
    return EXIT_OK if summary.ok else EXIT_FAILED
