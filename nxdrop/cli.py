"""The ``nxdrop`` command: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

from nxdrop import __version__
from nxdrop.exceptions import ConfigError
from nxdrop.settings import Settings, Strategy, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
SHELLS = ("bash", "zsh")  # what `nxdrop completion` writes a script for


def _common_options(*, default: object) -> argparse.ArgumentParser:
    """Options valid before or after the command (`nxdrop --env-file F run`, `run --env-file F`)."""
    common = argparse.ArgumentParser(add_help=False, argument_default=default)
    common.add_argument(
        "--env-file",
        type=Path,
        metavar="PATH",
        help="read NX_* settings from this file (default: $NX_ENV_FILE)",
    )
    common.add_argument("--drop-path", type=Path, metavar="DIR", help="the drop folder")
    common.add_argument(
        "--db-url", metavar="URL", help="the database (sqlite:///…, postgresql://…)"
    )
    common.add_argument(
        "--strategy",
        choices=[s.value for s in Strategy],
        help="export strategy (NX_EXPORT_STRATEGY)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return common


def _parser() -> argparse.ArgumentParser:
    # After the command, an option left out must not erase the same option given before it.
    common = _common_options(default=argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="nxdrop",
        description="Publish NexusLIMS records dropped into a folder.",
        parents=[_common_options(default=None)],
    )
    parser.add_argument("--version", action="version", version=f"nxdrop {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="the daemon: watch the drop folder")
    run.add_argument(
        "--once", action="store_true", help="process what is in the drop folder now, then exit"
    )
    run.add_argument("--workers", type=int, metavar="N", help="records exported at once")

    export = sub.add_parser("export", parents=[common], help="export the given files now")
    export.add_argument("files", nargs="+", type=Path, metavar="FILE")

    sub.add_parser(
        "check",
        parents=[common],
        help="validate the configuration and reach every enabled destination",
    )

    status = sub.add_parser(
        "status", parents=[common], help="recent sessions, or one session's whole story"
    )
    status.add_argument("session", nargs="?", metavar="SESSION")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--failed", action="store_true", help="only sessions not exported (failed or rejected)"
    )
    status.add_argument(
        "--since", type=_date, metavar="DATE", help="only sessions logged since DATE (ISO 8601)"
    )
    status.add_argument("--instrument", metavar="PID", help="only this instrument's sessions")
    status.add_argument(
        "--limit", type=int, default=20, metavar="N", help="how many sessions (default 20)"
    )
    status.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="write a self-contained page of the last days' records and failures to FILE",
    )
    status.add_argument(
        "--days", type=int, default=7, metavar="N", help="days the --html page covers (default 7)"
    )

    retry = sub.add_parser(
        "retry", parents=[common], help="move failed files back into the drop folder"
    )
    retry.add_argument(
        "files", nargs="*", metavar="FILE|SESSION", help="a file in failed/, or a session"
    )
    retry.add_argument("--all", action="store_true", help="every file in failed/")

    sub.add_parser(
        "destinations",
        parents=[common],
        help="the destinations found, their priority, enabled or why not",
    )

    backfill = sub.add_parser(
        "backfill",
        parents=[common],
        help="send the records in uploaded/ that a destination does not hold yet",
    )
    backfill.add_argument("destination", metavar="DESTINATION")
    backfill.add_argument(
        "--since", type=_date, metavar="DATE", help="only sessions exported since DATE"
    )
    backfill.add_argument(
        "--session", action="append", default=[], metavar="S", help="only this session (repeat)"
    )
    backfill.add_argument(
        "--dry-run", action="store_true", help="say what would be sent; change nothing"
    )

    completion = sub.add_parser(
        "completion",
        help="print the shell completion script for bash or zsh",
    )
    completion.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash or zsh")
    return parser


def completion_script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of ``parser`` for ``shell``, generated by shtab from the parser
    itself, so that it never lags behind a command or an option."""
    import shtab  # here only: the other commands start without it

    # Every option and argument that takes a path completes file names (folders for DIR).
    for action in _actions(parser):
        if action.type is Path:
            kind = shtab.DIRECTORY if action.metavar == "DIR" else shtab.FILE
            setattr(action, "complete", kind)  # noqa: B010 - shtab's documented attribute
    return str(shtab.complete(parser, shell=shell))


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """Every action of ``parser`` and of its subcommands' parsers."""
    found = []
    for action in parser._actions:
        found.append(action)
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                found += _actions(subparser)
    return found


def _date(value: str) -> datetime:
    """An ISO 8601 date or time; without a zone, the local one."""
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date: {value!r} (use 2024-01-15)") from None
    return when if when.tzinfo is not None else when.astimezone()


def _settings(args: argparse.Namespace) -> Settings:
    return load_settings(
        args.env_file,
        drop_path=args.drop_path,
        db_url=args.db_url,
        export_strategy=args.strategy,
        workers=getattr(args, "workers", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; the exit code of the contract."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "retry" and bool(args.files) == bool(args.all):
        parser.error("retry: name FILEs or SESSIONs, or give --all (not both)")
    try:
        if args.command == "completion":  # needs no settings: works with a broken env file
            sys.stdout.write(completion_script(parser, args.shell))
            return EXIT_OK
        settings = _settings(args)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"nxdrop: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `nxdrop status | head -1`: the reader has what it wanted. Python would complain
        # again flushing stdout at exit: point it at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from nxdrop import checks, commands
    from nxdrop.journal import setup_logging

    if args.command == "destinations":
        return checks.list_destinations(settings)
    if args.command == "check":
        return checks.check(settings)
    if args.command == "status":
        if args.html is not None:
            return commands.status_page(settings, args.html, days=args.days)
        return commands.status(
            settings,
            args.session,
            as_json=args.json,
            limit=args.limit,
            failed=args.failed,
            since=args.since,
            instrument=args.instrument,
        )
    if args.command == "retry":
        return commands.retry(settings, None if args.all else args.files)
    setup_logging(settings, verbose=args.verbose)
    if args.command == "export":
        return commands.export(settings, args.files)
    if args.command == "backfill":
        return commands.backfill(
            settings,
            args.destination,
            since=args.since,
            sessions=args.session,
            dry_run=args.dry_run,
        )
    return commands.run(settings, once=args.once)
