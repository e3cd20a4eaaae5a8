"""HTTP for the built-in destinations: one session each, timeouts always, errors mapped.

``requests`` exceptions and HTTP error statuses become :class:`TransientError` (worth a
retry) or :class:`PermanentError` here, at the boundary, like httpx's
``map_httpcore_exceptions``; nothing above this module sees a ``requests`` exception.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import requests
import urllib3

from nxdrop import __version__
from nxdrop.exceptions import ConfigError, PermanentError, TransientError

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


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


class HttpClient:
    """A ``requests.Session`` with a base URL, auth headers, TLS settings and a timeout."""

    def __init__(
        self,
        base_url: str,
        *,
        headers: dict[str, str],
        timeout: float,
        verify: bool | str = True,
    ) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.session = requests.Session()
        self.session.headers.update({"User-Agent": f"nxdrop/{__version__}", **headers})
        self.session.verify = verify
        # Redirects would turn a POST into a GET (CDCS answers 301 for a missing slash).
        self.session.max_redirects = 0
        if verify is False:
            _warn_insecure()

    @classmethod
    def for_settings(cls, base_url: str, settings: Settings, headers: dict[str, str]) -> HttpClient:
        """A client with nxdrop's timeout and TLS settings."""
        return cls(
            base_url, headers=headers, timeout=settings.http_timeout, verify=settings.tls_verify
        )

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` under the base URL."""
        return join_url(self.base_url, path)

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request; return a 2xx response or raise a ``DestinationError``."""
        url = path if path.startswith(("http://", "https://")) else self.url(path)
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        try:
            response = self.session.request(method, url, **kwargs)
        except requests.Timeout as exc:
            raise TransientError(f"{method} {url}: timed out after {self.timeout:g} s") from exc
        except requests.ConnectionError as exc:
            raise TransientError(f"{method} {url}: cannot connect: {_root_cause(exc)}") from exc
        except requests.RequestException as exc:
            raise PermanentError(f"{method} {url}: {_root_cause(exc)}") from exc
        if response.is_redirect:
            raise PermanentError(
                f"{method} {url}: redirected to {response.headers.get('Location')!r}; "
                "check the base URL",
                status_code=response.status_code,
            )
        if response.status_code >= 400:
            message = f"{method} {url}: HTTP {response.status_code}: {describe_error(response)}"
            if response.status_code in TRANSIENT_STATUSES:
                raise TransientError(
                    message,
                    status_code=response.status_code,
                    retry_after=retry_after(response),
                )
            raise PermanentError(message, status_code=response.status_code)
        return response

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """``request`` and decode the JSON answer (a non-JSON answer is permanent)."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise PermanentError(
                f"{method} {response.url}: answer is not JSON: {response.text[:200]!r}",
                status_code=response.status_code,
            ) from exc

    def close(self) -> None:
        """Close the pooled connections."""
        self.session.close()


def describe_error(response: requests.Response) -> str:
    """The server's own words for an error, short: ``message``/``detail`` or the text."""
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:300] + "…") if len(text) > 300 else (text or response.reason or "")
    if isinstance(body, dict):
        for key in ("message", "detail", "description", "error"):
            if body.get(key):
                return str(body[key])
    return json.dumps(body)[:300]


def retry_after(response: requests.Response) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    value = response.headers.get("Retry-After")
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


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None or exc.__context__ is not None:
        nxt = exc.__cause__ or exc.__context__
        assert nxt is not None
        exc = nxt
    return str(exc) or type(exc).__name__


def _warn_insecure() -> None:
    # One loud line per client instead of urllib3's warning on every request.
    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    log.warning(
        "NX_DISABLE_SSL_VERIFY is set: TLS certificates are NOT checked; anyone on the "
        "network path can read and change what nxdrop sends, tokens included"
    )
