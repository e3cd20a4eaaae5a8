"""The ``nxdrop`` command: argument parsing and wiring only."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from nxdrop import __version__
from nxdrop.exceptions import ConfigError
from nxdrop.settings import Settings, Strategy, load_settings

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


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

    status = sub.add_parser("status", parents=[common], help="recent sessions, or one session")
    status.add_argument("session", nargs="?", metavar="SESSION")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--limit", type=int, default=20, metavar="N", help="how many sessions (default 20)"
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
    return parser


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
        settings = _settings(args)
        return _dispatch(args, settings)
    except ConfigError as exc:
        print(f"nxdrop: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace, settings: Settings) -> int:
    from nxdrop import checks, commands
    from nxdrop.journal import setup_logging

    if args.command == "destinations":
        return checks.list_destinations(settings)
    if args.command == "check":
        return checks.check(settings)
    if args.command == "status":
        return commands.status(settings, args.session, as_json=args.json, limit=args.limit)
    if args.command == "retry":
        return commands.retry(settings, None if args.all else args.files)
    setup_logging(settings, verbose=args.verbose)
    if args.command == "export":
        return commands.export(settings, args.files)
    return commands.run(settings, once=args.once)
