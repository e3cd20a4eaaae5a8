"""The minimal reference loop of issue 11: the least that exporting a record can cost.

One ``requests.Session``; per record, CDCS ``POST rest/data/`` then ``PATCH
rest/data/<id>/assign/<workspace>``, eLabFTW ``POST api/v2/experiments`` then ``POST
api/v2/experiments/<id>/uploads`` (multipart, the XML attached), then one ``os.rename`` into
``uploaded/`` (``failed/`` after any error, with the error on stderr). Template and workspace
ids are given, as a configured client would have them.

``once`` exports what is in the drop folder, in name order, and exits (1 if any failed).
``watch`` does that, then notices files (watchdog's inotify observer: a file closed after
writing, or renamed into the folder), says ``READY=1`` to ``$NOTIFY_SOCKET`` once it
watches, and runs until SIGTERM. Hidden and partial names (``.x``, ``*.part``) are left
alone, as nxdrop leaves them.

Standalone on purpose (``python bench/reference.py …``): the bench runs it as a child
process, so its CPU and memory are its own.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import requests

TIMEOUT = 30


class Exporter:
    """The calls of one record, on one session; :meth:`export` moves the file after."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.drop: Path = args.drop
        self.cdcs: str = args.cdcs
        self.cdcs_auth = {"Authorization": f"Token {args.cdcs_token}"}
        self.template: str = args.template
        self.workspace: str = args.workspace
        self.elab: str | None = args.elab
        self.elab_auth = {"Authorization": args.elab_key or ""}
        self.http = requests.Session()
        self.failures = 0
        for folder in ("uploaded", "failed"):
            (self.drop / folder).mkdir(exist_ok=True)

    def export(self, path: Path) -> None:
        try:
            content = path.read_bytes()
        except FileNotFoundError:
            return  # two events named one file: done already
        try:
            self._send(path.stem, path.name, content)
            folder = "uploaded"
        except (requests.RequestException, KeyError, ValueError) as exc:
            print(f"{path.name}: {exc}", file=sys.stderr)
            self.failures += 1
            folder = "failed"
        os.rename(path, self.drop / folder / path.name)

    def _send(self, session: str, name: str, content: bytes) -> None:
        created = self._call(
            "POST",
            f"{self.cdcs}rest/data/",
            self.cdcs_auth,
            json={"template": self.template, "title": session, "xml_content": content.decode()},
        ).json()
        path = f"rest/data/{created['id']}/assign/{self.workspace}"
        self._call("PATCH", self.cdcs + path, self.cdcs_auth)
        if self.elab is None:
            return
        link = f"{self.cdcs}data?id={created['id']}"
        experiment = {
            "title": f"NexusLIMS Experiment - {session}",
            "body": f'<h1>NexusLIMS Session</h1><p><a href="{link}">View in CDCS</a></p>',
            "metadata": {"extra_fields": {"Session ID": {"type": "text", "value": session}}},
        }
        reply = self._call(
            "POST", f"{self.elab}api/v2/experiments", self.elab_auth, json=experiment
        )
        number = reply.headers["Location"].rstrip("/").rsplit("/", 1)[1]
        self._call(
            "POST",
            f"{self.elab}api/v2/experiments/{number}/uploads",
            self.elab_auth,
            files={"file": (name, content, "application/xml")},
            data={"comment": "NexusLIMS XML record"},
        )

    def _call(self, method: str, url: str, headers: dict[str, str], **kw: Any) -> requests.Response:
        reply = self.http.request(method, url, headers=headers, timeout=TIMEOUT, **kw)
        reply.raise_for_status()
        return reply


def wanted(path: Path, drop: Path) -> bool:
    """A record: ``*.xml`` directly in the drop folder, not hidden."""
    return path.parent == drop and path.suffix == ".xml" and not path.name.startswith(".")


def export_folder(exporter: Exporter) -> None:
    for name in sorted(os.listdir(exporter.drop)):
        path = exporter.drop / name
        if wanted(path, exporter.drop) and path.is_file():
            exporter.export(path)


def watch(exporter: Exporter) -> None:
    from watchdog.events import (
        FileClosedEvent,
        FileMovedEvent,
        FileSystemEvent,
        FileSystemEventHandler,
    )
    from watchdog.observers import Observer

    ready: queue.SimpleQueue[Path | None] = queue.SimpleQueue()

    class Handler(FileSystemEventHandler):
        def on_closed(self, event: FileSystemEvent) -> None:
            ready.put(Path(os.fsdecode(event.src_path)))

        def on_moved(self, event: FileSystemEvent) -> None:
            ready.put(Path(os.fsdecode(event.dest_path)))

    observer = Observer()
    # Recursive: a move into uploaded/ is then a pair of events; an unpaired IN_MOVED_FROM
    # would hold every later event for 0.5 s in watchdog's buffer.
    events = [FileClosedEvent, FileMovedEvent]
    observer.schedule(Handler(), str(exporter.drop), recursive=True, event_filter=events)
    observer.start()
    signal.signal(signal.SIGTERM, lambda *_: ready.put(None))
    export_folder(exporter)
    notify("READY=1")
    while (path := ready.get()) is not None:
        if wanted(path, exporter.drop):
            exporter.export(path)
    observer.stop()


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("once", "watch"))
    parser.add_argument("--drop", type=Path, required=True)
    parser.add_argument("--cdcs", required=True, help="base URL, with its final slash")
    parser.add_argument("--cdcs-token", required=True)
    parser.add_argument("--template", required=True, help="template id")
    parser.add_argument("--workspace", required=True, help="public workspace id")
    parser.add_argument("--elab", help="eLabFTW site root, with its final slash")
    parser.add_argument("--elab-key")
    args = parser.parse_args(argv)
    args.drop = args.drop.absolute()
    exporter = Exporter(args)
    if args.mode == "watch":
        watch(exporter)
    else:
        export_folder(exporter)
    return 1 if exporter.failures else 0


if __name__ == "__main__":
    sys.exit(main())
