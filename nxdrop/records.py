"""A record as destinations get it (:class:`Record`), what its head may say
(:data:`METADATA_KEYS`), and file names made safe to store, show and log. Reading one
from its file is :mod:`nxdrop.reader`'s work."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from nxdrop.activities import AcquisitionActivity
from nxdrop.fsops import base_stem

Signature = tuple[int, int, int]  # size, mtime in ns, inode: "the same file, unchanged"


@dataclass(frozen=True)
class Record:
    """One experiment record, read from the drop folder.

    ``content`` is the file's exact bytes (CRLF and all): destinations send these. ``path``
    is where the bytes were read (the working folder), ``name`` the file's name in the drop
    folder, and ``signature`` the file's size, mtime and inode when it was read.
    ``metadata`` is what else its head says (:data:`METADATA_KEYS`), read in the same
    parse; :attr:`activities` are read when first asked for. ``valid_against`` is the XSD
    (its bytes) that the record was found valid against in a tree parsed exactly as CDCS
    parses it, so that CDCS's verdict with the same XSD is known; ``None`` when it was not
    checked that way (no schema, a streamed record, or a comment or processing instruction
    inside its root, which CDCS keeps and the reader does not).
    """

    path: Path
    name: str
    signature: Signature
    content: bytes
    sha256: str
    session_identifier: str
    title: str | None
    instrument_pid: str | None
    user: str | None
    dt_from: datetime | None
    dt_to: datetime | None
    metadata: dict[str, str] = field(default_factory=dict, hash=False)
    load_activities: Callable[[], tuple[AcquisitionActivity, ...]] = field(
        default=tuple, repr=False, compare=False
    )
    valid_against: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def activities(self) -> tuple[AcquisitionActivity, ...]:
        """Its ``<acquisitionActivity>`` elements, read from :attr:`content` the first time
        they are asked for and then kept: the built-in destinations never read them, and
        reading them costs more than the rest of the parse."""
        return self.load_activities()

    def changed(self) -> bool:
        """Whether the file at :attr:`path` is no longer what was read (rewritten in place)."""
        return signature_of(self.path) != self.signature

    @property
    def text(self) -> str:
        """The record as text, for APIs that take XML in a JSON string."""
        return self.content.decode("utf-8")


def session_identifier_of(name: str) -> str:
    """NexusLIMS names records ``<date>_<instrument>_<id>.xml``; the name is the session.

    A ``.<n>`` before ``.xml`` is the copy number that a name clash in ``uploaded/`` or
    ``failed/`` added, so a retried ``failed/x.1.xml`` is still session ``x``. A stem longer
    than 240 bytes is shortened (:func:`nxdrop.fsops.base_stem`), so that a long name and
    its shortened copy names are still one session.
    """
    return base_stem(name)


# Characters that would break a log line or a table row: C0 and C1 controls, DEL, and the
# two Unicode line breaks that str.splitlines() and many viewers honour.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_name(name: str) -> str:
    """``name`` as text that is safe to store, show and log.

    A byte that is not UTF-8 (which ``os.fsdecode`` turned into a lone surrogate) becomes
    ``\\xNN``, a control character ``\\n``, ``\\t``, ``\\r`` or ``\\xNN``; everything else,
    spaces and a leading dash among it, stays as it is. The result encodes as UTF-8 and
    holds no line break, so it can go into a database, a JSON file and one log line.
    """
    if _CONTROL.search(name) is None and _SURROGATE.search(name) is None:
        return name  # the usual case, at the cost of two scans
    return _SURROGATE.sub(_escape_surrogate, _CONTROL.sub(_escape_control, name))


def _escape_control(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED_ESCAPES:
        return _NAMED_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    # U+DC80..U+DCFF is how surrogateescape spells the undecodable byte 0x80..0xFF.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def name_problem(name: str) -> str | None:
    """Why the file name ``name`` cannot give a session identifier, or ``None`` if it can.

    A session identifier goes into the database, every destination and the log, so it must
    be valid UTF-8 and hold no control character (a newline would forge log lines). A
    leading dash, spaces and any other Unicode text are fine.
    """
    if _SURROGATE.search(name):
        return "the file name is not valid UTF-8"
    if _CONTROL.search(name):
        return "the file name holds control characters (a newline, a tab, …)"
    return None


def signature_of(path: Path) -> Signature | None:
    """Size, mtime and inode of ``path`` (a link itself, never followed); ``None`` if gone."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


# What ``Record.metadata`` (and so ``ExportContext.metadata``) may hold, where the record
# says it: ``title`` and ``id`` (the root's), ``instrument_name`` (``summary/instrument``'s
# text), ``motivation`` and ``reservation_url`` (``summary/@ref``: the calendar's page).
METADATA_KEYS = ("title", "id", "instrument_name", "motivation", "reservation_url")
