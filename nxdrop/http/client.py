"""The HTTP client of the built-in destinations: a deadline per request, capped answers,
every failure classified once, and no secret in any message it raises.

Everything that can go wrong on the wire becomes a :class:`TransientError` (worth a retry)
or a :class:`PermanentError` here, at the boundary, like httpx's ``map_httpcore_exceptions``;
nothing above sees a ``requests`` or ``urllib3`` exception. Answers are read with
``stream=True``: an error body up to :data:`ERROR_BODY_LIMIT` bytes (summarised in a line), a
success body up to the client's ``max_body`` (refused unread when its ``Content-Length`` says
it is larger, and as soon as it passes the limit otherwise). The client has the
:class:`~nxdrop.redact.Redactor` of every configured secret (a server may echo any header it
was sent): messages are scrubbed before they are cut, and a secret cut in two by a read
limit is dropped whole.
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3

from nxdrop import __version__
from nxdrop.exceptions import ConfigError, DestinationError, PermanentError, TransientError
from nxdrop.http.bodies import CHUNK, StreamedBody, loads_keeping_raw
from nxdrop.http.deadline import Deadline, deadline_of, make_session
from nxdrop.http.errors import (
    SUMMARY_LIMIT,
    TIMEOUTS,
    TLS_CUT,
    causes,
    content_length,
    drop_partial_secret,
    retry_after,
    root_words,
    ssl_reason,
    summarize_error,
    was_sent,
)
from nxdrop.http.urls import join_url
from nxdrop.redact import Redactor

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})

#: Bytes of an error answer that are read: enough for any JSON message, never a whole page.
ERROR_BODY_LIMIT = 8 * 1024
#: The smallest limit on a success answer, whatever the record size limit.
MIN_BODY_LIMIT = 16 * 1024 * 1024

_MiB = 1024 * 1024


def body_limit(max_record_bytes: int) -> int:
    """The largest success answer read: room for one record of ``max_record_bytes`` in JSON.

    A CDCS list answer holds a record's XML as a JSON string, where an XML byte takes at
    most three characters (a two-byte character becomes the six of ``\\u00b5``; ``"`` and
    a line end two), plus a little of everything else.
    """
    return max(MIN_BODY_LIMIT, 3 * max_record_bytes + _MiB)


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
        connections: int = 10,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.verify = verify
        self.max_body = max_body
        # Without one from the settings, at least the values this client sends are masked.
        self.redactor = redactor if redactor is not None else Redactor(headers.values())
        if isinstance(verify, str):
            _check_bundle(verify)
        self.session = make_session(base_url, connections=connections)
        self.session.headers.update({"User-Agent": f"nxdrop/{__version__}", **headers})
        self.session.verify = verify
        # One adapter serves http and https (make_session): requests are sent through it
        # directly, prepared here (see _prepare).
        self._adapter = self.session.get_adapter(base_url)
        if verify is False:
            _quiet_insecure_warnings()

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
            connections=settings.workers,
        )

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` under the base URL."""
        return join_url(self.base_url, path)

    def request(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send one request within the deadline; return a 2xx answer or raise a
        ``DestinationError`` whose message holds no secret.

        ``kwargs`` are ``params``, ``json``, ``data`` and ``headers``, as ``requests`` takes
        them; ``data`` may be a :class:`StreamedBody`.
        """
        url = path if path.startswith(("http://", "https://")) else self.url(path)
        with deadline_of(self.timeout) as deadline:
            return self._within(method, url, deadline, kwargs)

    def _within(self, method: str, url: str, deadline: Deadline, kwargs: dict[str, Any]) -> Reply:
        try:
            prepared = self._prepare(method, url, **kwargs)
            left = deadline.left()
            response = self._adapter.send(
                prepared,
                stream=True,
                timeout=(left, left),
                verify=self.verify,
                cert=None,
                proxies=self.session.proxies,
            )
            try:
                response = self._as_a_session_does(prepared, response)
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

    def _prepare(
        self,
        method: str,
        url: str,
        *,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        data: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.PreparedRequest:
        """The request as ``requests.Session.request`` would prepare it for this session,
        without what nxdrop never uses (auth objects, redirects, the environment, which the
        session does not trust), each of which costs on every request: the session's
        headers (``None`` drops one), the body's ``Content-Type`` and ``Content-Length``,
        the session's cookies and response hooks."""
        prepared = requests.PreparedRequest()
        prepared.method = method.upper()
        prepared.prepare_url(url, params)
        merged: requests.structures.CaseInsensitiveDict[Any] = (
            requests.structures.CaseInsensitiveDict(self.session.headers)
        )
        if isinstance(data, StreamedBody) and data.content_type is not None:
            merged["Content-Type"] = data.content_type
        merged.update(headers or {})
        for dropped in [name for name, value in merged.items() if value is None]:
            del merged[dropped]
        prepared.headers = merged
        prepared.prepare_body(data, None, json)
        if self.session.cookies:
            prepared.prepare_cookies(self.session.cookies)
        prepared.hooks = self.session.hooks  # its response hooks are called, as by a session
        return prepared

    def _as_a_session_does(
        self, prepared: requests.PreparedRequest, response: requests.Response
    ) -> requests.Response:
        """What a ``requests.Session`` does with an answer: its response hooks are called,
        the cookies it sets kept for the next request."""
        dispatch = requests.hooks.dispatch_hook
        response = dispatch("response", prepared.hooks, response)  # type: ignore[no-untyped-call]
        if "Set-Cookie" in response.headers:
            extract = requests.cookies.extract_cookies_to_jar
            extract(self.session.cookies, prepared, response.raw)  # type: ignore[no-untyped-call]
        return response

    def _reply(
        self, method: str, url: str, response: requests.Response, deadline: Deadline
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
        length = content_length(response.headers)
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
                chunk = raw.read(min(CHUNK, length - got), decode_content=True)
                if not chunk:
                    break
                buffer[got : got + len(chunk)] = chunk
                got += len(chunk)
            del buffer[got:]
            # Read on to the end (b""): urllib3 then hands the connection back to the pool;
            # an answer left unfinished, an empty 201 say, would cost a new connection.
            raw.read(CHUNK, decode_content=True)
            return buffer
        buffer = bytearray()
        while chunk := raw.read(CHUNK, decode_content=True):
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
        length = content_length(response.headers)
        truncated = len(body) >= ERROR_BODY_LIMIT and (length is None or length > len(body))
        return summarize_error(
            body,
            response.headers.get("Content-Type", ""),
            reason,
            self.redactor,
            truncated=truncated,
        )

    def _failure(
        self, method: str, url: str, exc: BaseException, deadline: Deadline
    ) -> DestinationError:
        """The one place where a failure on the wire is classified."""
        chain = causes(exc)
        if deadline.fired or any(isinstance(e, TIMEOUTS) for e in chain):
            return self._timed_out(method, url)
        host = urlsplit(url).hostname or url
        for e in chain:
            if isinstance(e, ssl.SSLCertVerificationError):
                return PermanentError(
                    self.redactor.scrub(f"{method} {url}: {self._certificate_problem(host, e)}")
                )
        tls = next((e for e in chain if isinstance(e, ssl.SSLError)), None)
        if tls is not None and not isinstance(tls, TLS_CUT):
            return PermanentError(
                self.redactor.scrub(
                    f"{method} {url}: TLS with {host} failed: {ssl_reason(tls)}; check that "
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
            what = "connection lost" if was_sent(chain) else "cannot connect"
            return TransientError(self.redactor.scrub(f"{method} {url}: {what}: {root_words(exc)}"))
        return PermanentError(self.redactor.scrub(f"{method} {url}: {root_words(exc)}"))

    def _certificate_problem(self, host: str, exc: ssl.SSLCertVerificationError) -> str:
        problem = exc.verify_message or ssl_reason(exc)
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
        return any(self.redactor.scrub(str(e)) != str(e) for e in causes(exc))

    def _chain(self, exc: BaseException) -> BaseException | None:
        """``exc`` as the cause of the error raised, unless a secret is in its chain."""
        return None if self._leaks(exc) else exc

    def _excerpt(self, text: str, limit: int) -> str:
        """The start of ``text``, scrubbed and cut (a secret cut in two is dropped whole)."""
        head = drop_partial_secret(
            text[: limit * 2], self.redactor, truncated=len(text) > limit * 2
        )
        return self.redactor.cut(head, limit)


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


def _quiet_insecure_warnings() -> None:
    # One loud line per destination (LazyClient, at start) instead of urllib3's warning on
    # every request.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
