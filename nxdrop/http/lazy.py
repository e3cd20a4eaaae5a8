"""A destination's HTTP client, made when its first request needs it.

Every command configures every destination (``status`` and ``destinations`` too, and
``run --once`` on an empty folder), and most of them then send nothing: the client, and
``requests`` with it, are not worth their import until something is sent.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nxdrop.http.client import HttpClient
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)


class LazyClient:
    """The :class:`~nxdrop.http.client.HttpClient` for ``base_url``, made on first use."""

    def __init__(self, base_url: str, settings: Settings, headers: dict[str, str]) -> None:
        self.base_url = base_url
        self._settings, self._headers = settings, headers
        self._client: HttpClient | None = None
        self._lock = threading.Lock()
        if settings.disable_ssl_verify:
            log.warning(
                "NX_DISABLE_SSL_VERIFY is set: TLS certificates are NOT checked; anyone on the "
                "network path can read and change what nxdrop sends, tokens included"
            )

    @property
    def client(self) -> HttpClient:
        """The client, made by the first caller (workers may ask at the same time)."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    from nxdrop.http.client import HttpClient

                    self._client = HttpClient.for_settings(
                        self.base_url, self._settings, self._headers
                    )
        return self._client
