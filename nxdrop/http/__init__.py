"""HTTP for the built-in destinations: a total deadline per request, capped answers,
failures classified once, secrets masked.

- :mod:`~nxdrop.http.client`: :class:`HttpClient`, the one place where the wire meets nxdrop;
- :mod:`~nxdrop.http.deadline`: every request within ``NX_HTTP_TIMEOUT``, all of it;
- :mod:`~nxdrop.http.bodies`: a record sent and received without a copy of it;
- :mod:`~nxdrop.http.errors`: error answers in a line, failures told apart;
- :mod:`~nxdrop.http.urls`: base URLs checked and joined;
- :mod:`~nxdrop.http.lazy`: a destination's client, made at its first request.

Each name is imported from its module when it is first used, so that a process that sends
nothing (``run --once`` on an empty folder, ``status``) never imports ``requests``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from nxdrop.http.lazy import LazyClient
from nxdrop.http.urls import check_base_url, join_url

if TYPE_CHECKING:
    from nxdrop.http.bodies import (
        JsonString,
        RawJsonString,
        StreamedBody,
        json_body,
        loads_keeping_raw,
        multipart_body,
    )
    from nxdrop.http.client import (
        ERROR_BODY_LIMIT,
        MIN_BODY_LIMIT,
        TRANSIENT_STATUSES,
        HttpClient,
        Reply,
        body_limit,
    )
    from nxdrop.http.errors import SUMMARY_LIMIT, retry_after, summarize_error

_MODULE_OF = {
    **dict.fromkeys(
        ("JsonString", "RawJsonString", "StreamedBody", "json_body", "loads_keeping_raw",
         "multipart_body"),
        "bodies",
    ),
    **dict.fromkeys(
        ("ERROR_BODY_LIMIT", "MIN_BODY_LIMIT", "TRANSIENT_STATUSES", "HttpClient", "Reply",
         "body_limit"),
        "client",
    ),
    **dict.fromkeys(("SUMMARY_LIMIT", "retry_after", "summarize_error"), "errors"),
}  # fmt: skip


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)


__all__ = [
    "ERROR_BODY_LIMIT",
    "MIN_BODY_LIMIT",
    "SUMMARY_LIMIT",
    "TRANSIENT_STATUSES",
    "HttpClient",
    "JsonString",
    "LazyClient",
    "RawJsonString",
    "Reply",
    "StreamedBody",
    "body_limit",
    "check_base_url",
    "join_url",
    "json_body",
    "loads_keeping_raw",
    "multipart_body",
    "retry_after",
    "summarize_error",
]
