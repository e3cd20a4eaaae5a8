"""HTTP for the built-in destinations: a total deadline, capped bodies, errors mapped, secrets
masked.

Everything that can go wrong on the wire becomes a :class:`TransientError` (worth a retry) or
a :class:`PermanentError` here, at the boundary, like httpx's ``map_httpcore_exceptions``;
nothing above this module sees a ``requests`` or ``urllib3`` exception, and every message
that leaves it has been scrubbed of every configured secret *before* it was cut.

**The deadline.** ``requests``' timeout bounds each socket operation, so a server that
trickles a byte a second holds a request for ever. Here each request gets a
:class:`_Deadline` of ``NX_HTTP_TIMEOUT`` seconds, covering connect, TLS handshake, sending,
the status line, the headers and the body. The connection classes of the session's pools
hand every socket they open or reuse to the deadline of the calling thread (a
``threading.local``), which keeps a duplicate of its file descriptor; one shared thread,
:class:`_Reaper`, shuts those sockets down when a deadline passes. ``shutdown(2)`` wakes a
thread blocked in ``recv``/``send`` at once, on plain and TLS sockets alike, so the request
fails within moments of its deadline, and is reported as timed out. The connect timeout is the
time left, so a connect that never completes is bounded too.

**Bodies** are read with ``stream=True``: an error body up to :data:`ERROR_BODY_LIMIT` bytes
(and summarised in a line), a success body up to the client's ``max_body`` (a larger answer is
refused, unread, when its ``Content-Length`` says so, and as soon as it passes the limit
otherwise). A record never exists as a whole copy besides its bytes: it goes out as a
:class:`StreamedBody` (in pieces, with a known length; JSON-escaped piece by piece), and comes
back, in an answer, as a :class:`RawJsonString` compared a piece at a time.

**Secrets.** The client has the :class:`~nxdrop.redact.Redactor` of every configured secret (a
server may echo any header it was sent): exception messages and error summaries are scrubbed
before they are cut, and a secret cut in two by a read limit is dropped whole.
"""

from __future__ import annotations

import codecs
import contextlib
import email.utils
import heapq
import http.client
import itertools
import json
import logging
import os
import re
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from html import unescape
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from nxdrop import __version__
from nxdrop.exceptions import ConfigError, DestinationError, PermanentError, TransientError
from nxdrop.redact import Redactor

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})

#: Bytes of an error answer that are read: enough for any JSON message, never a whole page.
ERROR_BODY_LIMIT = 8 * 1024
#: Characters of the server's own words kept in an error message.
SUMMARY_LIMIT = 300
#: The smallest limit on a success answer, whatever the record size limit.
MIN_BODY_LIMIT = 16 * 1024 * 1024

_CHUNK = 256 * 1024  # read and send in pieces of this size
_MiB = 1024 * 1024


def body_limit(max_record_bytes: int) -> int:
    """The largest success answer read: room for one record of ``max_record_bytes`` in JSON.

    A CDCS list answer holds a record's XML as a JSON string, where an XML byte takes at
    most three characters (a two-byte character becomes the six of ``\\u00b5``; ``"`` and
    a line end two), plus a little of everything else.
    """
    return max(MIN_BODY_LIMIT, 3 * max_record_bytes + _MiB)


def check_base_url(url: str, variable: str) -> None:
    """Raise a :class:`ConfigError` naming ``variable`` unless ``url`` is a usable base URL."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises for a port that is not a number
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{variable} must be an http:// or https:// URL with a host name")
    if parts.query or parts.fragment:
        raise ConfigError(f"{variable} must be a base URL, without ?query or #fragment")


def join_url(base: str, path: str) -> str:
    """``base`` with exactly one slash before ``path``; a sub-path in ``base`` is kept."""
    return base.rstrip("/") + "/" + path.lstrip("/")


# -- request bodies ------------------------------------------------------------------------


class JsonString:
    """UTF-8 text as the inside of a JSON string, escaped piece by piece as it is sent.

    The bytes are what ``json.dumps(text, ensure_ascii=False)`` makes between its quotes,
    without a decoded or escaped copy of the whole text: a record's bytes are escaped a
    piece at a time while they go out (``"``, ``\\`` and control characters are the only
    bytes JSON escapes, and none of them is ever part of a multi-byte UTF-8 sequence).
    Raises ``ValueError`` for bytes that are not UTF-8.
    """

    def __init__(self, utf8: bytes) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        view = memoryview(utf8)
        for start in range(0, len(view), _CHUNK):  # checked a piece at a time: no text copy
            decoder.decode(view[start : start + _CHUNK])
        decoder.decode(b"", final=True)
        self.utf8 = utf8
        longer = sum(utf8.count(char) for char, _ in _SHORT_ESCAPES)
        for start in range(0, len(view), _CHUNK):  # \u00XX for the rare other controls
            longer += 5 * len(_other_controls(view[start : start + _CHUNK]))
        self._length = len(utf8) + longer

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.utf8)
        for start in range(0, len(view), _CHUNK):
            piece = bytes(view[start : start + _CHUNK])
            for char, escaped in _SHORT_ESCAPES:
                piece = piece.replace(char, escaped)
            if _other_controls(piece):
                piece = _OTHER_CONTROLS.sub(_unicode_escape, piece)
            yield piece


# What JSON escapes with a letter; the backslash first, so no escape is escaped again.
_SHORT_ESCAPES = (
    (b"\\", b"\\\\"),
    (b'"', b'\\"'),
    (b"\n", b"\\n"),
    (b"\r", b"\\r"),
    (b"\t", b"\\t"),
    (b"\b", b"\\b"),
    (b"\f", b"\\f"),
)
# The control bytes JSON escapes as \u00XX (the rest have a letter, above).
_OTHER_CONTROL_BYTES = bytes([*range(0x08), 0x0B, *range(0x0E, 0x20)])
_OTHER_CONTROLS = re.compile(b"[" + re.escape(_OTHER_CONTROL_BYTES) + b"]")
_NOT_OTHER_CONTROLS = bytes(b for b in range(256) if b not in _OTHER_CONTROL_BYTES)


def _other_controls(piece: bytes | memoryview) -> bytes:
    """The control bytes of ``piece`` that JSON escapes as ``\\u00XX`` (a table lookup a
    byte, many times faster than a regular expression)."""
    return bytes(piece).translate(None, _NOT_OTHER_CONTROLS)


def _unicode_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % match.group()[0]


class StreamedBody:
    """A request body sent piece by piece with a known ``Content-Length``.

    The parts are kept as they are (a record's bytes are never copied into one joined body)
    and every iteration yields the same bytes, so a request sent again is identical. ``str``
    parts must be ASCII (their length is their length in bytes).
    """

    def __init__(self, *parts: bytes | str | JsonString, content_type: str | None = None) -> None:
        for part in parts:
            if isinstance(part, str) and not part.isascii():
                raise ValueError("a str part of a StreamedBody must be ASCII")
        self.parts = parts
        self.content_type = content_type
        self._length = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        # Small pieces go out together: a small body is one write, as it would be whole.
        pending = bytearray()
        for piece in self._pieces():
            if len(pending) + len(piece) > _CHUNK and pending:
                yield bytes(pending)
                pending.clear()
            if len(piece) >= _CHUNK:
                yield piece
            else:
                pending += piece
        if pending:
            yield bytes(pending)

    def _pieces(self) -> Iterator[bytes | memoryview]:
        for part in self.parts:
            if isinstance(part, JsonString):
                yield from part
            elif isinstance(part, str):
                for start in range(0, len(part), _CHUNK):
                    yield part[start : start + _CHUNK].encode("ascii")
            else:
                view = memoryview(part)
                for start in range(0, len(view), _CHUNK):
                    yield view[start : start + _CHUNK]


def json_body(fields: Mapping[str, Any], key: str, utf8: bytes) -> StreamedBody:
    """``json.dumps({**fields, key: utf8.decode()}, ensure_ascii=False).encode()`` as a
    :class:`StreamedBody`, for a large ``utf8`` that is never decoded or copied whole.

    Raises ``ValueError`` if ``utf8`` is not UTF-8.
    """
    if key in fields:
        raise ValueError(f"{key!r} is both a field and the text's key")
    head = json.dumps(dict(fields), ensure_ascii=False).encode("utf-8")
    prefix = head[:-1] + (b", " if fields else b"") + json.dumps(key).encode() + b': "'
    return StreamedBody(prefix, JsonString(utf8), b'"}', content_type="application/json")


class RawJsonString:
    """A JSON string left undecoded: the escaped bytes between its quotes, as they came.

    :meth:`equals_utf8` compares it with UTF-8 bytes a piece at a time, so a record-sized
    value is never held decoded.
    """

    def __init__(self, escaped: memoryview) -> None:
        self.escaped = escaped

    def text(self) -> str:
        """The value, decoded whole."""
        return "".join(self._pieces())

    def equals_utf8(self, utf8: bytes) -> bool:
        """Whether the value is exactly the text that ``utf8`` encodes."""
        view, at = memoryview(utf8), 0
        for text in self._pieces():
            piece = text.encode("utf-8", "surrogatepass")
            if view[at : at + len(piece)] != piece:
                return False
            at += len(piece)
        return at == len(view)

    def _pieces(self) -> Iterator[str]:
        raw, start = self.escaped, 0
        while start < len(raw):
            end = _piece_end(raw, start)
            value = json.loads(b'"' + bytes(raw[start:end]) + b'"')
            assert isinstance(value, str)
            yield value
            start = end


def _piece_end(raw: memoryview, start: int) -> int:
    """Where a piece of an escaped JSON string that starts at ``start`` may end.

    Right after a ``<``, ``>`` or space: bytes that no escape sequence (``\\u00b5``,
    ``\\"``) contains and that are not part of a multi-byte character, so the cut splits
    neither. Without one in sight (a long run of escapes), the rest is taken whole.
    """
    end = start + _CHUNK
    if end >= len(raw):
        return len(raw)
    window = bytes(raw[max(start, end - _CHUNK // 4) : end])
    cut = max(window.rfind(b"<"), window.rfind(b">"), window.rfind(b" "))
    return end - len(window) + cut + 1 if cut >= 0 else len(raw)


# A JSON string token; between tokens a JSON text has no quote at all. Possessive: with
# backtracking, ``re`` would keep state for every escape of a record-sized string.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)


def loads_keeping_raw(content: bytes | bytearray, raw: Collection[str] = ()) -> Any:
    """``json.loads(content)``, but the string values of members named in ``raw`` become
    :class:`RawJsonString` views of ``content`` instead of being decoded."""
    if not raw:
        return json.loads(content.decode("utf-8"))
    keys = {json.dumps(key).encode() for key in raw}
    longest = max(len(key) for key in keys)
    marker = f"\u0000nxdrop-raw-{secrets.token_hex(8)}"
    view = memoryview(content)
    skeleton, last = bytearray(), 0
    values: list[RawJsonString] = []
    key_end = -1  # where a wanted key token ended, while its value is awaited
    for match in _JSON_STRING.finditer(content):
        begin, end = match.span()
        if key_end >= 0 and bytes(content[key_end:begin]).strip() == b":":
            skeleton += content[last:begin]
            skeleton += b"{%s: %d}" % (json.dumps(marker).encode(), len(values))
            values.append(RawJsonString(view[begin + 1 : end - 1]))
            last, key_end = end, -1
            continue
        key_end = end if end - begin <= longest and bytes(content[begin:end]) in keys else -1
    skeleton += content[last:]

    def restore(obj: dict[str, Any]) -> Any:
        return values[obj[marker]] if len(obj) == 1 and marker in obj else obj

    return json.loads(skeleton.decode("utf-8"), object_hook=restore)


def multipart_body(
    fields: Mapping[str, str],
    name: str,
    filename: str,
    content: bytes,
    content_type: str,
    *,
    boundary: str,
) -> StreamedBody:
    """A ``multipart/form-data`` body with one file part whose bytes are sent as they are.

    The same bytes as urllib3's ``encode_multipart_formdata`` with the file first and then
    ``fields``; with a fixed ``boundary`` a retried upload sends the same bytes as the first.
    """
    marker = b"\x00nxdrop-file-content\x00"
    parts: dict[str, Any] = {name: (filename, marker, content_type), **fields}
    encoded, form_type = urllib3.encode_multipart_formdata(parts, boundary=boundary)
    head, found, tail = encoded.partition(marker)
    assert found and marker not in tail, "the placeholder must occur exactly once"
    return StreamedBody(head, content, tail, content_type=form_type)


# -- the deadline --------------------------------------------------------------------------


class _Deadline:
    """The end of one request: the sockets it uses are shut down when it passes.

    It keeps a duplicate file descriptor of each socket handed to it (the original may be
    wrapped in TLS or closed by urllib3 meanwhile; the duplicate is ours, so shutting it down
    can never hit a descriptor number that was reused elsewhere).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.fired = False
        self.done = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def left(self) -> float:
        """Seconds until the deadline (never below a millisecond: 0 means "no timeout")."""
        return max(0.001, self.expires - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Cut ``sock`` when the deadline passes (at once if it has)."""
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except (OSError, ValueError):
            return  # already closed: nothing to cut
        with self._lock:
            if self.done:
                dup.close()
                return
            self._sockets.append(dup)
            if self.fired:
                _cut(dup)

    def fire(self) -> None:
        """The deadline passed: shut down every socket of the request."""
        with self._lock:
            if self.done:
                return
            self.fired = True
            for sock in self._sockets:
                _cut(sock)

    def close(self) -> None:
        """The request is over: nothing is cut any more; the duplicates are closed."""
        with self._lock:
            self.done = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        _reaper.forget(self)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (any more): nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


class _Reaper:
    """One daemon thread that fires deadlines when they pass; started on first use."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None

    def after_fork(self) -> None:
        """A forked child has no reaper thread, and must not wait on the parent's lock."""
        self._cond = threading.Condition()
        self._heap = []
        self._thread = None

    def add(self, deadline: _Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.expires, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="nxdrop-http-deadlines", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def forget(self, deadline: _Deadline) -> None:
        # Requests usually finish long before their deadline: drop finished ones from the
        # top so that an idle daemon has nothing to wake up for.
        with self._cond:
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)

    def _run(self) -> None:
        while True:
            due: list[_Deadline] = []
            with self._cond:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, deadline = heapq.heappop(self._heap)
                    if not deadline.done:
                        due.append(deadline)
                if not due:
                    self._cond.wait(self._heap[0][0] - now if self._heap else None)
                    continue
            for deadline in due:
                deadline.fire()


_reaper = _Reaper()
os.register_at_fork(after_in_child=_reaper.after_fork)
_current = threading.local()  # the deadline of the request this thread is making


def _watch(sock: socket.socket | None) -> None:
    deadline: _Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    """Hands every socket it opens or reuses to the calling thread's deadline."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)  # before any TLS handshake: a trickled handshake is cut too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _watch(self.sock)  # a connection reused from the pool
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    """:class:`_WatchedHTTPConnection` for https."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _watch(self.sock)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS: dict[str, type[HTTPConnectionPool]] = {"http": _HTTPPool, "https": _HTTPSPool}


class _Session(requests.Session):
    """A session that never looks at where a redirect points.

    nxdrop follows no redirect (one would turn a POST into a GET: CDCS answers 301 for a
    missing slash), and ``requests`` even with ``allow_redirects=False`` reads a redirect's
    whole body, unbounded, to prepare the next request: here a 3xx is an answer like any
    other, reported by :meth:`HttpClient.request`.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pools of watched connections (proxied ones too)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are classes of their own
            manager.pool_classes_by_scheme = _POOLS
        return manager


# -- the client ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """A 2xx answer, its body read whole (within the size limit and the deadline)."""

    status_code: int
    headers: Mapping[str, str]
    content: bytes | bytearray
    url: str


class HttpClient:
    """A ``requests.Session`` with a base URL, auth headers, TLS settings, a total deadline per
    request, a limit on answers and a redactor for every message it raises."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout: float,
        verify: bool | str = True,
        max_body: int = MIN_BODY_LIMIT,
        redactor: Redactor | None = None,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.verify = verify
        self.max_body = max_body
        # Without one from the settings, at least the values this client sends are masked.
        self.redactor = redactor if redactor is not None else Redactor(headers.values())
        if isinstance(verify, str):
            _check_bundle(verify)
        self.session: requests.Session = _Session()
        adapter = _Adapter()
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.session.headers.update({"User-Agent": f"nxdrop/{__version__}", **headers})
        self.session.verify = verify
        if verify is False:
            _warn_insecure()

    @classmethod
    def for_settings(cls, base_url: str, settings: Settings, headers: dict[str, str]) -> HttpClient:
        """A client with nxdrop's timeout, TLS settings, answer limit and every secret masked."""
        return cls(
            base_url,
            headers=headers,
            timeout=settings.http_timeout,
            verify=settings.tls_verify,
            max_body=body_limit(settings.max_record_bytes),
            redactor=Redactor.from_settings(settings),
        )

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` under the base URL."""
        return join_url(self.base_url, path)

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send one request within the deadline; return a 2xx answer or raise a
        ``DestinationError`` whose message holds no secret.

        ``kwargs`` go to ``requests``; ``data`` may be a :class:`StreamedBody`.
        """
        url = path if path.startswith(("http://", "https://")) else self.url(path)
        body = kwargs.get("data")
        if isinstance(body, StreamedBody) and body.content_type is not None:
            kwargs["headers"] = {"Content-Type": body.content_type, **(kwargs.get("headers") or {})}
        for fixed in ("timeout", "stream", "verify"):
            kwargs.pop(fixed, None)
        kwargs["allow_redirects"] = False
        deadline = _Deadline(self.timeout)
        _current.deadline = deadline
        _reaper.add(deadline)
        try:
            left = deadline.left()
            # ``verify`` on every request: requests would otherwise let $REQUESTS_CA_BUNDLE
            # override the session's, and NX_CERT_BUNDLE would be ignored.
            response = self.session.request(
                method, url, timeout=(left, left), stream=True, verify=self.verify, **kwargs
            )
            try:
                return self._reply(method, url, response, deadline)
            finally:
                response.close()
        except DestinationError:
            raise
        except (
            requests.RequestException,
            urllib3.exceptions.HTTPError,
            http.client.HTTPException,
            OSError,
        ) as exc:
            raise self._failure(method, url, exc, deadline) from self._chain(exc)
        finally:
            _current.deadline = None
            deadline.close()

    def json(self, method: str, path: str, *, raw: Collection[str] = (), **kwargs: Any) -> Any:
        """``request`` and decode the JSON answer (a non-JSON answer is permanent).

        String values of the members named in ``raw`` (a record's XML) are not decoded: they
        come as :class:`RawJsonString`, views of the answer's bytes. An answer that holds a
        whole record then costs its size once, not again as text and again as a ``str``
        (twice or four times its size for XML with a ``μ`` in it).
        """
        reply = self.request(method, path, **kwargs)
        del kwargs  # the request body (a whole record, perhaps) is not needed any more
        content, url, status = reply.content, reply.url, reply.status_code
        del reply
        try:
            return loads_keeping_raw(content, raw)
        except ValueError as exc:  # UnicodeDecodeError too
            shown = self._excerpt(bytes(content[:800]).decode("utf-8", "replace"), 200)
            raise PermanentError(
                f"{method} {url}: answer is not JSON: {shown!r}", status_code=status
            ) from exc

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()

    # -- internals ---------------------------------------------------------------------

    def _reply(
        self, method: str, url: str, response: requests.Response, deadline: _Deadline
    ) -> Reply:
        status = response.status_code
        if 300 <= status < 400:
            where = self.redactor.cut(response.headers.get("Location") or "", SUMMARY_LIMIT)
            raise PermanentError(
                f"{method} {url}: redirected to {where!r}; check the base URL",
                status_code=status,
            )
        if status >= 400:
            summary = self._summary(response)
            message = self.redactor.scrub(f"{method} {url}: HTTP {status}: {summary}")
            if status in TRANSIENT_STATUSES:
                raise TransientError(
                    message, status_code=status, retry_after=retry_after(response.headers)
                )
            raise PermanentError(message, status_code=status)
        content = self._read_capped(method, url, response)
        if deadline.fired:
            # A body without a length ends at EOF, which is what a cut looks like: never take
            # a cut-short answer for a whole one.
            raise self._timed_out(method, url)
        return Reply(status, response.headers, content, url)

    def _read_capped(self, method: str, url: str, response: requests.Response) -> bytearray:
        limit = self.max_body
        length = _content_length(response.headers)
        identity = response.headers.get("Content-Encoding", "identity").strip().lower() in (
            "",
            "identity",
        )
        if length is not None and identity and length > limit:
            raise self._too_large(method, url, f"{length} bytes", "not read")
        raw = response.raw
        if length is not None and identity:
            buffer = bytearray(length)  # filled in place: no copy of a large answer
            got = 0
            while got < length:
                chunk = raw.read(min(_CHUNK, length - got), decode_content=True)
                if not chunk:
                    break
                buffer[got : got + len(chunk)] = chunk
                got += len(chunk)
            del buffer[got:]
            return buffer
        buffer = bytearray()
        while chunk := raw.read(_CHUNK, decode_content=True):
            if len(buffer) + len(chunk) > limit:
                raise self._too_large(method, url, f"more than {limit} bytes", "the rest not read")
            buffer += chunk
        return buffer

    def _too_large(self, method: str, url: str, size: str, what: str) -> PermanentError:
        return PermanentError(
            self.redactor.scrub(
                f"{method} {url}: the answer ({size}) is larger than the limit of "
                f"{self.max_body} bytes (made from NX_MAX_RECORD_BYTES); {what}"
            )
        )

    def _summary(self, response: requests.Response) -> str:
        """The server's own words for an error, short, from at most ERROR_BODY_LIMIT bytes."""
        reason = response.reason or ""
        try:
            body = response.raw.read(ERROR_BODY_LIMIT, decode_content=True)
        except (urllib3.exceptions.HTTPError, http.client.HTTPException, OSError):
            body = b""  # cut off (the deadline, a reset): the status says enough
        length = _content_length(response.headers)
        truncated = len(body) >= ERROR_BODY_LIMIT and (length is None or length > len(body))
        return summarize_error(
            body,
            response.headers.get("Content-Type", ""),
            reason,
            self.redactor,
            truncated=truncated,
        )

    def _failure(
        self, method: str, url: str, exc: BaseException, deadline: _Deadline
    ) -> DestinationError:
        """The one place where a failure on the wire is classified."""
        chain = _causes(exc)
        if deadline.fired or any(isinstance(e, _TIMEOUTS) for e in chain):
            return self._timed_out(method, url)
        host = urlsplit(url).hostname or url
        for e in chain:
            if isinstance(e, ssl.SSLCertVerificationError):
                return PermanentError(
                    self.redactor.scrub(f"{method} {url}: {self._certificate_problem(host, e)}")
                )
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if tls is not None and not isinstance(tls, _TLS_CUT):
            return PermanentError(
                self.redactor.scrub(
                    f"{method} {url}: TLS with {host} failed: {_ssl_reason(tls)}; check that "
                    "the URL's scheme and port are the server's HTTPS ones"
                    + ("" if self.verify is False else " and NX_CERT_BUNDLE")
                )
            )
        connection = (
            requests.ConnectionError,
            requests.exceptions.ChunkedEncodingError,
            urllib3.exceptions.ProtocolError,
            http.client.HTTPException,
        )
        # Every requests exception is an OSError: only the socket's own errors are lost
        # connections, the rest (an invalid URL or header) are ours to fix.
        socket_error = isinstance(exc, OSError) and not isinstance(exc, requests.RequestException)
        if tls is not None or socket_error or isinstance(exc, connection):
            what = "connection lost" if _sent(chain) else "cannot connect"
            return TransientError(self.redactor.scrub(f"{method} {url}: {what}: {_root(exc)}"))
        return PermanentError(self.redactor.scrub(f"{method} {url}: {_root(exc)}"))

    def _certificate_problem(self, host: str, exc: ssl.SSLCertVerificationError) -> str:
        problem = exc.verify_message or _ssl_reason(exc)
        code = exc.verify_code
        if code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
            fix = f"the certificate is not issued for {host}: check the host name in the URL"
        elif code in (9, 10):  # not yet valid, expired
            fix = "the server's certificate must be renewed (or the clock here is wrong)"
        elif isinstance(self.verify, str):
            fix = f"NX_CERT_BUNDLE={self.verify} does not hold the CA that signed it"
        else:
            fix = (
                "if it is signed by a private CA, set NX_CERT_BUNDLE to that CA's "
                "certificate file (PEM)"
            )
        return f"the TLS certificate of {host} was not accepted: {problem}; {fix}"

    def _timed_out(self, method: str, url: str) -> TransientError:
        return TransientError(
            self.redactor.scrub(
                f"{method} {url}: timed out after {self.timeout:g} s (NX_HTTP_TIMEOUT)"
            )
        )

    def _leaks(self, exc: BaseException) -> bool:
        """Whether any exception of ``exc``'s chain shows a secret (its traceback would)."""
        return any(self.redactor.scrub(str(e)) != str(e) for e in _causes(exc))

    def _chain(self, exc: BaseException) -> BaseException | None:
        """``exc`` as the cause of the error raised, unless a secret is in its chain."""
        return None if self._leaks(exc) else exc

    def _excerpt(self, text: str, limit: int) -> str:
        """The start of ``text``, scrubbed and cut (a secret cut in two is dropped whole)."""
        head = drop_partial_secret(
            text[: limit * 2], self.redactor, truncated=len(text) > limit * 2
        )
        return self.redactor.cut(head, limit)


def summarize_error(
    body: bytes, content_type: str, reason: str, redactor: Redactor, *, truncated: bool = False
) -> str:
    """An error answer in a line: its JSON ``message``/``detail``, an HTML page's title or
    heading, or the first line of its text; scrubbed, then cut to :data:`SUMMARY_LIMIT`.

    ``truncated`` says the body was cut short when it was read: a secret that straddles that
    cut is dropped whole (its start alone would still give part of it away).
    """
    text = drop_partial_secret(body.decode("utf-8", "replace"), redactor, truncated=truncated)
    words = _json_words(text)
    if words is None:
        looks_html = "html" in content_type.lower() or text.lstrip().startswith("<")
        words = _html_words(text) if looks_html else _first_line(text)
    words = " ".join(words.split())
    return redactor.cut(words or reason or "(no explanation)", SUMMARY_LIMIT)


def drop_partial_secret(text: str, redactor: Redactor, *, truncated: bool) -> str:
    """``text`` without a trailing start of a secret, when ``text`` was cut short."""
    if not truncated:
        return text
    for secret in redactor.secrets:
        for size in range(min(len(secret) - 1, len(text)), 0, -1):
            if text.endswith(secret[:size]):
                return text[:-size]
    return text


def _json_words(text: str) -> str | None:
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if isinstance(body, dict):
        for key in ("message", "detail", "description", "error"):
            if body.get(key):
                value = body[key]
                return value if isinstance(value, str) else json.dumps(value)
    return json.dumps(body)


_TITLE = re.compile(r"<(title|h1)\b[^>]*>(.*?)</\1\s*>", re.I | re.S)
_TAG = re.compile(r"<[^>]*>")


def _html_words(text: str) -> str:
    titles = {m.group(1).lower(): m.group(2) for m in reversed(list(_TITLE.finditer(text)))}
    found = titles.get("title") or titles.get("h1") or ""
    return unescape(_TAG.sub(" ", found))


def _first_line(text: str) -> str:
    return next((line for line in text.splitlines() if line.strip()), "")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# Not urllib3's TimeoutError: its NewConnectionError (a refused connection) is one.
_TIMEOUTS = (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)
# The peer closed the connection during the handshake: a lost connection, not a TLS problem.
_TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything behind it: causes, contexts, urllib3's ``reason``, and
    exceptions passed as arguments (requests wraps urllib3's errors that way)."""
    seen: dict[int, BaseException] = {}
    pending = [exc]
    while pending:
        e = pending.pop(0)
        if id(e) in seen:
            continue
        seen[id(e)] = e
        nxt = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        pending.extend(n for n in nxt if isinstance(n, BaseException))
    return list(seen.values())


def _root(exc: BaseException) -> str:
    """The innermost error's words (``[Errno 111] Connection refused``)."""
    chain = _causes(exc)
    leaves = [e for e in chain if not any(c is not e for c in _causes(e))]
    root = (leaves or chain)[-1]
    return str(root) or type(root).__name__


def _sent(chain: list[BaseException]) -> bool:
    # A reset or an early close after the connection was made, rather than no connection.
    return not any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain)


def _ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without its codes: ``wrong version number``."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or str(exc.reason or exc)


def _content_length(headers: Mapping[str, str]) -> int | None:
    try:
        length = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None


def _check_bundle(path: str) -> None:
    """A CA bundle that cannot be loaded is a configuration error, found before any request."""
    try:
        if os.path.isdir(path):
            ssl.create_default_context(capath=path)
        else:
            ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"NX_CERT_BUNDLE={path}: not a usable CA bundle (PEM certificates): {exc}"
        ) from exc


def _warn_insecure() -> None:
    # One loud line per client instead of urllib3's warning on every request.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    log.warning(
        "NX_DISABLE_SSL_VERIFY is set: TLS certificates are NOT checked; anyone on the "
        "network path can read and change what nxdrop sends, tokens included"
    )
