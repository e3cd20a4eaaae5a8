"""The database connection, and its faults: a fault is waited out, never a crash.

:class:`Database` opens ``NX_DB_URL`` lazily and runs every statement through
:meth:`Database.run`, which tells a configuration error (exit 2) from a fault that passes:
a connection cut (a PostgreSQL restart, a failover, ``pg_terminate_backend``) is
reconnected, a locked or full SQLite file is waited for, and a statement is retried within
a budget before :class:`~nxdrop.exceptions.DatabaseUnavailable` says the database is down.
A deleted or replaced SQLite file is noticed before the next statement and reopened.

SQLite is one connection shared by the threads behind a lock (its writes are serialised
anyway); PostgreSQL is a connection per thread, as Peewee keeps them.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import peewee
from playhouse.db_url import connect

from nxdrop.exceptions import ConfigError, DatabaseUnavailable, NxdropError

log = logging.getLogger(__name__)

T = TypeVar("T")

RETRY_SECONDS = 10.0  # how long one statement is retried before the database counts as down
SQLITE_PRAGMAS = {
    "journal_mode": "wal",
    "busy_timeout": 30_000,
    "cache_size": -1024,  # KiB: memory stays flat however large the log
    "synchronous": "normal",
    "foreign_keys": 1,
}
# The daemon's main loop checkpoints SQLite's write-ahead log (Database.checkpoint): the
# writers' automatic checkpoints, which make one worker's commit copy the log into the
# database and sync both files now and then, are off from then on.
_NO_AUTOCHECKPOINT = "PRAGMA wal_autocheckpoint = 0"
POSTGRES_DEFAULTS = {
    "application_name": "nxdrop",
    "connect_timeout": "5",
    # A server that vanished without closing the connection is noticed within a minute.
    "keepalives": "1",
    "keepalives_idle": "30",
    "keepalives_interval": "10",
    "keepalives_count": "3",
}
# What the PostgreSQL server or libpq says when the configuration is wrong, not the server.
_POSTGRES_CONFIG_ERRORS = (
    "password authentication failed",
    "does not exist",
    "no pg_hba.conf entry",
    "role",
    "invalid dsn",
    "invalid connection option",
)


class Database:
    """A Peewee database opened from ``url``; ``prepare`` makes its tables on each open."""

    def __init__(
        self,
        url: str,
        prepare: Callable[[peewee.Database], None],
        *,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.url = url
        self.prepare = prepare
        self.retry_seconds = retry_seconds
        self.sqlite_path = _sqlite_path(url)
        self.db = _make(url, self.sqlite_path)
        self._shared = self.sqlite_path is not None
        self._lock = threading.RLock()
        self._opened = False
        self._faulted = False  # since the last successful open: say when it is over
        self._file: tuple[int, int] | None = None
        self._checkpoints_taken = False  # the main loop checkpoints, not the writers
        self._checkpoint_failed = False  # said once, until one works again
        # Work done through :meth:`run`, and how much of it the last checkpoint covered: an
        # idle daemon's checkpoint has nothing to copy, and costs a wakeup's worth of CPU.
        self._runs = 0
        self._runs_checkpointed = -1

    @property
    def is_postgres(self) -> bool:
        return isinstance(self.db, peewee.PostgresqlDatabase)

    @property
    def param(self) -> str:
        """The driver's placeholder (``?`` or ``%s``)."""
        return str(self.db.param)

    def open(self) -> None:
        """Connect and make the tables now; raises :class:`ConfigError` or
        :class:`DatabaseUnavailable` (once, without retrying)."""
        with self._guard():
            pass

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """Run one statement (its own transaction), retrying faults; the cursor."""
        sql = sql.replace("?", self.param)
        return self.run(lambda: self.db.execute_sql(sql, params))

    def run(self, work: Callable[[], T], *, recheck: Callable[[], T | None] | None = None) -> T:
        """``work()`` against the database, retried while the database has a fault.

        ``recheck`` is asked before a retry whether the failed try took effect after all
        (its answer lost with the connection): for statements that must not run twice.
        """
        self._runs += 1  # the GIL makes a lost increment rare, and one is found next time
        deadline = time.monotonic() + self.retry_seconds
        delay, tried = 0.05, False
        while True:
            try:
                with self._guard():
                    if tried and recheck is not None:
                        done = recheck()
                        if done is not None:
                            return done
                    return work()
            except DatabaseUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.debug("database fault, retrying in %.2f s: %s", delay, exc)
            tried = True
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A transaction of several statements (no retry: the caller decides)."""
        with self._guard(), self.db.atomic():
            yield

    def checkpoint(self) -> None:
        """Copy SQLite's write-ahead log into the database file now, on a connection of its
        own that waits for nobody (``PASSIVE``); nothing for PostgreSQL. The first call
        takes checkpoints over from the writers, whose commits then never pay for one: call
        it regularly from one thread (the daemon's main loop does, every second). Nothing
        is done when no statement ran since the last one. Never raises: a checkpoint that
        cannot run now runs at the next call."""
        runs = self._runs
        if not self.checkpoint_due():
            return
        try:
            if not self._checkpoints_taken:
                self.run(lambda: self.db.execute_sql(_NO_AUTOCHECKPOINT))
                self._checkpoints_taken = True
            # mode=rw: a database file that was deleted is not made again here.
            side = sqlite3.connect(f"file:{self.sqlite_path}?mode=rw", uri=True, timeout=0)
            try:
                _, frames, copied = side.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                side.close()
        except NxdropError as exc:  # the database is down: the outage says so
            log.debug("no checkpoint now: %s", exc)
        except sqlite3.Error as exc:
            if self._checkpoint_failed or "locked" in str(exc):  # busy: it runs next time
                log.debug("no checkpoint now: %s", exc)
                return
            self._checkpoint_failed = True
            log.warning(
                "cannot copy the write-ahead log into %s (%s): the log grows until it can",
                self.sqlite_path,
                exc,
            )
        else:
            self._checkpoint_failed = False
            if copied == frames:  # a reader kept none of it back: all done until more runs
                self._runs_checkpointed = runs

    def checkpoint_due(self) -> bool:
        """Whether statements ran since the last complete checkpoint (SQLite only)."""
        return self.sqlite_path is not None and self._runs != self._runs_checkpointed

    def close(self) -> None:
        """Close this thread's connection (the shared one, for SQLite)."""
        with self._lock if self._shared else nullcontext():
            self._reset()

    # -- faults --------------------------------------------------------------------------

    @contextmanager
    def _guard(self) -> Iterator[None]:
        """Hold the SQLite lock, (re)open if needed, and turn driver errors into ours."""
        with self._lock if self._shared else nullcontext():
            try:
                if self._shared:
                    self._check_file()
                if not self._opened or self.db.is_closed():
                    self._open()
                yield
            except peewee.DatabaseError as exc:
                if isinstance(exc, peewee.IntegrityError | peewee.ProgrammingError):
                    raise  # a bug of ours, not a fault of the database
                self._reset()
                self._faulted = True
                raise self._fault(exc) from exc
            except peewee.InterfaceError as exc:
                self._reset()
                self._faulted = True
                raise self._fault(exc) from exc

    def _open(self) -> None:
        if self.sqlite_path is not None:
            try:
                self.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(
                    f"NX_DB_URL: cannot make the folder {self.sqlite_path.parent}: {exc.strerror}"
                ) from exc
        self.db.connect(reuse_if_open=True)
        if self._checkpoints_taken:  # a connection made again keeps leaving them to us
            self.db.execute_sql(_NO_AUTOCHECKPOINT)
        with self.db.atomic():
            self.prepare(self.db)
        if self.sqlite_path is not None:
            st = self.sqlite_path.stat()
            self._file = (st.st_dev, st.st_ino)
        self._opened = True
        if self._faulted:
            self._faulted = False
            log.info("database reachable again")

    def _check_file(self) -> None:
        """A SQLite file deleted or replaced under us is reopened, not written on in vain."""
        if self._file is None or self.sqlite_path is None:
            return
        try:
            st = self.sqlite_path.stat()
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except FileNotFoundError:
            current = None
        if current == self._file:
            return
        what = "deleted" if current is None else "replaced"
        log.error(
            "the database file %s was %s while nxdrop ran: reopening it; what was logged "
            "before is in the old file, if anywhere",
            self.sqlite_path,
            what,
        )
        self._reset()
        if current is None:  # the old journal must not be replayed into a new file
            for suffix in ("-wal", "-shm"):
                Path(f"{self.sqlite_path}{suffix}").unlink(missing_ok=True)
        self._file = None

    def _reset(self) -> None:
        try:
            self.db.close()
        except peewee.PeeweeException:
            self.db._state.reset()  # a broken connection: forget it all the same

    def _fault(self, exc: Exception) -> Exception:
        """A :class:`ConfigError` for what the operator must fix, else unavailable."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if self.sqlite_path is not None:
            if "unable to open database file" in text and not self._opened:
                return ConfigError(f"NX_DB_URL: cannot open {self.sqlite_path}: {text}")
        elif not self._opened and any(s in text.lower() for s in _POSTGRES_CONFIG_ERRORS):
            return ConfigError(f"NX_DB_URL ({_safe_url(self.url)}): {text}")
        return DatabaseUnavailable(f"{_safe_url(self.url)}: {text}")


def _sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, read as Peewee reads it (``sqlite:////abs``)."""
    if not url.startswith("sqlite:"):
        return None
    path = urlsplit(url).path[1:]
    return Path(path) if path and path != ":memory:" else None


def _make(url: str, sqlite_path: Path | None) -> Any:
    """The Peewee database for ``url``, not connected; a :class:`ConfigError` if unusable."""
    try:
        if url.startswith("sqlite:"):
            return connect(
                url,
                pragmas=SQLITE_PRAGMAS,
                timeout=30,
                field_types={"TIMESTAMPTZ": "TEXT"},
                thread_safe=False,  # one connection, shared behind Database's lock
                check_same_thread=False,
                autoconnect=True,
            )
        given = dict(parse_qsl(urlsplit(url).query))
        extra = {k: v for k, v in POSTGRES_DEFAULTS.items() if k not in given}
        return connect(url, **extra) if url.startswith("postgres") else connect(url)
    except Exception as exc:
        # Only the scheme: a PostgreSQL URL may carry a password.
        raise ConfigError(f"NX_DB_URL ({_safe_url(url)}): {exc}") from exc


def _safe_url(url: str) -> str:
    """The URL without its password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()
