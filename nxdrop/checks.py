"""``nxdrop check`` and ``nxdrop destinations``: what an operator runs before starting."""

from __future__ import annotations

import os
import sys
from typing import TextIO

from nxdrop.destinations.registry import NOTHING_ENABLED, Found, discover
from nxdrop.exceptions import NxdropError
from nxdrop.redact import Redactor
from nxdrop.settings import Settings
from nxdrop.store import Store

OK, BAD = "✓", "✗"


def disabled_reason(found: Found) -> str:
    """Why a destination is off, in its own words where it has them."""
    if found.error:
        return found.error
    reason = found.destination.disabled_reason if found.destination is not None else None
    return reason or "not configured"


def list_destinations(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Print each destination found with its priority and state; always 0."""
    found = discover(settings)
    width = max((len(f.name) for f in found), default=4)
    redactor = Redactor.from_settings(settings)  # a plugin's error may quote anything
    for f in found:
        state = "enabled" if f.enabled else f"off: {disabled_reason(f)}"
        line = f"{f.name:<{width}}  {f.priority:>4}  {f.source:<22} {state}"
        print(redactor.scrub(line), file=out)
    return 0


def check(settings: Settings, out: TextIO = sys.stdout) -> int:
    """Validate everything that can be validated; a ✓/✗ line each; 0 only if all are ✓.

    Every line is scrubbed of the configured secrets: a reason may quote a server's answer,
    and a server may echo the token it was sent.
    """
    lines: list[tuple[bool, str]] = [(True, f"configuration (strategy {settings.export_strategy})")]
    lines.append(_check_database(settings))
    lines.append(_check_drop_folder(settings))
    found = discover(settings)
    enabled = [f for f in found if f.enabled]
    for f in found:
        if f.config_error or (f.error and f.source != "built-in"):
            lines.append((False, f"destination {f.name}: {f.error}"))
    if not enabled:
        lines.append((False, NOTHING_ENABLED))
    for f in enabled:
        assert f.destination is not None
        try:
            ok, reason = f.destination.validate_config()
        except Exception as exc:  # a plugin's bug is a ✗, not a traceback
            ok, reason = False, f"validate_config raised {type(exc).__name__}: {exc}"
        lines.append(
            (ok, f"destination {f.name} (priority {f.priority})" + ("" if ok else f": {reason}"))
        )
    redactor = Redactor.from_settings(settings)
    for ok, text in lines:
        print(f"{OK if ok else BAD} {redactor.scrub(text)}", file=out)
    return 0 if all(ok for ok, _ in lines) else 1


def _check_database(settings: Settings) -> tuple[bool, str]:
    scheme = settings.database_url.split(":", 1)[0]
    store = Store(settings.database_url)
    try:
        store.open()
    except NxdropError as exc:
        return False, f"database: {exc}"
    finally:
        store.close()
    return True, f"database ({scheme})"


def _check_drop_folder(settings: Settings) -> tuple[bool, str]:
    drop = settings.drop
    existing = drop
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return False, f"drop folder {drop}: {existing} is not a folder (NX_DROP_PATH)"
    if not os.access(existing, os.W_OK | os.X_OK):
        return False, f"drop folder {drop}: {existing} is not writable by this user (NX_DROP_PATH)"
    return True, f"drop folder {drop}" + ("" if existing == drop else " (made at start)")
