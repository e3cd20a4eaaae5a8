"""Filesystem primitives: renames that never replace, copy names, atomic writes, fsync.

``folders`` and the ``archive`` destination both build on these; nothing here knows
about records beyond the ``<stem>.<n>.xml`` copy names.

Every name made here fits in :data:`NAME_MAX` bytes, the kernel's limit for one name: a name
that would not is shortened by :func:`fit_name`, which cuts its stem at a character boundary
and marks the cut with a hash of what was cut off, so two long names never shorten to one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from typing import Any

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

# Linux's NAME_MAX, in bytes of the encoded name (not characters) on every local filesystem
# and on NFS and SMB mounts.
NAME_MAX = 255
# A session identifier (a name's stem) never takes more than this, so that its copy names
# ``<stem>.<n>.xml`` fit in NAME_MAX with room for a ten-digit copy number.
SESSION_MAX = 240
# What :func:`fit_name` puts where it cut: ``~`` and 8 hex digits of the SHA-256 of the
# whole stem.
_MARK_BYTES = 9
# ``tempfile.mkstemp`` adds 8 random characters; hidden temporary names are
# ``.<name>.<random>.tmp``.
_TEMPORARY_EXTRA = len(".") + len(".") + 8 + len(".tmp")

XML = ".xml"
# ``uploaded/`` and ``failed/`` never overwrite: a clash gets ``<stem>.<n>.xml``.
_COPY_NUMBER = re.compile(r"\.\d+$")


def name_bytes(name: str) -> int:
    """How many bytes ``name`` takes in the filesystem (invalid UTF-8 bytes count one each)."""
    try:
        return len(os.fsencode(name))
    except UnicodeEncodeError:  # a surrogate that os.fsdecode never makes
        return sum(_char_bytes(c) for c in name)


def fit_name(stem: str, suffix: str = "", limit: int = NAME_MAX) -> str:
    """``stem + suffix`` if it fits in ``limit`` bytes, else a shortened stem + ``suffix``.

    The stem is cut at a character boundary and ``~`` and 8 hex digits of the SHA-256 of the
    whole stem take the place of what was cut, so the result depends on the stem alone (the
    same long name always shortens to the same name) and two long names that share their
    beginning still shorten to two names. Never raises; ``suffix`` is kept whole.
    """
    if name_bytes(stem) + name_bytes(suffix) <= limit:
        return stem + suffix
    budget = max(limit - name_bytes(suffix) - _MARK_BYTES, 0)
    return f"{_cut(stem, budget)}~{short_digest(stem)}{suffix}"


def _cut(text: str, limit: int) -> str:
    """The longest beginning of ``text`` that takes at most ``limit`` bytes."""
    used = 0
    for i, char in enumerate(text):
        used += _char_bytes(char)
        if used > limit:
            return text[:i]
    return text


def _char_bytes(char: str) -> int:
    # What os.fsencode makes of one character: an undecodable byte that os.fsdecode turned
    # into a lone surrogate (U+DC80..U+DCFF) is that one byte again.
    code = ord(char)
    if code < 0x80 or 0xDC80 <= code <= 0xDCFF:
        return 1
    if code < 0x800:
        return 2
    return 3 if code < 0x10000 else 4


def short_digest(text: str) -> str:
    """8 hex digits of the SHA-256 of ``text`` as the filesystem stores it: a short tag that
    tells long names (or names made safe) apart."""
    try:
        data = os.fsencode(text)
    except UnicodeEncodeError:  # a surrogate no filesystem name can hold: hash it anyway
        data = text.encode("utf-8", "surrogatepass")
    return hashlib.sha256(data).hexdigest()[:8]


def base_stem(name: str) -> str:
    """``x.3.xml`` → ``x``: the name without ``.xml`` and without a copy number.

    A stem longer than :data:`SESSION_MAX` bytes is shortened by :func:`fit_name`, so the
    stem of a long name and the stem of each of its (shortened) copy names are the same.
    """
    stem = name[: -len(XML)] if name.endswith(XML) else name
    return fit_name(_COPY_NUMBER.sub("", stem) or stem, limit=SESSION_MAX)


def copy_names(folder: Path, name: str) -> Iterator[Path]:
    """``folder/name``, then ``<stem>.1.xml``, ``<stem>.2.xml``, … endlessly.

    The stem loses any copy number first, so a copy of ``x.1.xml`` is ``x.2.xml``, never
    ``x.1.1.xml`` (which would read back as another session). Every name fits in
    :data:`NAME_MAX` bytes.
    """
    if name_bytes(name) <= NAME_MAX:
        yield folder / name
    suffix = XML if name.endswith(XML) else ""
    stem = base_stem(name)
    for n in count(1):
        candidate = fit_name(stem, f".{n}{suffix}")
        if candidate != name:
            yield folder / candidate


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
    # Shortened to fit: a name of up to NAME_MAX bytes is allowed, its temporary name too.
    short = fit_name(name, limit=NAME_MAX - _TEMPORARY_EXTRA)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{short}.", suffix=".tmp", dir=folder)
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
