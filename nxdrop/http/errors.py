"""What went wrong on the wire, in words: error answers summarised, failures classified.

Everything here is pure: the client (:mod:`nxdrop.http.client`) decides with it whether a
failure is worth a retry and what message, scrubbed of every secret, it raises.
"""

from __future__ import annotations

import email.utils
import json
import re
import ssl
import time
from collections.abc import Mapping
from html import unescape

import requests
import urllib3

from nxdrop.redact import Redactor

#: Characters of the server's own words kept in an error message.
SUMMARY_LIMIT = 300


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
TIMEOUTS = (requests.Timeout, urllib3.exceptions.ReadTimeoutError, TimeoutError)
# The peer closed the connection during the handshake: a lost connection, not a TLS problem.
TLS_CUT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def causes(exc: BaseException) -> list[BaseException]:
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


def root_words(exc: BaseException) -> str:
    """The innermost error's words (``[Errno 111] Connection refused``)."""
    chain = causes(exc)
    leaves = [e for e in chain if not any(c is not e for c in causes(e))]
    root = (leaves or chain)[-1]
    return str(root) or type(root).__name__


def was_sent(chain: list[BaseException]) -> bool:
    # A reset or an early close after the connection was made, rather than no connection.
    return not any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in chain)


def ssl_reason(exc: ssl.SSLError) -> str:
    """OpenSSL's words without its codes: ``wrong version number``."""
    text = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    return re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or str(exc.reason or exc)


def content_length(headers: Mapping[str, str]) -> int | None:
    try:
        length = int(headers.get("Content-Length", ""))
    except ValueError:
        return None
    return length if length >= 0 else None
