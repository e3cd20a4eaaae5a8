"""The daemon's face to the service manager: signals, READY, STATUS, WATCHDOG, STOPPING.

Signal handlers only count and wake the main loop; the loop acts. SIGHUP does not reload
the configuration (the loop logs that it did not): restart the service instead.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

from nxdrop.systemd import Notifier

log = logging.getLogger(__name__)

STATUS_EVERY = 0.5  # at most two STATUS= a second, however fast the records go
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Service:
    """Counts stop signals, notes SIGHUP, and keeps systemd informed."""

    def __init__(self, notifier: Notifier, wake: Callable[[], None]) -> None:
        self.notifier = notifier
        self.wake = wake
        self.signals = 0  # SIGTERM/SIGINT received
        self._hup = False
        self._sent_status = ""
        self._next_status = self._next_ping = time.monotonic()

    @contextmanager
    def signal_handlers(self) -> Iterator[None]:
        """Install the handlers (in the main thread only) for the ``with`` block."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (*STOP_SIGNALS, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Flags only, and a wake-up (a SimpleQueue.put, documented safe here).
        if signum == signal.SIGHUP:
            self._hup = True
        else:
            self.signals += 1
        self.wake()

    def take_hup(self) -> bool:
        """Whether a SIGHUP came since the last call."""
        hup, self._hup = self._hup, False
        return hup

    def ready(self, status: str) -> None:
        """READY=1 with the first STATUS."""
        self._sent_status = status
        self.notifier.ready(status)

    def stopping(self, status: str) -> None:
        """STOPPING=1."""
        self.notifier.stopping(status)

    def tick(self, healthy: bool, status: Callable[[], str]) -> None:
        """Ping the watchdog while ``healthy``; send STATUS when it changed (rate-limited)."""
        now = time.monotonic()
        interval = self.notifier.watchdog_interval
        if interval and now >= self._next_ping and healthy:
            self.notifier.watchdog()
            self._next_ping = now + interval
        if now >= self._next_status:
            line = status()
            if line != self._sent_status:
                self._sent_status, self._next_status = line, now + STATUS_EVERY
                self.notifier.status(line)

    def next_wakeup(self, status: str) -> float:
        """When :meth:`tick` has something to do next (``time.monotonic()`` clock)."""
        deadlines = [self._next_ping if self.notifier.watchdog_interval else float("inf")]
        if status != self._sent_status:
            deadlines.append(self._next_status)
        return min(deadlines)
