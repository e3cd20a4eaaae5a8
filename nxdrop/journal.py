"""Logging: the systemd journal where there is one, else stderr with ``<N>`` priority prefixes.

Under systemd every record goes to journald as structured fields (``SYSLOG_IDENTIFIER=nxdrop``,
``PRIORITY``, ``MESSAGE``, ``CODE_*``, ``LOGGER`` and the record's upper-case extras such as
``SESSION_ID``, ``DESTINATION``, ``RECORD_ID``, ``FILE``), so an operator can filter with
``journalctl -u nxdrop SESSION_ID=…``. Every handler redacts the configured secrets, so a
token that reaches a message, a traceback or a field is never written anywhere; and it escapes
control characters and lone surrogates, so a file name with a newline cannot forge a line of
its own (``<3>FAKE ERROR``) and one that is not UTF-8 never turns a line into
"--- Logging error ---".

Unless ``NX_LOG_PATH=none``, every line also goes to ``nxdrop.log`` in ``NX_LOG_PATH``
(``$NX_DATA_PATH/logs`` by default, as NexusLIMS keeps its log), rotated at
:data:`LOG_MAX_BYTES` with :data:`LOG_BACKUPS` older files kept (:class:`LogFileHandler`).
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import io
import logging
import logging.handlers
import os
import re
import socket
import struct
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TextIO

from nxdrop.exceptions import ConfigError
from nxdrop.redact import Redactor
from nxdrop.settings import Settings

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "nxdrop"

# syslog priorities, as sd-daemon(3) prefixes and the journal's PRIORITY= want them
PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

# A journal field name: upper case, digits, underscore; journald owns the "_" prefix.
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL


def syslog_priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, priority in sorted(PRIORITY.items(), reverse=True):
        if levelno >= level:
            return priority
    return 7


# What a line must not carry raw: C0 and C1 controls (a newline starts a forged line, an
# escape sequence rewrites a terminal), Unicode line separators, and lone surrogates (a
# name that is not UTF-8, decoded with surrogateescape, cannot be encoded back as UTF-8).
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_UNSAFE_BUT_NEWLINE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_DONE = "_nxdrop_clean"  # set on a record once its filter has run (every handler has it)


def _escape_one(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    if char in _SHORT:
        return _SHORT[char]
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape's stand-in for an undecodable byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` on one line and encodable: control characters and lone surrogates escaped
    (``\\n``, ``\\x1b``, ``\\xff`` for an undecodable byte of a file name)."""
    return _UNSAFE.sub(_escape_one, text)


def _escape_but_newlines(text: str) -> str:
    return _UNSAFE_BUT_NEWLINE.sub(_escape_one, text)


def format_exception(
    exc_info: tuple[type[BaseException], BaseException, TracebackType | None],
) -> str:
    """A traceback as ``logging`` formats it, but with each exception's own message escaped.

    The frames keep their lines; the words of an exception (where a file name or a server's
    answer may sit) are kept on their own line, so they cannot forge another entry.
    """
    te = traceback.TracebackException(*exc_info)
    finals: set[str] = set()
    pending, seen = [te], set()
    while pending:
        one = pending.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        finals.update(one.format_exception_only())
        pending.extend(x for x in (one.__cause__, one.__context__) if x is not None)
        pending.extend(getattr(one, "exceptions", None) or ())
    chunks = [
        escape_controls(chunk.removesuffix("\n")) + "\n" if chunk in finals else chunk
        for chunk in te.format()
    ]
    return _escape_but_newlines("".join(chunks).removesuffix("\n"))


class RedactSecrets(logging.Filter):
    """Makes a record safe to write: every secret masked (``***``) by the one
    :class:`~nxdrop.redact.Redactor`, in the message, the traceback and the journal fields;
    then control characters and lone surrogates escaped, so that one record is one line
    (a traceback keeps its own lines) and always encodable.
    """

    def __init__(self, redactor: Redactor) -> None:
        super().__init__()
        self.redactor = redactor

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, _DONE, False):
            return True  # the second handler gets the record as the first left it
        setattr(record, _DONE, True)
        scrub = self.redactor.scrub
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            # Formatters reuse exc_text: the traceback is formatted and cleaned once.
            exc_type, exc, tb = record.exc_info
            record.exc_text = format_exception((exc_type or type(exc), exc, tb))
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the caller's logging call
            message = f"{record.msg!r} % {record.args!r}"
        record.msg, record.args = escape_controls(scrub(message)), None
        if record.exc_text:
            record.exc_text = _escape_but_newlines(scrub(record.exc_text))
        if record.stack_info:
            record.stack_info = _escape_but_newlines(scrub(record.stack_info))
        for key, value in list(vars(record).items()):
            if _FIELD.fullmatch(key) and isinstance(value, str):
                setattr(record, key, escape_controls(scrub(value)))
        return True


class PriorityFormatter(logging.Formatter):
    """``<6>message``: systemd reads the priority from the prefix of a stderr line."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in text.splitlines())


def serialize(fields: Mapping[str, str]) -> bytes:
    """Fields in the journal's native protocol; values with a newline take the binary form."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "backslashreplace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class NativeSender:
    """One datagram per entry to journald's socket; too large for a datagram, a sealed memfd."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def __call__(self, fields: Mapping[str, str]) -> None:
        payload = serialize(fields)
        try:
            self.sock.sendto(payload, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(payload)

    def _send_memfd(self, payload: bytes) -> None:
        # What libsystemd does: journald reads an entry of any size from a sealed memfd.
        fd = os.memfd_create("nxdrop-journal", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            with open(fd, "wb", closefd=False) as fh:
                fh.write(payload)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            self.sock.sendmsg([b""], rights, 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()


def _library_sender() -> Callable[[Mapping[str, str]], None] | None:
    try:
        from systemd import journal  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    return lambda fields: journal.sendv(*(f"{k}={v}" for k, v in fields.items()))


class JournalHandler(logging.Handler):
    """Writes records to the journal as structured entries.

    ``socket_path`` is journald's socket (tests bind their own); with the default, and with
    the ``systemd`` extra installed, libsystemd does the sending. Should journald be
    unreachable, the line goes to stderr instead of being lost.
    """

    def __init__(self, socket_path: str | None = None, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.identifier = identifier
        self._native: NativeSender | None = None
        send = _library_sender() if socket_path is None else None
        if send is None:
            send = self._native = NativeSender(socket_path or JOURNAL_SOCKET)
        self._send: Callable[[Mapping[str, str]], None] = send
        self._fallback = PriorityFormatter()

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        """The journal fields of one record."""
        fields = {
            "MESSAGE": self.format(record),
            "PRIORITY": str(syslog_priority(record.levelno)),
            "SYSLOG_IDENTIFIER": self.identifier,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName,
        }
        for key, value in vars(record).items():  # extra={"SESSION_ID": …}
            if _FIELD.fullmatch(key) and key not in fields:
                fields[key] = value
        return {key: str(value) for key, value in fields.items() if value is not None}

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._send(self.fields(record))
        except OSError:
            sys.stderr.write(self._fallback.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        if self._native is not None:
            self._native.close()
        super().close()


# The log file: its name in NX_LOG_PATH, and the bound on the disk it takes (the file being
# written and LOG_BACKUPS older ones, nxdrop.log.1 the newest: 60 MiB in all).
LOG_FILE = "nxdrop.log"
LOG_MAX_BYTES = 10 * 1024 * 1024
LOG_BACKUPS = 5
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class TerminalHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Log lines on a terminal, below which a status line (a progress bar) stays.

    A log line is written where the status line was, which is then drawn again under it,
    so neither is written onto the other.
    """

    CLEAR = "\r\x1b[K"  # to the start of the line, and erase it

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.status = ""

    def show(self, status: str, *, final: bool = False) -> None:
        """Draw ``status`` in place of the last one; ``final`` leaves it and ends the line."""
        self.acquire()
        try:
            self.stream.write(self.CLEAR + status + ("\n" if final else ""))
            self.status = "" if final else status
            self.flush()
        finally:
            self.release()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.status:
            super().emit(record)
            return
        self.stream.write(self.CLEAR)
        super().emit(record)
        self.stream.write(self.status)
        self.flush()

    @classmethod
    def of(cls, stream: TextIO) -> TerminalHandler | None:
        """The root logger's handler writing to ``stream``, if it is one of these."""
        for handler in logging.getLogger().handlers:
            if isinstance(handler, cls) and handler.stream is stream:
                return handler
        return None


class LogFileHandler(logging.handlers.RotatingFileHandler):
    """``nxdrop.log``, rotated by size, that follows its path when the file is moved away.

    Rotation by size in the process rather than ``WatchedFileHandler`` plus a logrotate
    snippet: the bound on the disk then holds wherever nxdrop runs (a quick start, a
    container, a host where nobody installed the snippet), and it is the bound NexusLIMS
    users know from its own log. What ``RotatingFileHandler`` alone gets wrong is a file
    moved under it: it keeps writing into the file it opened, so after an operator's ``mv``
    or ``rm``, a logrotate rule set up anyway, or a rotation by another nxdrop process
    sharing the file (``nxdrop export`` run by hand next to the daemon), the lines would go
    into a renamed or deleted file. So before each line the path is checked, as
    ``WatchedFileHandler`` does, and reopened when it no longer names the open file. The
    file is opened for appending (``O_APPEND``), so a logrotate ``copytruncate`` is safe too.
    """

    def __init__(
        self, folder: Path, *, max_bytes: int = LOG_MAX_BYTES, backups: int = LOG_BACKUPS
    ) -> None:
        self._identity: tuple[int, int] | None = None
        self._failing = False  # a write failed: said once on stderr, until one works again
        self._ok = True
        # Opened here, not on the first line: a folder nxdrop cannot write is an error at
        # start (exit 2), not a surprise in the middle of the night.
        super().__init__(
            folder / LOG_FILE,
            maxBytes=max_bytes,
            backupCount=backups,
            encoding="utf-8",
            errors="backslashreplace",  # a stray surrogate must never lose a line
        )
        self.setFormatter(logging.Formatter(LOG_FORMAT))

    def _open(self) -> io.TextIOWrapper:
        stream = super()._open()
        st = os.fstat(stream.fileno())
        self._identity = (st.st_dev, st.st_ino)
        return stream

    def _follow_path(self) -> None:
        """Reopen the file if its path now names another file, or none (it was moved)."""
        try:
            st = os.stat(self.baseFilename)
            same = (st.st_dev, st.st_ino) == self._identity
        except FileNotFoundError:
            same = False
        if same and self.stream is not None:
            return
        if self.stream is not None:
            stream, self.stream = self.stream, None
            # Flushes into the moved file, where the earlier lines are; if its disk is gone,
            # nothing more can reach it anyway.
            with contextlib.suppress(OSError):
                stream.close()
        self.stream = self._open()

    def emit(self, record: logging.LogRecord) -> None:
        self._ok = True
        try:
            self._follow_path()
        except OSError:
            self.handleError(record)
            return
        try:
            # RotatingFileHandler.emit would format the line twice (once to measure it) and
            # look at the path twice more; _follow_path has looked already. The end is
            # sought: other processes append to the file too.
            line = self.format(record) + self.terminator
            stream = self.stream
            assert stream is not None  # _follow_path opened it
            if self.maxBytes > 0 and stream.seek(0, os.SEEK_END) + len(line) >= self.maxBytes:
                self.doRollover()
                stream = self.stream
                assert stream is not None
            stream.write(line)
            self.flush()
        except Exception:
            self.handleError(record)
        if self._ok and self._failing:
            self._failing = False
            _warn(f"writing {self.baseFilename} again")

    def handleError(self, record: logging.LogRecord) -> None:
        """A full disk or a removed folder: one line on stderr (the journal, under systemd)
        rather than a traceback for every log line; the other handlers still get them."""
        self._ok = False
        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            super().handleError(record)
            return
        if not self._failing:
            self._failing = True
            reason = error.strerror or str(error)
            _warn(f"cannot write {self.baseFilename}: {reason}; until it works, only stderr")


def _warn(message: str) -> None:
    """A warning about the log file itself, straight to stderr (logging would recurse)."""
    try:
        prefix = "" if sys.stderr.isatty() else "<4>"
        sys.stderr.write(f"{prefix}nxdrop: {escape_controls(message)}\n")
    except (OSError, ValueError, AttributeError):
        pass  # no stderr either: nowhere left to say it


def open_log_file(folder: Path) -> LogFileHandler:
    """The handler of ``folder/nxdrop.log``, the folder made if need be; a folder that
    cannot be made or written is a :class:`ConfigError` naming ``NX_LOG_PATH``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return LogFileHandler(folder)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(
            f"NX_LOG_PATH={folder}: cannot write {LOG_FILE} there: {reason} "
            "(NX_LOG_PATH=none switches the log file off)"
        ) from None


def stderr_is_journal(
    stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether ``stream`` (stderr) is connected to the journal.

    systemd sets ``$JOURNAL_STREAM`` to the ``st_dev:st_ino`` of the stream it connected; a
    child whose stderr was redirected elsewhere inherits the variable but fails the match.
    """
    expected = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    if not expected:
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):  # no file behind it (pytest's capture, say)
        return False
    return expected == f"{st.st_dev}:{st.st_ino}"


def setup_logging(
    settings: Settings,
    *,
    verbose: bool = False,
    stream: TextIO | None = None,
    journal_socket: str | None = None,
) -> None:
    """Configure the root logger once per process for the daemon and the commands.

    The journal when ``NX_LOG_TARGET=journal``, or with ``auto`` (the default) when stderr
    is connected to it; otherwise ``stream`` (stderr). And ``nxdrop.log`` in
    ``NX_LOG_PATH`` unless it is ``none``: a folder that cannot be written there raises
    :class:`ConfigError`. ``journal_socket`` is for tests.
    """
    stream = stream or sys.stderr
    # First, so that a log folder nxdrop cannot write leaves logging as it was.
    file_handler = None if settings.log_path is None else open_log_file(settings.log_path)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.setLevel(logging.DEBUG if verbose else settings.log_level)
    redact = RedactSecrets(Redactor.from_settings(settings))
    target = settings.log_target
    journal = target == "journal" or (target == "auto" and stderr_is_journal(stream))
    # Without journald (a container, say) the journal would swallow every line.
    missing = journal and not journal_socket and not os.path.exists(JOURNAL_SOCKET)
    handler: logging.Handler
    if journal and not missing:
        handler = JournalHandler(journal_socket)
    else:
        if stream.isatty():
            handler = TerminalHandler(stream)
            handler.setFormatter(logging.Formatter("%(levelname)-7s %(message)s"))
        else:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(PriorityFormatter())
    handler.addFilter(redact)
    root.addHandler(handler)
    if file_handler is not None:
        file_handler.addFilter(redact)  # the same filter: secrets masked, controls escaped
        root.addHandler(file_handler)
    for noisy in ("urllib3", "watchdog", "peewee"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # A crash in a thread (watchdog's observer, say) is logged, not printed raw to stderr.
    threading.excepthook = _log_thread_exception
    if missing:
        logging.getLogger(__name__).warning("no journald at %s: logging to stderr", JOURNAL_SOCKET)


def _log_thread_exception(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    name = args.thread.name if args.thread is not None else "?"
    logging.getLogger("nxdrop.threads").error(
        "thread %s crashed", name, exc_info=(args.exc_type, args.exc_value, args.exc_traceback)
    )
