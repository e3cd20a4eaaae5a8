"""Lean, stateful in-process fakes of CDCS and eLabFTW for the benchmarks.

The test suite's fakes (``tests/fixtures``) copy every trap of the real servers, but they
search by scanning every record (a 10,000-record backlog would cost them quadratic time)
and keep every request body. These keep the same state with indexes: CDCS records by
title, eLabFTW experiments by extra-field value. They answer what nxdrop and the reference
loop ask, in the real servers' shapes as the tests' fakes give them, with two
simplifications: CDCS does not validate the XML (nxdrop checks the template before
sending), and eLabFTW's extended search matches a field value exactly instead of with
``LIKE '%value%'`` (a subset of the real hits; nxdrop compares every hit exactly anyway).

All fakes run on one asyncio loop in a thread of the bench process: a request costs the
bench about 0.1 ms of CPU, never counted in the measured child's. ``latency`` delays every
answer by that many seconds, concurrent requests overlapping as on a real server.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlencode, urlsplit

T = TypeVar("T")
_REASONS = {200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request", 401: "Unauthorized"}
_REASONS |= {403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 500: "Error"}


@dataclass
class Request:
    """One request: ``path`` without its leading slash and query, header names lower-case."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None

    def param(self, name: str, default: str | None = None) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else default


@dataclass
class Reply:
    """An answer: ``payload`` is sent as JSON (``None``: an empty body)."""

    status: int
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class Api(Protocol):
    """A fake server's logic: the answer to a request."""

    name: str
    url: str

    def handle(self, request: Request) -> Reply: ...


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- CDCS ------------------------------------------------------------------------------------

_CDCS_ROUTES = [
    ("templates", re.compile(r"rest/template-version-manager/global/")),
    ("template", re.compile(r"rest/template/(\d+)/")),
    ("workspaces", re.compile(r"rest/workspace/read_access.*")),
    ("assign", re.compile(r"rest/data/(\d+)/assign/(\d+)")),
    ("data", re.compile(r"rest/data/(\d+)/")),
    ("data_list", re.compile(r"rest/data/")),
]


class FakeCDCS:
    """CDCS (core-main-app 2.23): one template, the public workspace, one user's records."""

    name = "cdcs"
    token = "bench0c2a8ee67f15ddf365b97b2d934a864521"
    template_id = "1"
    template_title = "Nexus Experiment"
    workspace_id = 1
    user_id = "2"

    def __init__(self, xsd: str) -> None:
        self.url = ""
        self.xsd = xsd
        self.data: dict[int, dict[str, Any]] = {}
        self.by_title: dict[str, list[int]] = {}
        self.next_id = 1

    def titles(self) -> Counter[str]:
        """How many records carry each title: more than one is a duplicate."""
        return Counter(r["title"] for r in self.data.values())

    def handle(self, request: Request) -> Reply:
        found = next(
            ((r, m) for r, p in _CDCS_ROUTES if (m := p.fullmatch(request.path)) is not None),
            None,
        )
        if found is None:
            return Reply(404, {"message": "Not Found"})
        route, match = found
        if request.headers.get("authorization") != f"Token {self.token}":
            return Reply(403, {"detail": "Invalid token."})
        try:
            return self._route(route, match.groups(), request)
        except (ValueError, KeyError, TypeError) as exc:
            return Reply(400, {"message": f"{type(exc).__name__}: {exc}"})

    def _route(self, route: str, args: tuple[str, ...], request: Request) -> Reply:
        method = request.method
        if route == "templates" and method == "GET":
            return Reply(200, [self._manager()])
        if route == "template" and method == "GET":
            if args[0] != self.template_id:
                return Reply(404, {"message": "Template not found."})
            return Reply(200, self._template())
        if route == "workspaces" and method == "GET":
            space = {"id": self.workspace_id, "title": "Global Public Workspace"}
            return Reply(200, [{**space, "owner": None, "is_public": True}])
        if route == "data_list" and method == "GET":
            return self._list(request)
        if route == "data_list" and method == "POST":
            return self._create(request.json())
        if route not in ("assign", "data"):
            return Reply(405, {"detail": f'Method "{method}" not allowed.'})
        record = self.data.get(int(args[0]))
        if record is None:
            return Reply(404, {"message": "Data not found."})
        if route == "assign" and method == "PATCH":
            record["workspace"] = int(args[1])
            record["last_change_date"] = _now()
            return Reply(200, {})
        if route == "data" and method == "GET":
            return Reply(200, record)
        if route == "data" and method == "PATCH":
            body = request.json()
            if "xml_content" in body:
                record["xml_content"] = body["xml_content"]
                record["last_modification_date"] = _now()
            if "title" in body:
                self._retitle(record, str(body["title"]).strip())
            record["last_change_date"] = _now()
            return Reply(200, record)
        if route == "data" and method == "DELETE":
            self._retitle(record, None)
            del self.data[record["id"]]
            return Reply(204)
        return Reply(405, {"detail": f'Method "{method}" not allowed.'})

    def _manager(self) -> dict[str, Any]:
        return {
            "id": 1,
            "versions": [self.template_id],
            "current": self.template_id,
            "disabled_versions": [],
            "title": self.template_title,
            "user": None,
            "is_disabled": False,
        }

    def _template(self) -> dict[str, Any]:
        return {
            "id": int(self.template_id),
            "user": None,
            "filename": f"{self.template_title}.xsd",
            "content": self.xsd,
            "hash": hashlib.sha1(self.xsd.encode()).hexdigest(),
            "format": "XSD",
            "dependencies": [],
        }

    def _create(self, body: dict[str, Any]) -> Reply:
        missing = [k for k in ("template", "title", "xml_content") if k not in body]
        if missing:
            return Reply(400, {"message": {k: ["This field is required."] for k in missing}})
        stamp = _now()
        workspace = body.get("workspace")
        record = {
            "id": self.next_id,
            "template": int(body["template"]),
            "workspace": None if workspace is None else int(workspace),
            "user_id": self.user_id,
            "title": "",
            "checksum": None,
            "creation_date": stamp,
            "last_modification_date": stamp,
            "last_change_date": stamp,
            "xml_content": body["xml_content"],
        }
        self.data[self.next_id] = record
        self.next_id += 1
        self._retitle(record, str(body["title"]).strip())
        return Reply(201, record)

    def _retitle(self, record: dict[str, Any], title: str | None) -> None:
        if record["title"] in self.by_title:
            self.by_title[record["title"]].remove(record["id"])
        if title is not None:
            record["title"] = title
            self.by_title.setdefault(title, []).append(record["id"])

    def _list(self, request: Request) -> Reply:
        title, template = request.param("title"), request.param("template")
        if title is not None and request.param("regex") == "true":
            rows = [r for r in self.data.values() if re.search(title, r["title"], re.I)]
        elif title is not None:
            rows = [self.data[i] for i in self.by_title.get(title, [])]
        else:
            rows = list(self.data.values())
        if template is not None:
            rows = [r for r in rows if str(r["template"]) == template]
        rows.sort(key=lambda r: (r["last_modification_date"], r["id"]), reverse=True)
        pages = max(1, -(-len(rows) // 10))
        page = int(request.param("page", "1") or "1")
        if not 1 <= page <= pages:
            return Reply(500, {"message": "Invalid page."})

        def link(number: int) -> str:
            query = {k: v[-1] for k, v in request.query.items() if k != "page"}
            return f"{self.url}rest/data/?{urlencode({**query, 'page': number})}"

        return Reply(
            200,
            {
                "count": len(rows),
                "next": link(page + 1) if page < pages else None,
                "previous": link(page - 1) if page > 1 else None,
                "results": rows[(page - 1) * 10 : page * 10],
            },
        )


# -- eLabFTW ---------------------------------------------------------------------------------

_FIELD_TERM = re.compile(
    r'extrafield:(?:s:)?("(?:[^"\\]|\\.)+"|[^\s"():|&!\\]+):("(?:[^"\\]|\\.)+"|[^\s"():|&!\\]+)',
    re.IGNORECASE,
)
_PUBLIC_HOST = "https://elab.internal"  # the real server's Location may name another host


def _unquoted(term: str) -> str:
    if term.startswith('"'):
        term = term[1:-1]
    return re.sub(r"\\(.)", r"\1", term)


class FakeELabFTW:
    """eLabFTW 5.6's API v2 for one user of team 3: experiments, tags, uploads, search."""

    name = "elabftw"
    api_key = "3-bench0123456789abcdef0123456789"
    version = "5.6.0"

    def __init__(self) -> None:
        self.url = ""
        self.experiments: dict[int, dict[str, Any]] = {}
        self.by_field: dict[tuple[str, str], set[int]] = {}
        self.next_experiment = 1
        self.next_upload = 1
        self.user = {"userid": 7, "firstname": "Ned", "lastname": "Land", "team": 3, "teams": []}

    def sessions(self) -> Counter[str]:
        """How many experiments show each session (field "Session ID", else the title)."""
        found: Counter[str] = Counter()
        for experiment in self.experiments.values():
            fields = json.loads(experiment["metadata"] or "{}").get("extra_fields") or {}
            session = (fields.get("Session ID") or {}).get("value") or experiment["title"]
            found[str(session)] += 1
        return found

    def handle(self, request: Request) -> Reply:
        _, found, path = request.path.partition("api/v2/")
        parts = path.strip("/").split("/") if found else ["?"]
        if request.headers.get("authorization") != self.api_key:
            return Reply(401, {"code": 401, "message": "Authentication required"})
        try:
            return self._route(request.method, parts, request)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            return Reply(400, {"code": 400, "message": f"{type(exc).__name__}: {exc}"})

    def _route(self, method: str, parts: list[str], request: Request) -> Reply:
        match method, parts:
            case "GET", ["info"]:
                major, minor, patch = (int(x) for x in self.version.split("."))
                number = major * 10000 + minor * 100 + patch
                return Reply(200, {"elabftw_version": self.version, "elabftw_version_int": number})
            case "GET", ["users", "me"]:
                return Reply(200, self.user)
            case "GET", ["teams", _, "experiments_categories" | "experiments_status"]:
                return Reply(200, [{"id": 1, "title": "Default", "color": "29aeb9", "team": 3}])
            case "GET", ["experiments"]:
                return self._search(request)
            case "POST", ["experiments"]:
                return self._create(request.json() or {})
            case _, ["experiments", number, *rest] if number.isdigit():
                experiment = self.experiments.get(int(number))
                if experiment is None:
                    return Reply(404, {"code": 404, "message": "Nothing to show with this id"})
                return self._on_experiment(method, experiment, rest, request)
        return Reply(404, {"code": 404, "message": f"no route for {method} {'/'.join(parts)}"})

    def _search(self, request: Request) -> Reply:
        limit = int(request.param("limit", "15") or "15")
        states = {int(s) for s in (request.param("state", "1") or "1").split(",")}
        extended = (request.param("extended") or "").strip()
        if extended:
            ids: set[int] = set()
            for key, value in _FIELD_TERM.findall(extended):
                ids |= self.by_field.get((_unquoted(key).lower(), _unquoted(value).lower()), set())
            hits = [self.experiments[i] for i in ids]
        else:
            term = _unquoted((request.param("q") or "").strip()).lower()
            hits = [e for e in self.experiments.values() if term in e["title"].lower()]
        hits = [e for e in hits if e["state"] in states]
        hits.sort(key=lambda e: e["id"], reverse=True)
        return Reply(200, [self._view(e, full=False) for e in hits[:limit]])

    def _create(self, data: dict[str, Any]) -> Reply:
        number = self.next_experiment
        self.next_experiment += 1
        metadata = data.get("metadata")
        self.experiments[number] = {
            "id": number,
            "title": data.get("title", "Untitled"),
            "body": data.get("body"),
            "content_type": data.get("content_type", 1),
            "category": data.get("category"),
            "status": data.get("status"),
            "metadata": None,
            "tags": [],
            "uploads": [],
            "state": 1,
            "locked": 0,
        }
        self._set_metadata(self.experiments[number], json.dumps(metadata) if metadata else None)
        for tag in data.get("tags") or []:
            self.experiments[number]["tags"].append(tag)
        return Reply(201, headers={"Location": f"{_PUBLIC_HOST}/api/v2/experiments/{number}"})

    def _on_experiment(
        self, method: str, experiment: dict[str, Any], rest: list[str], request: Request
    ) -> Reply:
        number = experiment["id"]
        match method, rest:
            case "GET", []:
                return Reply(200, self._view(experiment, full=True))
            case "PATCH", []:
                self._patch(experiment, request.json() or {})
                return Reply(200, self._view(experiment, full=True))
            case "POST", ["tags"]:
                data = request.json() or {}
                for tag in data.get("tags") or [data["tag"]]:
                    if tag.casefold() not in {t.casefold() for t in experiment["tags"]}:
                        experiment["tags"].append(tag)
                location = f"{_PUBLIC_HOST}/api/v2/experiments/{number}/tags"
                return Reply(201, headers={"Location": location})
            case "POST", ["uploads"]:
                upload = self._upload(request)
                if upload is None:
                    return Reply(400, {"code": 400, "message": "No file was uploaded"})
                experiment["uploads"].append(upload)
                location = f"{_PUBLIC_HOST}/api/v2/experiments/{number}/uploads/{upload['id']}"
                return Reply(201, headers={"Location": location})
            case "DELETE", ["uploads", upload_id]:
                experiment["uploads"] = [
                    u for u in experiment["uploads"] if str(u["id"]) != upload_id
                ]
                return Reply(204)
        return Reply(405, {"code": 405, "message": f"{method} not supported here"})

    def _patch(self, experiment: dict[str, Any], data: dict[str, Any]) -> None:
        for key, value in data.items():
            if key == "bodyappend":
                experiment["body"] = (experiment["body"] or "") + value
            elif key == "metadata":
                self._set_metadata(experiment, value)
            elif key == "metadatamerge":
                merged = json.loads(experiment["metadata"] or "{}")
                fields = merged.setdefault("extra_fields", {})
                for name, new in (json.loads(value).get("extra_fields") or {}).items():
                    fields[name] = {**fields.get(name, {}), **new}
                self._set_metadata(experiment, json.dumps(merged))
            else:
                experiment[key] = value

    def _set_metadata(self, experiment: dict[str, Any], metadata: str | None) -> None:
        """Store the metadata (a JSON string, as the server does) and index its fields."""
        for key in self._fields(experiment["metadata"]):
            self.by_field.get(key, set()).discard(experiment["id"])
        experiment["metadata"] = metadata
        for key in self._fields(metadata):
            self.by_field.setdefault(key, set()).add(experiment["id"])

    @staticmethod
    def _fields(metadata: str | None) -> list[tuple[str, str]]:
        fields = json.loads(metadata or "{}").get("extra_fields") or {}
        return [
            (str(name).lower(), str(f.get("value", "")).lower())
            for name, f in fields.items()
            if isinstance(f, dict)
        ]

    def _upload(self, request: Request) -> dict[str, Any] | None:
        """The ``file`` part of a multipart/form-data body, as the server keeps it."""
        found = re.search(r'boundary="?([^";]+)"?', request.headers.get("content-type", ""))
        if found is None:
            return None
        for chunk in request.body.split(b"--" + found.group(1).encode())[1:]:
            head, _, data = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
            name = re.search(rb'filename="([^"]*)"', head)
            if b'name="file"' in head and name is not None:
                content = data.removesuffix(b"\r\n")
                upload_id = self.next_upload
                self.next_upload += 1
                return {
                    "id": upload_id,
                    "real_name": name.group(1).decode("utf-8", "replace"),
                    "hash": hashlib.sha256(content).hexdigest(),
                    "hash_algorithm": "sha256",
                    "filesize": len(content),
                    "state": 1,
                }
        return None

    def _view(self, experiment: dict[str, Any], *, full: bool) -> dict[str, Any]:
        view = {k: v for k, v in experiment.items() if k not in ("uploads", "tags")}
        view["tags"] = "|".join(experiment["tags"]) or None
        view["metadata_decoded"] = json.loads(experiment["metadata"] or "null")
        if full:
            view["uploads"] = list(reversed(experiment["uploads"]))
        return view


# -- the HTTP/1.1 server ---------------------------------------------------------------------


class FakeServers:
    """Serve fake APIs on 127.0.0.1 from one asyncio loop in a thread, until ``__exit__``.

    ``counts[(api, method, path)]`` counts the requests (ids in paths as ``<id>``),
    ``connections`` the connections; :meth:`call` runs a function in the loop's thread (to
    read a fake's state safely).
    """

    def __init__(self, *apis: Api, latency: float = 0.0) -> None:
        self.apis = apis
        self.latency = latency
        self.counts: Counter[tuple[str, str, str]] = Counter()
        self.connections: Counter[str] = Counter()  # TCP connections accepted, by API
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="bench-fakes")
        self._servers: list[asyncio.Server] = []
        self._writers: set[asyncio.StreamWriter] = set()

    def __enter__(self) -> FakeServers:
        self._thread.daemon = True
        self._thread.start()
        for api in self.apis:
            server = self._run(
                asyncio.start_server(partial(self._serve, api), "127.0.0.1", 0, backlog=1024)
            )
            self._servers.append(server)
            api.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        return self

    def __exit__(self, *exc: object) -> None:
        self._run(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def total(self, api: str | None = None) -> int:
        """Requests received (by one API, or all)."""
        return sum(n for (name, _, _), n in self.counts.items() if api in (None, name))

    def call(self, function: Callable[[], T]) -> T:
        async def run() -> T:
            return function()

        return self._run(run())

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _shutdown(self) -> None:
        for server in self._servers:
            server.close()
        for writer in list(self._writers):
            writer.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, api: Api, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._writers.add(writer)
        self.connections[api.name] += 1
        try:
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if self.latency:
                    await asyncio.sleep(self.latency)
                try:
                    reply = api.handle(request)
                except Exception as exc:  # a bug in a fake: a 500 the run reports, not a hang
                    reply = Reply(500, {"message": f"fake: {exc!r}"})
                route = re.sub(r"(?<=/)\d+(?=/|$)", "<id>", request.path)
                self.counts[(api.name, request.method, route)] += 1
                writer.write(_encode(reply))
                await writer.drain()
                if request.headers.get("connection", "").lower() == "close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request off a keep-alive connection; ``None`` when the client closed it."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        pieces = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            pieces.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        body = b"".join(pieces)
    else:
        length = int(headers.get("content-length") or 0)
        body = await reader.readexactly(length) if length else b""
    split = urlsplit(target)
    return Request(method, split.path.lstrip("/"), parse_qs(split.query), headers, body)


def _encode(reply: Reply) -> bytes:
    body = b"" if reply.payload is None else json.dumps(reply.payload).encode()
    lines = [f"HTTP/1.1 {reply.status} {_REASONS.get(reply.status, 'Status')}"]
    if reply.payload is not None:
        lines.append("Content-Type: application/json")
    lines += [f"{k}: {v}" for k, v in reply.headers.items()]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
