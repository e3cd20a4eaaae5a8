"""systemd glue: ``sd_notify`` (READY, STATUS, WATCHDOG, STOPPING) with or without systemd-python.

With the ``systemd`` extra installed, ``systemd.daemon.notify`` does the sending; without
it, a few lines of the same protocol: one datagram to ``$NOTIFY_SOCKET``.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)


def _builtin_send(address: str) -> Callable[[str], bool]:
    if address.startswith("@"):
        address = "\0" + address[1:]  # abstract namespace socket

    def send(message: str) -> bool:
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                # Never block the main loop on a manager that does not read: drop instead.
                sock.sendto(message.encode("utf-8"), socket.MSG_DONTWAIT, address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", address, exc)
            return False
        return True

    return send


def _library_send() -> Callable[[str], bool] | None:
    try:
        from systemd import daemon  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    return lambda message: bool(daemon.notify(message))


class Notifier:
    """Talks to the service manager; every method is a no-op outside systemd."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._send: Callable[[str], bool] | None = None
        if address:
            # systemd-python reads $NOTIFY_SOCKET itself; use it only for the real environment.
            library = _library_send() if environ is None else None
            self._send = library or _builtin_send(address)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # The watchdog is ours only if the manager listens and meant this very process.
        ours = self._send is not None and (not pid or pid == str(os.getpid()))
        self.watchdog_usec = int(usec) if ours and usec.isdigit() else 0

    @property
    def active(self) -> bool:
        """Whether a service manager listens."""
        return self._send is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to ping (half of ``WatchdogSec=``), or ``None`` without a watchdog."""
        return self.watchdog_usec / 2_000_000 if self.watchdog_usec else None

    def notify(self, message: str) -> bool:
        """Send raw ``KEY=value`` lines."""
        return self._send(message) if self._send is not None else False

    def ready(self, status: str = "") -> bool:
        """READY=1, with a first STATUS."""
        return self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def status(self, text: str) -> bool:
        """The line ``systemctl status`` shows."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """WATCHDOG=1: send only while the observer and the workers are healthy."""
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """STOPPING=1."""
        return self.notify("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))
