"""A total deadline per request: connect, TLS, sending and every read within one timeout.

``requests``' timeout bounds each socket operation, so a server that trickles a byte a
second holds a request for ever. Here each request runs inside a :class:`Deadline`: the
connection classes of the session's pools hand every socket they open or reuse to the
deadline of the calling thread, which keeps a duplicate of its file descriptor, and one
shared thread (the reaper) shuts those sockets down when a deadline passes. ``shutdown(2)``
wakes a thread blocked in ``recv``/``send`` at once, on plain and TLS sockets alike.

The reaper and the thread-local "current deadline" are process-wide by nature (the pool's
connection classes are shared); the reaper starts on first use and forgets itself in a
forked child.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import requests
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


class Deadline:
    """The end of one request: the sockets it uses are shut down when it passes.

    It keeps a duplicate file descriptor of each socket handed to it (the original may be
    wrapped in TLS or closed by urllib3 meanwhile; the duplicate is ours, so shutting it down
    can never hit a descriptor number that was reused elsewhere).
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expires = time.monotonic() + seconds
        self.fired = False
        self.done = False
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []

    def left(self) -> float:
        """Seconds until the deadline (never below a millisecond: 0 means "no timeout")."""
        return max(0.001, self.expires - time.monotonic())

    def watch(self, sock: socket.socket) -> None:
        """Cut ``sock`` when the deadline passes (at once if it has)."""
        try:
            dup = socket.fromfd(sock.fileno(), sock.family, sock.type)
        except (OSError, ValueError):
            return  # already closed: nothing to cut
        with self._lock:
            if self.done:
                dup.close()
                return
            self._sockets.append(dup)
            if self.fired:
                _cut(dup)

    def fire(self) -> None:
        """The deadline passed: shut down every socket of the request."""
        with self._lock:
            if self.done:
                return
            self.fired = True
            for sock in self._sockets:
                _cut(sock)

    def close(self) -> None:
        """The request is over: nothing is cut any more; the duplicates are closed."""
        with self._lock:
            self.done = True
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            sock.close()
        _reaper.forget(self)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # not connected (any more): nothing to wake
        sock.shutdown(socket.SHUT_RDWR)


class _Reaper:
    """One daemon thread that fires deadlines when they pass; started on first use."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._thread: threading.Thread | None = None
        self._wakes_at = float("inf")  # when the reaper wakes by itself next

    def after_fork(self) -> None:
        """A forked child has no reaper thread, and must not wait on the parent's lock."""
        self._cond = threading.Condition()
        self._heap = []
        self._thread = None
        self._wakes_at = float("inf")

    def add(self, deadline: Deadline) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline.expires, next(self._order), deadline))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="nxdrop-http-deadlines", daemon=True
                )
                self._thread.start()
            # Woken only for a deadline before its own wakeup: under a stream of requests,
            # each ending long before its deadline, it sleeps on the first deadline it saw
            # and is not woken for every request (two context switches each).
            if deadline.expires < self._wakes_at:
                self._wakes_at = deadline.expires
                self._cond.notify()

    def forget(self, deadline: Deadline) -> None:
        # Requests usually finish long before their deadline: drop finished ones from the
        # top so that an idle daemon has nothing to wake up for.
        with self._cond:
            while self._heap and self._heap[0][2].done:
                heapq.heappop(self._heap)

    def _run(self) -> None:
        while True:
            due: list[Deadline] = []
            with self._cond:
                now = time.monotonic()
                while self._heap and (self._heap[0][2].done or self._heap[0][0] <= now):
                    _, _, deadline = heapq.heappop(self._heap)
                    if not deadline.done:
                        due.append(deadline)
                if not due:
                    self._wakes_at = self._heap[0][0] if self._heap else float("inf")
                    self._cond.wait(self._wakes_at - now if self._heap else None)
                    continue
            for deadline in due:
                deadline.fire()


_reaper = _Reaper()
os.register_at_fork(after_in_child=_reaper.after_fork)
_current = threading.local()  # the deadline of the request this thread is making


def _watch(sock: socket.socket | None) -> None:
    deadline: Deadline | None = getattr(_current, "deadline", None)
    if deadline is not None and sock is not None:
        deadline.watch(sock)


class _WatchedHTTPConnection(HTTPConnection):
    """Hands every socket it opens or reuses to the calling thread's deadline."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)  # before any TLS handshake: a trickled handshake is cut too
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _watch(self.sock)  # a connection reused from the pool
        super().request(*args, **kwargs)


class _WatchedHTTPSConnection(HTTPSConnection):
    """:class:`_WatchedHTTPConnection` for https."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()
        _watch(sock)
        return sock

    def request(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        _watch(self.sock)
        super().request(*args, **kwargs)


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _WatchedHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPSConnection


_POOLS: dict[str, type[HTTPConnectionPool]] = {"http": _HTTPPool, "https": _HTTPSPool}


class _Session(requests.Session):
    """A session that never looks at where a redirect points.

    nxdrop follows no redirect (one would turn a POST into a GET: CDCS answers 301 for a
    missing slash), and ``requests`` even with ``allow_redirects=False`` reads a redirect's
    whole body, unbounded, to prepare the next request: here a 3xx is an answer like any
    other, reported by :meth:`nxdrop.http.HttpClient.request`.
    """

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        return None


class _Adapter(requests.adapters.HTTPAdapter):
    """requests' adapter with pools of watched connections (proxied ones too)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if not proxy.lower().startswith("socks"):  # SOCKS pools are classes of their own
            manager.pool_classes_by_scheme = _POOLS
        return manager


@contextmanager
def deadline_of(seconds: float) -> Iterator[Deadline]:
    """Run the requests of the ``with`` block (in this thread) within ``seconds``."""
    deadline = Deadline(seconds)
    _current.deadline = deadline
    _reaper.add(deadline)
    try:
        yield deadline
    finally:
        _current.deadline = None
        deadline.close()


def make_session(base_url: str = "", *, connections: int = 10) -> requests.Session:
    """A ``requests.Session`` whose every request keeps to the deadline it runs in, and that
    never follows (or reads the body of) a redirect.

    The proxy settings of the environment (``HTTPS_PROXY``, ``NO_PROXY``, …) for
    ``base_url`` are read once, here: requests would otherwise read the whole environment
    again on every request (``trust_env``), a millisecond each. ``connections`` is the number
    kept open per host: one per worker, so that no worker opens a connection per request.
    """
    session = _Session()
    adapter = _Adapter(pool_maxsize=max(10, connections))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.proxies.update(requests.utils.get_environ_proxies(base_url) if base_url else {})
    session.trust_env = False
    return session
