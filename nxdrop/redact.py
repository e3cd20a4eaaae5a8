"""Keeping secrets out of everything nxdrop writes: one redactor, built once from the settings.

The HTTP client scrubs every message it raises, the log handlers every line, and the store
every error it keeps, all with the same :class:`Redactor`. Text is scrubbed *before* it is
cut to length, so a secret that straddles the cut cannot survive in part.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import quote

if TYPE_CHECKING:
    from nxdrop.settings import Settings

MASK = "***"


class Redactor:
    """Replaces every configured secret (and its URL-encoded form) with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        forms = {form for s in secrets if s for form in (s, quote(s, safe=""))}
        # Longest first: a secret that contains another is masked whole.
        self.secrets = sorted(forms, key=len, reverse=True)

    @classmethod
    def from_settings(cls, settings: Settings) -> Redactor:
        """A redactor of every secret in ``settings`` (tokens and API keys)."""
        return cls(settings.secret_values())

    def scrub(self, text: str) -> str:
        """``text`` with every secret masked."""
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def cut(self, text: str, limit: int) -> str:
        """``text`` scrubbed, then cut to ``limit`` characters (an ellipsis marks the cut)."""
        text = self.scrub(text)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    def __bool__(self) -> bool:
        return bool(self.secrets)
