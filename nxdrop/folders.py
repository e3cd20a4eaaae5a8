"""The drop folder and the working folder a process claims records into.

A record is taken by renaming it out of the drop folder into this process's hidden working
folder, ``<drop>/.nxdrop/work/<host>-<n>/`` (the maildir pattern): a rename is atomic on
every filesystem, NFS included, so of two processes that reach for one file exactly one
gets it, and a file written or renamed into the drop folder afterwards, under the same name,
is a new file, taken in its turn. From the working folder the record moves on to
``uploaded/`` or ``failed/``, or back into the drop folder. Every move is one rename that
never replaces an existing name, so a file is always in exactly one place.

Each working folder belongs to the process that holds the ``flock`` of its lock file
``.nxdrop/work/<host>-<n>.lock``. A process starting on a host takes the first free slot and
puts back what every unlocked (dead) slot of that host still holds. The slot name is also
the ``worker`` of the process's rows in the database, so a later step can let another host
take over a dead host's slot through the database.

Any name the kernel allows is handled: copy names and the name of a failed record's reason
(:func:`error_file_for`) are shortened to fit in 255 bytes, never refused.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

from nxdrop.exceptions import ConfigError
from nxdrop.fsops import (
    XML,
    base_stem,
    copy_names,
    fit_name,
    move_to_free_name,
    rename_noreplace,
    write_atomically,
)
from nxdrop.records import escape_name, session_identifier_of

log = logging.getLogger(__name__)

UPLOADED = "uploaded"
FAILED = "failed"
STATE = ".nxdrop"
ERROR_SUFFIX = ".error.json"
PARTIAL_SUFFIXES = (".part", ".tmp", "~")
_UNSAFE_HOST = re.compile(r"[^A-Za-z0-9._-]+")
# Room for ``-<n>.lock`` after the host part of a slot name.
_HOST_MAX = 200


def host_prefix(host: str | None = None) -> str:
    """The start of this host's slot names: its name, made safe for a file name."""
    return _UNSAFE_HOST.sub("_", host or socket.gethostname())[:_HOST_MAX] or "host"


def error_file_for(record_path: Path) -> Path:
    """Where the reason of the failed record at ``record_path`` is: ``<name>.error.json``.

    A name too long for that suffix gets a shortened one (:func:`~nxdrop.fsops.fit_name`),
    found again from the record's name alone: by ``retry``, which deletes it, and by anyone
    reading ``failed/``.
    """
    return record_path.with_name(fit_name(record_path.name, ERROR_SUFFIX))


def is_record_name(name: str) -> bool:
    """A name the drop folder treats as a record (links are records too, to be refused)."""
    return (
        name.endswith(XML)
        and not name.startswith(".")
        and not name.endswith(PARTIAL_SUFFIXES)
        and len(name) > len(XML)
    )


class DropFolder:
    """The watched folder, with ``uploaded/``, ``failed/`` and the hidden ``.nxdrop/``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uploaded = path / UPLOADED
        self.failed = path / FAILED
        self.work = path / STATE / "work"

    def create(self) -> None:
        """Make the folders (and only them); a missing parent is made too."""
        for folder in (self.path, self.uploaded, self.failed, self.work):
            folder.mkdir(parents=True, exist_ok=True)

    def holds(self, path: Path) -> bool:
        """Whether ``path`` lies directly in the drop folder (not in a subfolder)."""
        return path.absolute().parent == self.path.absolute()

    def is_candidate(self, path: Path) -> bool:
        """A record name directly in the drop folder: a regular file or a link (refused later)."""
        if not self.holds(path) or not is_record_name(path.name):
            return False
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return False
        return stat.S_ISREG(mode) or stat.S_ISLNK(mode)

    def scan(self) -> list[tuple[float, str]]:
        """The names of the candidates now in the folder with their mtimes, oldest first.

        Names, not paths: a backlog of 20,000 files costs a few MB, not tens.
        """
        entries: list[tuple[float, str]] = []
        with os.scandir(self.path) as it:
            for entry in it:
                if not is_record_name(entry.name):
                    continue
                try:
                    if entry.is_symlink() or entry.is_file(follow_symlinks=False):
                        entries.append((entry.stat(follow_symlinks=False).st_mtime, entry.name))
                except FileNotFoundError:
                    continue
        entries.sort()
        return entries

    def retry(self, names: list[str] | None = None) -> list[Path]:
        """Move failed records back into the drop folder: every one if ``names`` is None.

        A name is a file in ``failed/`` or a session identifier (all of its failed files).
        Raises ``FileNotFoundError`` naming the first that is neither, before moving any.
        """
        failed = sorted(self._failed_records())
        if names is None:
            sources = failed
        else:
            sources = []
            for name in names:
                found = self._failed_named(name, failed)
                if not found:
                    raise FileNotFoundError(
                        f"{name}: neither a file nor a session in {self.failed}"
                    )
                sources += [p for p in found if p not in sources]
        moved = []
        for source in sources:
            moved.append(move_to_free_name(source, self.path, source.name))
            error_file_for(source).unlink(missing_ok=True)
        return moved

    def slot_alive(self, worker: str) -> bool | None:
        """Whether the process that holds slot ``worker`` lives; ``None`` for another host's
        slot (only the database could tell)."""
        prefix, _, number = worker.rpartition("-")
        if prefix != host_prefix() or not number.isdigit():
            return None
        lock = self.work / f"{worker}.lock"
        if not lock.exists():
            return False
        fd = _try_lock(lock)
        if fd is None:
            return True
        os.close(fd)  # it was free: its process is gone
        return False

    def places(self, session: str) -> list[tuple[str, Path]]:
        """Where the files of ``session`` are now: ``drop``, ``working`` (being exported, or
        left by a process that stopped), ``uploaded``, ``failed`` (its newest first in each)."""
        found: list[tuple[str, Path]] = []
        folders = [("drop", self.path), ("uploaded", self.uploaded), ("failed", self.failed)]
        if self.work.is_dir():
            folders[1:1] = [("working", slot) for slot in sorted(self.work.iterdir())]
        for place, folder in folders:
            try:
                entries = [e for e in os.scandir(folder) if is_record_name(e.name)]
            except (FileNotFoundError, NotADirectoryError):
                continue
            mine = [e for e in entries if escape_name(session_identifier_of(e.name)) == session]
            mine.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime, reverse=True)
            found += [(place, folder / e.name) for e in mine]
        return found

    def _failed_records(self) -> Iterator[Path]:
        with os.scandir(self.failed) as it:
            for entry in it:
                if is_record_name(entry.name):
                    yield self.failed / entry.name

    def _failed_named(self, name: str, failed: list[Path]) -> list[Path]:
        candidate = Path(name)
        if candidate.parent == Path():  # a bare name: a file in failed/, else a session
            # A name is also matched as nxdrop shows it (escaped), so an operator can paste
            # a name with invalid UTF-8 or a newline from ``nxdrop status`` or the log.
            files = [p for p in failed if _spelled(name, p.name)]
            return files or [p for p in failed if _spelled(name, base_stem(p.name))]
        in_failed = candidate.absolute().parent == self.failed.absolute()
        path = self.failed / candidate.name
        return [path] if in_failed and path in failed else []


@dataclass
class Recovery:
    """What :meth:`WorkFolder.acquire` found left behind by dead processes of this host."""

    workers: list[str] = field(default_factory=list)  # slots whose owner died
    put_back: list[Path] = field(default_factory=list)  # their records, back in the drop folder


class WorkFolder:
    """This process's working folder: claim a record into it, move it on from it."""

    def __init__(self, drop: DropFolder, worker: str, lock_fd: int) -> None:
        self.drop = drop
        self.worker = worker
        self.path = drop.work / worker
        self._lock_fd = lock_fd

    @classmethod
    def acquire(cls, drop: DropFolder, host: str | None = None) -> tuple[WorkFolder, Recovery]:
        """Take the first free slot of this host; put back what every dead slot holds.

        Raises :class:`ConfigError` naming ``NX_DROP_PATH`` when the drop folder cannot be
        used (it is a file, or this user may not write in it): every record would fail.
        """
        try:
            return cls._acquire(drop, host)
        except OSError as exc:
            where = exc.filename if exc.filename is not None else drop.path
            # mkdir's EEXIST here means a file sits where a folder must be.
            why = "not a folder" if isinstance(exc, FileExistsError) else exc.strerror or exc
            raise ConfigError(
                f"NX_DROP_PATH={escape_name(str(drop.path))}: the drop folder cannot be used: "
                f"{escape_name(str(where))}: {why}"
            ) from None

    @classmethod
    def _acquire(cls, drop: DropFolder, host: str | None) -> tuple[WorkFolder, Recovery]:
        drop.create()
        for folder in (drop.path, drop.uploaded, drop.failed, drop.work):
            if not os.access(folder, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "not writable by this user", str(folder))
        prefix = host_prefix(host)
        recovery = Recovery()
        mine: WorkFolder | None = None
        for n in count():
            worker = f"{prefix}-{n}"
            lock_path = drop.work / f"{worker}.lock"
            known = lock_path.exists() or (drop.work / worker).exists()
            if mine is not None and not known:
                break  # slots are numbered from 0: nothing beyond the first unknown one
            fd = _try_lock(lock_path)
            if fd is None:
                continue  # alive: another process of this host owns it
            slot = cls(drop, worker, fd)
            recovery.workers.append(worker)
            recovery.put_back += slot._put_back_all()
            if mine is None:
                mine = slot
                slot.path.mkdir(exist_ok=True)
            else:
                slot.release()
        assert mine is not None
        return mine, recovery

    def release(self) -> None:
        """Give up the slot (at exit; the kernel does it when the process dies)."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def claim(self, path: Path) -> Path | None:
        """Rename ``path`` into the working folder; ``None`` if it is gone (taken by another)."""
        try:
            return move_to_free_name(path, self.path, path.name)
        except FileNotFoundError:
            return None

    def put_back(self, work_path: Path, name: str) -> Path:
        """Return a claimed record to the drop folder, as ``name`` or a free copy name."""
        return move_to_free_name(work_path, self.drop.path, name)

    def to_uploaded(self, work_path: Path, name: str) -> Path:
        """Move an exported record into ``uploaded/``; its new path."""
        return move_to_free_name(work_path, self.drop.uploaded, name)

    def to_failed(self, work_path: Path, name: str, report: dict[str, Any]) -> Path:
        """Move a record into ``failed/``, its reason (:func:`error_file_for`) written first.

        Written first, so a crash between the two steps never leaves a failed record
        without its reason (at worst a reason without its record, overwritten later).
        """
        data = (json.dumps(report, indent=2, default=str) + "\n").encode()
        for target in copy_names(self.drop.failed, name):
            if os.path.lexists(target):
                continue
            write_atomically(error_file_for(target), data)
            try:
                rename_noreplace(work_path, target)
            except FileExistsError:
                continue
            return target
        raise AssertionError("unreachable: copy_names is endless")

    def held(self) -> list[Path]:
        """The records now in the working folder."""
        with os.scandir(self.path) as it:
            return [self.path / entry.name for entry in it]

    def _put_back_all(self) -> list[Path]:
        try:
            held = self.held()
        except FileNotFoundError:
            return []
        back = [self.put_back(path, path.name) for path in held]
        if back:
            log.warning(
                "%d record%s left in %s by a process that stopped: put back into the drop folder",
                len(back),
                "" if len(back) == 1 else "s",
                self.path,
            )
        return back


def _spelled(given: str, name: str) -> bool:
    """Whether ``given`` is ``name`` itself or ``name`` as nxdrop shows it (escaped)."""
    return given == name or given == escape_name(name)


def _try_lock(lock_path: Path) -> int | None:
    """An fd holding the ``flock`` of ``lock_path``, or ``None`` if another process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            os.close(fd)
            raise
        # No lock service (an NFS mount without lockd, say): the slot is ours unchecked.
        log.warning(
            "%s: this filesystem cannot lock files (%s): run only one nxdrop per host "
            "on this drop folder",
            lock_path,
            exc.strerror,
        )
    return fd
