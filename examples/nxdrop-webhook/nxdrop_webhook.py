"""An nxdrop destination that announces each record to a webhook (a chat room, a LIMS).

Configuration, read from the environment like nxdrop's own settings:

- ``NX_WEBHOOK_URL``: where to POST (the destination is off while it is unset)
- ``NX_WEBHOOK_TIMEOUT``: seconds for the request (default 10)

It reads CDCS's result alone (``reads``): it starts once CDCS is done, side by side with
eLabFTW and the archive, and links to the CDCS record.

Every POST carries an ``Idempotency-Key`` header: the SHA-256 of the record's bytes. A post
that nxdrop retries (the reply was lost) or sends again (the file was dropped again) has
the same key, so the receiver can tell it already has this record and ignore the repeat.
"""

from __future__ import annotations

import os

import requests

from nxdrop.destinations import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import PermanentError, TransientError


class WebhookDestination(ExportDestination):
    """POSTs a JSON summary of the record, with the CDCS link when CDCS has it."""

    name = "webhook"
    priority = 40
    reads = frozenset({"cdcs"})

    def __init__(self) -> None:
        self.url = os.environ.get("NX_WEBHOOK_URL", "")
        self.timeout = float(os.environ.get("NX_WEBHOOK_TIMEOUT", "10"))

    @property
    def enabled(self) -> bool:
        """On when ``NX_WEBHOOK_URL`` is set."""
        return bool(self.url)

    @property
    def disabled_reason(self) -> str:
        """Shown by ``nxdrop destinations`` while it is off."""
        return "NX_WEBHOOK_URL is not set"

    @property
    def endpoint(self) -> str:
        """The webhook URL: nxdrop reuses an earlier result only if it was sent here."""
        return self.url

    def validate_config(self) -> tuple[bool, str | None]:
        """Only the URL's form: a webhook usually has nothing harmless to GET."""
        if not self.url.startswith(("http://", "https://")):
            return False, f"NX_WEBHOOK_URL={self.url!r} is not an http(s) URL"
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Send the summary; 5xx and connection trouble are retried by nxdrop."""
        cdcs = context.get_result("cdcs")
        payload = {
            "session_identifier": context.session_identifier,
            "instrument": context.instrument_pid,
            "user": context.user,
            "start": context.dt_from.isoformat() if context.dt_from else None,
            "end": context.dt_to.isoformat() if context.dt_to else None,
            "cdcs_url": cdcs.record_url if cdcs is not None and cdcs.success else None,
        }
        # The record's identity, not the attempt's: a retry or a re-drop of the same bytes
        # sends the same key, and the receiver keeps only the first post.
        headers = {"Idempotency-Key": context.sha256}
        try:
            response = requests.post(self.url, json=payload, headers=headers, timeout=self.timeout)
        except requests.RequestException as exc:
            raise TransientError(f"webhook: {exc}") from exc
        if response.status_code >= 500:
            raise TransientError(
                f"webhook: HTTP {response.status_code}", status_code=response.status_code
            )
        if response.status_code >= 400:
            raise PermanentError(
                f"webhook: HTTP {response.status_code}: {response.text[:200]}",
                status_code=response.status_code,
            )
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=response.headers.get("X-Request-Id"),
            metadata={"status_code": response.status_code, "cdcs_url": payload["cdcs_url"]},
        )
