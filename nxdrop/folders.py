"""The drop folder: which names are records, and the moves into ``uploaded/`` and ``failed/``.

Every move is one ``rename`` on the same filesystem, so a file is always in exactly one
place, and it never replaces an existing name (``renameat2(RENAME_NOREPLACE)`` where the
kernel and filesystem have it, ``link`` + ``unlink`` otherwise).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from nxdrop.records import RECORD_SUFFIX

UPLOADED = "uploaded"
FAILED = "failed"
ERROR_SUFFIX = ".error.json"
PARTIAL_SUFFIXES = (".part", ".tmp", "~")

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1


def is_record_name(name: str) -> bool:
    """A name the drop folder treats as a record (links are records too, to be refused)."""
    return (
        name.endswith(RECORD_SUFFIX)
        and not name.startswith(".")
        and not name.endswith(PARTIAL_SUFFIXES)
        and len(name) > len(RECORD_SUFFIX)
    )


class DropFolder:
    """The watched folder, with ``uploaded/`` and ``failed/`` inside it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.uploaded = path / UPLOADED
        self.failed = path / FAILED

    def create(self) -> None:
        """Make the folders (and only them); a missing parent is made too."""
        for folder in (self.path, self.uploaded, self.failed):
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

    def scan(self) -> Iterator[Path]:
        """The candidates now in the folder, oldest first (by mtime), lazily sorted."""
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
        for _, name in sorted(entries):
            yield self.path / name

    def move_to_uploaded(self, path: Path) -> Path:
        """Move an exported record into ``uploaded/``; its new path."""
        return self._move(path, self.uploaded)

    def move_to_failed(self, path: Path, report: dict[str, Any]) -> Path:
        """Move a record into ``failed/`` and write ``<name>.error.json`` beside it."""
        target = self._move(path, self.failed)
        error_file = target.with_name(target.name + ERROR_SUFFIX)
        write_atomically(error_file, json.dumps(report, indent=2, default=str) + "\n")
        return target

    def retry(self, names: list[str] | None = None) -> list[Path]:
        """Move failed records back into the drop folder (all of them if ``names`` is None)."""
        if names is None:
            sources = [p for p in sorted(self.failed.iterdir()) if is_record_name(p.name)]
        else:
            sources = [self._failed_path(name) for name in names]
        moved = []
        for source in sources:
            target = self._move(source, self.path)
            error_file = source.with_name(source.name + ERROR_SUFFIX)
            error_file.unlink(missing_ok=True)
            moved.append(target)
        return moved

    def _failed_path(self, name: str) -> Path:
        candidate = Path(name)
        if not candidate.is_absolute() and candidate.parent == Path():
            candidate = self.failed / candidate
        if candidate.absolute().parent != self.failed.absolute() or not candidate.exists():
            raise FileNotFoundError(f"{name}: not a file in {self.failed}")
        return candidate

    def _move(self, source: Path, folder: Path) -> Path:
        folder.mkdir(exist_ok=True)
        return move_without_replacing(source, folder, source.name)


class Claim(Enum):
    """What :func:`claim` found."""

    OURS = "ours"  # locked by this process until the ``with`` block ends
    TAKEN = "taken"  # another process holds it
    GONE = "gone"  # no such file (any more) under this name


@contextmanager
def claim(path: Path) -> Iterator[Claim]:
    """Hold an exclusive ``flock`` on the file at ``path`` for the ``with`` block.

    Two daemons sharing a folder (on one host, or NFS clients, where Linux maps ``flock``
    to network locks) thus never export one file both. The lock is on the file, not the
    name, so it holds across the move into ``uploaded/``; a name that now means another
    file (moved on while we waited) is ``GONE``. A file that cannot be opened (a symbolic
    link, say) is ``OURS`` to refuse.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        yield Claim.GONE
        return
    except OSError:
        # A link (ELOOP), or unreadable: not opened here; the reader refuses it with the reason.
        yield Claim.OURS
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield Claim.TAKEN
            return
        try:
            same = path.lstat().st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        yield Claim.OURS if same else Claim.GONE
    finally:
        os.close(fd)


def move_without_replacing(source: Path, folder: Path, name: str) -> Path:
    """Rename ``source`` to ``folder/name``, or ``name`` with ``.1``, ``.2``… if that is taken."""
    for target in unique_names(folder, name):
        try:
            rename_noreplace(source, target)
        except FileExistsError:
            continue
        return target
    raise AssertionError("unreachable: unique_names is endless")


def rename_noreplace(source: Path, target: Path) -> None:
    """``rename`` that raises ``FileExistsError`` instead of replacing ``target``."""
    renameat2 = _renameat2()
    if renameat2 is not None:
        rc = renameat2(
            _AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE
        )
        if rc == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), str(target))
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(source))
    # Filesystems without RENAME_NOREPLACE: link() fails on an existing name too.
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:
        # No hard links either (some SMB mounts): check, then rename; a tiny race remains.
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.rename(source, target)
        return
    os.unlink(source)


def unique_names(folder: Path, name: str) -> Iterator[Path]:
    """``folder/name``, then ``folder/<stem>.1.xml``, ``<stem>.2.xml``, … endlessly."""
    yield folder / name
    stem = name[: -len(RECORD_SUFFIX)] if name.endswith(RECORD_SUFFIX) else name
    suffix = RECORD_SUFFIX if name.endswith(RECORD_SUFFIX) else ""
    n = 1
    while True:
        yield folder / f"{stem}.{n}{suffix}"
        n += 1


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a hidden temporary name, fsync, and rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@functools.cache
def _renameat2() -> Any:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return None
    libc = ctypes.CDLL(libc_name, use_errno=True)
    func = getattr(libc, "renameat2", None)
    if func is None:
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    func.restype = ctypes.c_int
    return func
