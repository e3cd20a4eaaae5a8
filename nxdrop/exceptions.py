"""The one exception tree of nxdrop.

Third-party errors (requests, lxml, peewee, python-dotenv) are converted into these at the
boundary where they happen, with ``raise … from`` so the cause stays in the traceback.
"""

from __future__ import annotations


class NxdropError(Exception):
    """Base of every error nxdrop raises on purpose."""


class ConfigError(NxdropError):
    """The configuration is unusable; the message names the variable."""


class RecordError(NxdropError):
    """A record file is unreadable, malformed, too large or invalid; it is never sent."""


class DestinationError(NxdropError):
    """A destination could not take a record.

    ``status_code`` is the HTTP status where there was one, for the operator's error file.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class TransientError(DestinationError):
    """Worth retrying: connection errors, timeouts, 502/503/504, 429.

    ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class PermanentError(DestinationError):
    """Retrying cannot help: bad credentials, a rejected record, a missing template."""


class DatabaseUnavailable(NxdropError):
    """The database cannot be used now (down, unreachable, locked, full): a fault that
    passes. The work pauses and resumes by itself; it is never a configuration error."""
