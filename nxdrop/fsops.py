"""Filesystem primitives: renames that never replace, copy names, atomic writes, fsync.

``folders`` and the ``archive`` destination both build on these; nothing here knows
about records beyond the ``<stem>.<n>.xml`` copy names.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

XML = ".xml"
# ``uploaded/`` and ``failed/`` never overwrite: a clash gets ``<stem>.<n>.xml``.
_COPY_NUMBER = re.compile(r"\.\d+$")


def base_stem(name: str) -> str:
    """``x.3.xml`` → ``x``: the name without ``.xml`` and without a copy number."""
    stem = name[: -len(XML)] if name.endswith(XML) else name
    return _COPY_NUMBER.sub("", stem) or stem


def copy_names(folder: Path, name: str) -> Iterator[Path]:
    """``folder/name``, then ``<stem>.1.xml``, ``<stem>.2.xml``, … endlessly.

    The stem loses any copy number first, so a copy of ``x.1.xml`` is ``x.2.xml``, never
    ``x.1.1.xml`` (which would read back as another session).
    """
    yield folder / name
    suffix = XML if name.endswith(XML) else ""
    stem = base_stem(name)
    n = 1
    while True:
        candidate = f"{stem}.{n}{suffix}"
        if candidate != name:
            yield folder / candidate
        n += 1


def rename_noreplace(source: Path, target: Path) -> None:
    """``rename`` that raises ``FileExistsError`` instead of replacing ``target``.

    ``renameat2(RENAME_NOREPLACE)`` where the kernel and filesystem have it. Elsewhere (NFS,
    some FUSE mounts) a check, then a plain ``rename``: still one atomic step for the file,
    so it is never in two places; the check races only with another nxdrop moving a file
    of the same session into the same folder, which the session lock rules out.
    """
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
    if os.path.lexists(target):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    os.rename(source, target)


def move_to_free_name(source: Path, folder: Path, name: str) -> Path:
    """Rename ``source`` into ``folder`` as ``name``, or its first free copy name."""
    for target in copy_names(folder, name):
        try:
            rename_noreplace(source, target)
        except FileExistsError:
            continue
        return target
    raise AssertionError("unreachable: copy_names is endless")


def write_atomically(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write ``data`` under a hidden temporary name, fsync, and rename it over ``path``."""
    tmp = write_temporary(path.parent, path.name, data, mode=mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_temporary(folder: Path, name: str, data: bytes, *, mode: int = 0o644) -> Path:
    """``data`` in a new hidden file of ``folder`` (fsynced); its path, for a rename."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
