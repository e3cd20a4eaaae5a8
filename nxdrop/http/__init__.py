"""HTTP for the built-in destinations: a total deadline per request, capped answers,
failures classified once, secrets masked.

- :mod:`~nxdrop.http.client`: :class:`HttpClient`, the one place where the wire meets nxdrop;
- :mod:`~nxdrop.http.deadline`: every request within ``NX_HTTP_TIMEOUT``, all of it;
- :mod:`~nxdrop.http.bodies`: a record sent and received without a copy of it;
- :mod:`~nxdrop.http.errors`: error answers in a line, failures told apart.
"""

from __future__ import annotations

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
    check_base_url,
    join_url,
)
from nxdrop.http.errors import SUMMARY_LIMIT, retry_after, summarize_error

__all__ = [
    "ERROR_BODY_LIMIT",
    "MIN_BODY_LIMIT",
    "SUMMARY_LIMIT",
    "TRANSIENT_STATUSES",
    "HttpClient",
    "JsonString",
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
