"""Logging to the journal (native protocol, against a real socket) and to stderr."""

from __future__ import annotations

import io
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest

from nxdrop.journal import JournalHandler, setup_logging, stderr_is_journal
from nxdrop.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SECRET = "tok-5f8e2c1a9b7d"


@dataclass
class Entry:
    """One journal entry as journald would parse it."""

    fields: dict[str, str] = field(default_factory=dict)
    binary: set[str] = field(default_factory=set)  # fields sent in the length-prefixed form
    raw: bytes = b""


def parse(payload: bytes) -> Entry:
    """The native protocol: ``KEY=value\\n``, or ``KEY\\n<le64 length><value>\\n``."""
    entry, rest = Entry(raw=payload), payload
    while rest:
        end = rest.index(b"\n")
        head = rest[:end]
        if b"=" in head:
            key, value = head.split(b"=", 1)
            rest = rest[end + 1 :]
        else:
            key = head
            (size,) = struct.unpack("<Q", rest[end + 1 : end + 9])
            value = rest[end + 9 : end + 9 + size]
            assert rest[end + 9 + size : end + 10 + size] == b"\n", "binary field not terminated"
            rest = rest[end + 10 + size :]
            entry.binary.add(key.decode())
        assert key.decode() not in entry.fields, f"field {key!r} sent twice"
        entry.fields[key.decode()] = value.decode()
    return entry


class FakeJournald:
    """A bound AF_UNIX datagram socket that reads entries as journald does (memfds too)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)

    def receive(self, timeout: float = 5.0) -> Entry:
        self.sock.settimeout(timeout)
        data, fds, _, _ = socket.recv_fds(self.sock, 1 << 20, 1)
        for fd in fds:
            with open(fd, "rb") as fh:  # an entry too large for one datagram
                fh.seek(0)  # the sender's offset is shared; journald maps from 0 too
                data += fh.read()
        return parse(data)

    def pending(self) -> bool:
        """Whether an entry is queued; sends are synchronous, so no waiting is needed."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(1 << 20, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True


@pytest.fixture
def journald() -> Iterator[FakeJournald]:
    # A short folder: socket paths are limited to 108 bytes, pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="nxj") as folder:
        server = FakeJournald(os.path.join(folder, "journal.sock"))
        yield server
        server.sock.close()


@pytest.fixture
def logger(journald: FakeJournald) -> Iterator[logging.Logger]:
    """A logger whose only handler sends to the fake journald."""
    log = logging.getLogger("nxdrop.test_journal")
    handler = JournalHandler(journald.path)
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield log
    log.removeHandler(handler)
    handler.close()


@pytest.fixture
def root_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers; put pytest's back afterwards."""
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved:
        root.addHandler(handler)
    root.setLevel(level)


@pytest.fixture
def journal_stream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TextIO]:
    """A stderr stand-in that ``$JOURNAL_STREAM`` names, as systemd sets it up."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        yield stream


def test_a_log_call_arrives_with_the_fields_an_operator_filters_on(
    logger: logging.Logger, journald: FakeJournald
) -> None:
    logger.warning(
        "%s → %s failed",
        "rec.xml",
        "cdcs",
        extra={"SESSION_ID": "2024-01-01_titan_1", "DESTINATION": "cdcs", "RECORD_ID": "42"},
    )
    entry = journald.receive().fields
    assert entry["SYSLOG_IDENTIFIER"] == "nxdrop"
    assert entry["PRIORITY"] == "4"
    assert entry["MESSAGE"] == "rec.xml → cdcs failed"
    assert entry["SESSION_ID"] == "2024-01-01_titan_1"
    assert entry["DESTINATION"] == "cdcs"
    assert entry["RECORD_ID"] == "42"
    assert entry["LOGGER"] == "nxdrop.test_journal"
    assert entry["CODE_FILE"] == __file__
    assert entry["CODE_FUNC"] == "test_a_log_call_arrives_with_the_fields_an_operator_filters_on"
    assert int(entry["CODE_LINE"]) > 0


@pytest.mark.parametrize(("level", "priority"), [("debug", "7"), ("info", "6"), ("error", "3")])
def test_priority_follows_the_level(
    logger: logging.Logger, journald: FakeJournald, level: str, priority: str
) -> None:
    getattr(logger, level)("hello", extra={"FILE": "/srv/drop/a.xml"})
    entry = journald.receive().fields
    assert entry["PRIORITY"] == priority
    assert entry["FILE"] == "/srv/drop/a.xml"


def test_a_multi_line_message_is_sent_in_the_binary_form(
    logger: logging.Logger, journald: FakeJournald
) -> None:
    logger.error("first line\nsecond line", extra={"SESSION_ID": "s1"})
    entry = journald.receive()
    assert entry.fields["MESSAGE"] == "first line\nsecond line"
    assert "MESSAGE" in entry.binary
    assert "SESSION_ID" not in entry.binary
    assert entry.raw.startswith(b"MESSAGE\n" + struct.pack("<Q", 22) + b"first line\nsecond line\n")


def test_a_traceback_is_part_of_the_message(logger: logging.Logger, journald: FakeJournald) -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("export crashed")
    message = journald.receive().fields["MESSAGE"]
    assert message.startswith("export crashed\nTraceback (most recent call last):")
    assert message.endswith("ValueError: boom")


def test_an_entry_larger_than_a_datagram_arrives_whole(
    logger: logging.Logger, journald: FakeJournald
) -> None:
    big = "x" * (2 << 20)  # beyond any default socket send buffer: sent through a memfd
    logger.info(big)
    assert journald.receive().fields["MESSAGE"] == big


def test_without_journald_the_line_goes_to_stderr(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    handler = JournalHandler(str(tmp_path / "no-such.sock"))
    record = logging.LogRecord("nxdrop", logging.ERROR, __file__, 1, "lost?", None, None)
    handler.handle(record)
    handler.close()
    assert capsys.readouterr().err == "<3>lost?\n"


def test_stderr_has_priority_prefixes(tmp_path: Path) -> None:
    script = """
        import logging
        from nxdrop.journal import setup_logging
        from nxdrop.settings import load_settings
        setup_logging(load_settings())
        log = logging.getLogger("nxdrop.daemon")
        log.info("watching the drop folder")
        log.error("cdcs unreachable")
        log.debug("not shown at INFO")
    """
    stderr = _run(script, tmp_path)
    assert stderr.splitlines() == ["<6>watching the drop folder", "<3>cdcs unreachable"]


def test_a_secret_never_reaches_stderr_or_the_log_file(tmp_path: Path) -> None:
    script = f"""
        import logging
        from nxdrop.journal import setup_logging
        from nxdrop.settings import load_settings
        setup_logging(load_settings())
        log = logging.getLogger("nxdrop.destinations.cdcs")
        log.warning("sending with token %s", {SECRET!r}, extra={{"FILE": "/x/{SECRET}"}})
        try:
            raise RuntimeError("401 for token {SECRET}")
        except RuntimeError:
            log.exception("upload failed")
    """
    stderr = _run(script, tmp_path, NX_CDCS_TOKEN=SECRET, NX_LOG_PATH=str(tmp_path / "log"))
    logfile = (tmp_path / "log" / "nxdrop.log").read_text(encoding="utf-8")
    for text in (stderr, logfile):
        assert SECRET not in text
        assert "sending with token ***" in text
        assert "RuntimeError: 401 for token ***" in text
    assert "<3>Traceback (most recent call last):" in stderr


def test_a_secret_never_reaches_a_journal_datagram(
    make_settings: Callable[..., Settings],
    journald: FakeJournald,
    journal_stream: TextIO,
    root_logging: None,
) -> None:
    setup_logging(
        make_settings(cdcs_token=SECRET), stream=journal_stream, journal_socket=journald.path
    )
    log = logging.getLogger("nxdrop.destinations.cdcs")
    log.warning("token %s", SECRET, extra={"FILE": f"/srv/drop/{SECRET}.xml"})
    try:
        raise RuntimeError(f"401 for token {SECRET}")
    except RuntimeError:
        log.exception("upload failed", stack_info=True)
    first, second = journald.receive(), journald.receive()
    for entry in (first, second):
        assert SECRET.encode() not in entry.raw
    assert first.fields["FILE"] == "/srv/drop/***.xml"
    assert "RuntimeError: 401 for token ***" in second.fields["MESSAGE"]


def test_journal_stream_detection(tmp_path: Path) -> None:
    with open(tmp_path / "stderr", "w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        assert stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev + 1}:{st.st_ino}"})
        assert not stderr_is_journal(stream, {})
    assert not stderr_is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_stderr_connected_to_the_journal_logs_natively(
    make_settings: Callable[..., Settings],
    journald: FakeJournald,
    journal_stream: TextIO,
    root_logging: None,
) -> None:
    setup_logging(make_settings(), stream=journal_stream, journal_socket=journald.path)
    logging.getLogger("nxdrop.pipeline").info("exported", extra={"SESSION_ID": "s2"})
    entry = journald.receive().fields
    assert (entry["MESSAGE"], entry["SESSION_ID"]) == ("exported", "s2")
    journal_stream.seek(0)
    assert journal_stream.read() == "", "the line must not reach the journal twice"


def test_stderr_elsewhere_gets_prefixed_lines(
    make_settings: Callable[..., Settings],
    journald: FakeJournald,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    root_logging: None,
) -> None:
    # A child of a journal-connected shell inherits JOURNAL_STREAM but writes to a pipe.
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        setup_logging(make_settings(), stream=stream, journal_socket=journald.path)
        logging.getLogger("nxdrop.pipeline").warning("slow")
        stream.seek(0)
        assert stream.read() == "<4>slow\n"
    assert not journald.pending()


@pytest.mark.parametrize(("target", "to_journal"), [("journal", True), ("stderr", False)])
def test_log_target_overrides_detection(
    make_settings: Callable[..., Settings],
    journald: FakeJournald,
    journal_stream: TextIO,
    root_logging: None,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    to_journal: bool,
) -> None:
    # NX_LOG_TARGET; model_copy works whether or not Settings declares log_target yet.
    settings = make_settings().model_copy(update={"log_target": target})
    if target == "journal":
        monkeypatch.delenv("JOURNAL_STREAM")  # the journal although stderr is not connected
    setup_logging(settings, stream=journal_stream, journal_socket=journald.path)
    logging.getLogger("nxdrop").info("hello")
    journal_stream.seek(0)
    assert journald.pending() is to_journal
    assert (journal_stream.read() == "<6>hello\n") is not to_journal


def test_a_terminal_gets_plain_level_names(
    make_settings: Callable[..., Settings], root_logging: None
) -> None:
    master, slave = os.openpty()
    with open(slave, "w", encoding="utf-8") as tty, open(master, "rb", buffering=0) as out:
        setup_logging(make_settings(), stream=tty)
        logging.getLogger("nxdrop").warning("on a terminal")
        tty.flush()
        assert _read_until(out, b"\n").replace(b"\r", b"") == b"WARNING on a terminal\n"


def _read_until(out: io.RawIOBase, end: bytes, timeout: float = 5.0) -> bytes:
    data, deadline = b"", time.monotonic() + timeout
    while not data.endswith(end):
        left = deadline - time.monotonic()
        ready, _, _ = select.select([out], [], [], max(left, 0))
        assert ready, f"nothing more after {data!r}"
        data += out.read(1024) or b""
    return data


def _run(script: str, tmp_path: Path, **env: str) -> str:
    """Run ``script`` in a fresh interpreter with stderr on a pipe; its stderr."""
    environ = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
    environ.update(PYTHONPATH=str(REPO), NX_DATA_PATH=str(tmp_path / "state"), **env)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stderr


# -- hostile names: control characters and bytes that are not UTF-8 --------------------------

FORGED = "evil.xml\n<3>FAKE ERROR cdcs: all records lost\r\n2030-01-01 00:00:00,000 ERROR x"
UNDECODABLE = os.fsdecode(b"2024-01-01_caf\xe9_\xff.xml")  # Latin-1 bytes, surrogateescape'd


def test_a_newline_in_a_name_forges_no_line_in_stderr_or_the_log_file(tmp_path: Path) -> None:
    script = f"""
        import logging
        from nxdrop.journal import setup_logging
        from nxdrop.settings import load_settings
        setup_logging(load_settings())
        log = logging.getLogger("nxdrop.pipeline")
        log.info("%s → %s: exported", {FORGED!r}, "cdcs", extra={{"FILE": {FORGED!r}}})
        try:
            raise RuntimeError("cannot read " + {FORGED!r})
        except RuntimeError:
            log.exception("export of %s crashed", {FORGED!r})
    """
    stderr = _run(script, tmp_path, NX_LOG_PATH=str(tmp_path / "log"))
    logfile = (tmp_path / "log" / "nxdrop.log").read_text(encoding="utf-8")
    assert "evil.xml\\n<3>FAKE ERROR cdcs: all records lost\\r\\n2030-01-01" in stderr
    for text in (stderr, logfile):
        lines = text.splitlines()
        assert not any(line.startswith(("<3>FAKE", "FAKE", "2030-01-01")) for line in lines)
        assert not any(line.startswith("<6><3>") for line in lines)
        # The traceback keeps its lines; the exception's words stay on theirs.
        assert any(
            line.endswith(
                "RuntimeError: cannot read evil.xml\\n<3>FAKE ERROR cdcs: "
                "all records lost\\r\\n2030-01-01 00:00:00,000 ERROR x"
            )
            for line in lines
        )
    assert stderr.splitlines()[0].startswith("<6>evil.xml\\n<3>FAKE")
    assert len([line for line in stderr.splitlines() if "→" in line]) == 1


def test_a_name_that_is_not_utf8_is_logged_everywhere(tmp_path: Path) -> None:
    script = f"""
        import logging
        from nxdrop.journal import setup_logging
        from nxdrop.settings import load_settings
        setup_logging(load_settings())
        log = logging.getLogger("nxdrop.intake")
        log.warning("%s: not exported", {UNDECODABLE!r}, extra={{"FILE": {UNDECODABLE!r}}})
        try:
            raise OSError("cannot open " + {UNDECODABLE!r})
        except OSError:
            log.exception("reading failed")
    """
    stderr = _run(script, tmp_path, NX_LOG_PATH=str(tmp_path / "log"))
    logfile = (tmp_path / "log" / "nxdrop.log").read_text(encoding="utf-8")
    for text in (stderr, logfile):
        assert "Logging error" not in text
        assert "2024-01-01_caf\\xe9_\\xff.xml: not exported" in text
        assert "OSError: cannot open 2024-01-01_caf\\xe9_\\xff.xml" in text


def test_journal_fields_are_escaped_and_still_filterable(
    make_settings: Callable[..., Settings],
    journald: FakeJournald,
    journal_stream: TextIO,
    root_logging: None,
) -> None:
    setup_logging(make_settings(), stream=journal_stream, journal_socket=journald.path)
    log = logging.getLogger("nxdrop.pipeline")
    log.warning("%s failed", FORGED, extra={"FILE": FORGED, "SESSION_ID": "s\n1"})
    log.warning("%s failed", UNDECODABLE, extra={"FILE": UNDECODABLE, "SESSION_ID": "s2"})
    first, second = journald.receive(), journald.receive()
    assert "\n" not in first.fields["MESSAGE"]
    assert first.fields["MESSAGE"].startswith("evil.xml\\n<3>FAKE ERROR")
    assert first.fields["FILE"] == FORGED.replace("\n", "\\n").replace("\r", "\\r")
    assert first.fields["SESSION_ID"] == "s\\n1"
    assert not first.binary  # every field on one line
    assert second.fields["FILE"] == "2024-01-01_caf\\xe9_\\xff.xml"
    assert second.fields["SESSION_ID"] == "s2"  # what journalctl SESSION_ID=s2 matches
    assert second.fields["PRIORITY"] == "4"


def test_a_secret_is_masked_before_the_line_is_escaped(tmp_path: Path) -> None:
    script = f"""
        import logging
        from nxdrop.journal import setup_logging
        from nxdrop.settings import load_settings
        setup_logging(load_settings())
        logging.getLogger("nxdrop").error("answer: %s", "a\\n{SECRET}\\tb")
    """
    stderr = _run(script, tmp_path, NX_CDCS_TOKEN=SECRET, NX_ELABFTW_API_KEY="k-" + SECRET[::-1])
    assert stderr.splitlines() == ["<3>answer: a\\n***\\tb"]


def test_a_bad_format_string_does_not_break_the_caller(
    make_settings: Callable[..., Settings], root_logging: None, tmp_path: Path
) -> None:
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        setup_logging(make_settings(), stream=stream)
        logging.getLogger("nxdrop").warning("%d files", "three")  # a bug, not a crash
        stream.seek(0)
        assert stream.read() == "<4>'%d files' % ('three',)\n"
