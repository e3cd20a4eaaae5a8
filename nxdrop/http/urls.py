"""Base URLs of destinations: checked when the settings are read, joined for each request.

No ``requests`` here: a destination checks its URL when it is configured, long before (and
whether or not) it sends anything.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from nxdrop.exceptions import ConfigError


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
