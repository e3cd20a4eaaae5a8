"""sd_notify: what the service manager receives from nxdrop.systemd.Notifier, on a real socket."""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nxdrop.systemd import Notifier


@dataclass
class Manager:
    """The service manager's end: a bound datagram socket and the NOTIFY_SOCKET naming it."""

    address: str
    sock: socket.socket

    def receive(self, timeout: float = 5.0) -> str:
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode("utf-8")

    def pending(self) -> bool:
        """Whether a message is queued; sending is synchronous, so no waiting is needed."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True


@pytest.fixture
def manager() -> Iterator[Manager]:
    # A short folder: socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="nxn") as folder:
        path = os.path.join(folder, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield Manager(path, sock)


@pytest.fixture
def abstract_manager() -> Iterator[Manager]:
    name = f"nxdrop-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        yield Manager("@" + name, sock)


def test_the_life_of_a_service(manager: Manager) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": manager.address})
    assert notifier.active
    assert notifier.ready("0 queued, 0 exporting")
    assert manager.receive() == "READY=1\nSTATUS=0 queued, 0 exporting"
    assert notifier.status("1 queued, 1 exporting")
    assert manager.receive() == "STATUS=1 queued, 1 exporting"
    assert notifier.watchdog()
    assert manager.receive() == "WATCHDOG=1"
    assert notifier.stopping("stopping")
    assert manager.receive() == "STOPPING=1\nSTATUS=stopping"


def test_ready_without_a_status(manager: Manager) -> None:
    Notifier({"NOTIFY_SOCKET": manager.address}).ready()
    assert manager.receive() == "READY=1"


def test_an_abstract_namespace_socket(abstract_manager: Manager) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": abstract_manager.address})
    assert notifier.ready("up")
    assert abstract_manager.receive() == "READY=1\nSTATUS=up"


def test_the_process_environment_is_used_by_default(
    manager: Manager, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With the systemd extra installed this goes through libsystemd, else the built-in sender.
    monkeypatch.setenv("NOTIFY_SOCKET", manager.address)
    assert Notifier().status("from os.environ")
    assert manager.receive() == "STATUS=from os.environ"


def test_status_text_is_utf8(manager: Manager) -> None:
    Notifier({"NOTIFY_SOCKET": manager.address}).status("last: 2024-01-01_titan_1 → cdcs ✓")
    assert manager.receive() == "STATUS=last: 2024-01-01_titan_1 → cdcs ✓"


def test_watchdog_interval_is_half_of_watchdog_sec(manager: Manager) -> None:
    env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "30000000"}
    assert Notifier(env).watchdog_interval == 15.0
    assert Notifier({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval == 15.0


def test_a_watchdog_meant_for_another_process_is_not_ours(manager: Manager) -> None:
    # A child started by the service inherits the variables; only the main process pings.
    env = {"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": "30000000"}
    notifier = Notifier({**env, "WATCHDOG_PID": str(os.getpid() + 1)})
    assert notifier.watchdog_interval is None


@pytest.mark.parametrize("usec", ["", "0", "soon", "-5"])
def test_no_watchdog_without_a_valid_watchdog_usec(manager: Manager, usec: str) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": manager.address, "WATCHDOG_USEC": usec})
    assert notifier.watchdog_interval is None


def test_outside_systemd_everything_is_a_no_op(manager: Manager) -> None:
    notifier = Notifier({"WATCHDOG_USEC": "30000000"})
    assert not notifier.active
    assert notifier.watchdog_interval is None
    assert not notifier.ready("up")
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not manager.pending()


def test_a_vanished_manager_is_not_an_error(manager: Manager) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": manager.address + ".gone"})
    assert notifier.active
    assert not notifier.ready()
    assert not notifier.watchdog()
