"""A test destination plugin that needs no server: it waits for a gate file, and logs calls.

On ``PYTHONPATH`` (with the ``.dist-info`` beside it) it is found through the entry point
``nxdrop.destinations: slow``, like any installed plugin. It is enabled when
``SLOWDEST_DIR`` is set. Each export appends ``start <session> <sha256> <bytes>`` to
``$SLOWDEST_DIR/calls.log``, waits until ``$SLOWDEST_DIR/gate`` exists (at most
``SLOWDEST_TIMEOUT`` seconds, like an HTTP timeout), then appends ``done <session>``.
With ``SLOWDEST_MODE=transient`` every call fails as a busy server does (a transient error
with ``Retry-After: 0.2``), so nxdrop keeps retrying.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from nxdrop.destinations import ExportResult
from nxdrop.exceptions import DestinationError, TransientError


def _log(folder: Path, line: str) -> None:
    # One write() on an O_APPEND file: lines from parallel workers never interleave.
    fd = os.open(folder / "calls.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


class SlowDestination:
    """Succeeds once the gate is open; fails when it stays shut for ``SLOWDEST_TIMEOUT`` s."""

    name = "slow"
    priority = int(os.environ.get("SLOWDEST_PRIORITY", "60"))

    @property
    def enabled(self) -> bool:
        return bool(os.environ.get("SLOWDEST_DIR"))

    def validate_config(self) -> tuple[bool, str | None]:
        return (True, None) if self.enabled else (False, "SLOWDEST_DIR is not set")

    def export(self, context: Any) -> ExportResult:
        folder = Path(os.environ["SLOWDEST_DIR"])
        content: bytes = context.content
        digest = hashlib.sha256(content).hexdigest()
        session = context.session_identifier
        _log(folder, f"start {session} {digest} {len(content)}")
        if os.environ.get("SLOWDEST_MODE") == "transient":
            raise TransientError("busy, try again", status_code=503, retry_after=0.2)
        give_up = time.monotonic() + float(os.environ.get("SLOWDEST_TIMEOUT", "30"))
        while not (folder / "gate").exists():
            if time.monotonic() > give_up:
                _log(folder, f"timeout {session}")
                raise DestinationError("the gate stayed shut")
            time.sleep(0.02)  # the fake's own pace, as a slow server's
        _log(folder, f"done {session}")
        return ExportResult(success=True, destination_name=self.name, record_id=session)
