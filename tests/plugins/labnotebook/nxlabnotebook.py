"""A LabArchives destination written for NexusLIMS 2.x, run by nxdrop: the porting promise.

It uses NexusLIMS's export interface exactly as NexusLIMS's own LabArchives destination
(``nexusLIMS/exporters/destinations/labarchives.py``) does — ``context.activities`` (each
activity's ``files`` and ``previews``, and here its ``start``, ``mode`` and
``setup_params``), ``context.get_result("cdcs")`` and ``has_successful_export("cdcs")`` for
the link to the CDCS record, ``xml_file_path`` (read, and its ``name`` for the attachment),
``session_identifier``, ``instrument_pid``, ``user``, ``dt_from``, ``dt_to`` and
``reservation_event`` — with code of its own. Porting it took one change, its import line:
it imports nothing of nxdrop's but ``nxdrop.destinations`` and subclasses nothing, and
like any NexusLIMS destination it never raises: a failure is a failed ``ExportResult``.

Per session it makes a page ``NexusLIMS Records/<instrument>/<YYYY-MM-DD> — <session>`` in
the notebook ``NX_LABARCHIVES_NOTEBOOK_ID``, holding a summary entry (the session, and
"View in CDCS" when CDCS holds the record), one entry per acquisition activity (its start,
mode, setup and files), and the XML record attached. On ``PYTHONPATH`` with its
``.dist-info`` it is found through the entry point ``nxdrop.destinations: labarchives``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
import time
import xml.etree.ElementTree as ET
from html import escape
from pathlib import PurePosixPath
from typing import Any

import requests

from nxdrop.destinations import ExportContext, ExportResult

SETTINGS = (
    "NX_LABARCHIVES_URL",
    "NX_LABARCHIVES_ACCESS_KEY_ID",
    "NX_LABARCHIVES_ACCESS_PASSWORD",
    "NX_LABARCHIVES_USER_ID",
    "NX_LABARCHIVES_NOTEBOOK_ID",
)
TIMEOUT = 30  # seconds, every request
ROOT_FOLDER = "NexusLIMS Records"


class LabArchivesError(Exception):
    """The API said no."""


class Client:
    """The few LabArchives calls this destination needs, each signed as the API requires."""

    def __init__(self, base_url: str, akid: str, password: str, uid: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.akid, self.password, self.uid = akid, password, uid

    def _auth(self, method: str) -> dict[str, str]:
        expires = str(int(time.time() * 1000))
        mac = hmac.new(
            self.password.encode(), (self.akid + method + expires).encode(), hashlib.sha512
        )
        sig = base64.b64encode(mac.digest()).decode()
        return {"akid": self.akid, "expires": expires, "sig": sig, "uid": self.uid}

    def _call(self, verb: str, path: str, params: dict[str, str], **kwargs: Any) -> ET.Element:
        method = path.rsplit("/", 1)[-1]
        response = requests.request(
            verb,
            f"{self.base_url}/{path}",
            params={**self._auth(method), **params},
            timeout=TIMEOUT,
            **kwargs,
        )
        root = ET.fromstring(response.content)
        error = root if root.tag == "error" else root.find(".//error")
        if error is not None or response.status_code >= 400:
            code = error.findtext("error-code") if error is not None else ""
            text = error.findtext("error-description") if error is not None else response.text
            raise LabArchivesError(f"{path}: HTTP {response.status_code}, code {code}: {text}")
        return root

    def tree_level(self, nbid: str, parent: str) -> list[tuple[str, str]]:
        """``(tree_id, display_text)`` of the nodes under ``parent``."""
        root = self._call(
            "GET", "tree_tools/get_tree_level", {"nbid": nbid, "parent_tree_id": parent}
        )
        return [
            (node.findtext("tree-id") or "", node.findtext("display-text") or "")
            for node in root.iter("level-node")
        ]

    def insert_node(self, nbid: str, parent: str, text: str, *, folder: bool) -> str:
        root = self._call(
            "GET",
            "tree_tools/insert_node",
            {
                "nbid": nbid,
                "parent_tree_id": parent,
                "display_text": text,
                "is_folder": "true" if folder else "false",
            },
        )
        return _required(root, "tree-id")

    def add_entry(self, nbid: str, page: str, html: str) -> str:
        form = {"nbid": nbid, "pid": page, "entry_data": html, "part_type": "text entry"}
        return _required(self._call("POST", "entries/add_entry", {}, data=form), "eid")

    def add_attachment(self, nbid: str, page: str, filename: str, data: bytes) -> str:
        params = {"nbid": nbid, "pid": page, "filename": filename, "caption": "NexusLIMS record"}
        headers = {"Content-Type": "application/octet-stream"}
        root = self._call("POST", "entries/add_attachment", params, data=data, headers=headers)
        return _required(root, "eid")


def _required(root: ET.Element, tag: str) -> str:
    value = root.findtext(f".//{tag}")
    if not value:
        raise LabArchivesError(f"the answer has no <{tag}>")
    return value.strip()


class LabArchivesDestination:
    """Exports each record to a LabArchives notebook page (see the module)."""

    name = "labarchives"
    priority = 90  # after CDCS (100), so that its link exists

    def __init__(self) -> None:
        # One instance serves every worker: two records of one instrument must not both
        # find its folder missing and make two.
        self._folders = threading.Lock()

    @property
    def enabled(self) -> bool:
        return all(os.environ.get(name) for name in SETTINGS)

    def validate_config(self) -> tuple[bool, str | None]:
        missing = [name for name in SETTINGS if not os.environ.get(name)]
        return (False, f"{', '.join(missing)} not set") if missing else (True, None)

    def export(self, context: ExportContext) -> ExportResult:
        try:
            client = Client(
                os.environ["NX_LABARCHIVES_URL"],
                os.environ["NX_LABARCHIVES_ACCESS_KEY_ID"],
                os.environ["NX_LABARCHIVES_ACCESS_PASSWORD"],
                os.environ["NX_LABARCHIVES_USER_ID"],
            )
            nbid = os.environ["NX_LABARCHIVES_NOTEBOOK_ID"]
            page = self._page(client, nbid, context)
            entry_id = client.add_entry(nbid, page, self._summary(context))
            for number, activity in enumerate(context.activities):
                client.add_entry(nbid, page, self._activity(number, activity))
            path = context.xml_file_path
            client.add_attachment(nbid, page, path.name, path.read_bytes())
            site = os.environ["NX_LABARCHIVES_URL"].rstrip("/").removesuffix("/api")
            return ExportResult(
                success=True,
                destination_name=self.name,
                record_id=entry_id,
                record_url=f"{site}/#/{nbid}/{page}",
            )
        except Exception as exc:  # a NexusLIMS destination reports, it does not raise
            return ExportResult(
                success=False,
                destination_name=self.name,
                error_message=f"{type(exc).__name__}: {exc}",
            )

    def _page(self, client: Client, nbid: str, context: ExportContext) -> str:
        """A new page for the session, in its instrument's folder (made when missing)."""
        parent = "0"
        with self._folders:
            for folder in (ROOT_FOLDER, context.instrument_pid):
                found = [i for i, text in client.tree_level(nbid, parent) if text == folder]
                parent = (
                    found[0] if found else client.insert_node(nbid, parent, folder, folder=True)
                )
        title = f"{context.dt_from:%Y-%m-%d} \u2014 {context.session_identifier}"
        return client.insert_node(nbid, parent, title, folder=False)

    def _summary(self, context: ExportContext) -> str:
        rows = [
            ("Session ID", context.session_identifier),
            ("Instrument", context.instrument_pid),
            ("User", context.user),
            ("Start", context.dt_from.isoformat()),
            ("End", context.dt_to.isoformat()),
        ]
        lines = ["<h1>NexusLIMS Microscopy Session</h1>", "<h2>Session Details</h2>", "<ul>"]
        lines += [f"<li><strong>{k}</strong>: {escape(v)}</li>" for k, v in rows if v]
        lines.append("</ul>")
        event = context.reservation_event  # NexusLIMS's calendar event; None in nxdrop
        if event is not None and getattr(event, "url", None):
            lines.append(f'<p><a href="{escape(event.url)}">Reservation</a></p>')
        if context.has_successful_export("cdcs"):
            cdcs = context.get_result("cdcs")
            assert cdcs is not None and cdcs.record_url
            lines += [
                "<h2>Related Records</h2>",
                f'<ul><li><a href="{escape(cdcs.record_url)}">View in CDCS</a></li></ul>',
            ]
        return "\n".join(lines)

    def _activity(self, number: int, activity: Any) -> str:
        """One acquisition activity: its start, mode and setup, and each of its files once
        (a multi-signal file is in ``files`` once per signal), with its preview's name."""
        lines = [
            f"<h2>Acquisition Activity {number + 1}</h2>",
            "<ul>",
            f"<li><strong>Start</strong>: {activity.start.isoformat()}</li>",
            f"<li><strong>Mode</strong>: {escape(activity.mode or 'unknown')}</li>",
            f"<li><strong>Setup parameters</strong>: {len(activity.setup_params)}</li>",
            "</ul>",
            "<h3>Files</h3>",
            "<ol>",
        ]
        seen: set[str] = set()
        for file, preview in zip(activity.files, activity.previews, strict=True):
            if file in seen:
                continue
            seen.add(file)
            shown = f", preview {escape(PurePosixPath(preview).name)}" if preview else ""
            lines.append(f"<li><code>{escape(file)}</code>{shown}</li>")
        lines.append("</ol>")
        return "\n".join(lines)
