"""Logging to the journal (native protocol, against a real socket) and to stderr."""

from __future__ import annotations

import io
import logging
import os
import re
import select
import shutil
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

from nxdrop.journal import (
    LOG_BACKUPS,
    LOG_MAX_BYTES,
    JournalHandler,
    LogFileHandler,
    setup_logging,
    stderr_is_journal,
)
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
    settings = make_settings(log_target=target)
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


# -- the log file: nxdrop.log in NX_LOG_PATH, $NX_DATA_PATH/logs by default --------------------

EXAMPLES = REPO / "examples" / "records"


def _nxdrop(
    tmp_path: Path, *args: str, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """``python -m nxdrop ARGS`` as an operator runs it, with an archive and a drop folder."""
    environ = {
        k: v for k, v in os.environ.items() if not k.startswith("NX_") and k != "JOURNAL_STREAM"
    }
    environ |= {
        "PYTHONPATH": str(REPO),
        "NX_DATA_PATH": str(tmp_path / "state"),
        "NX_DROP_PATH": str(tmp_path / "drop"),
        "NX_ARCHIVE_PATH": str(tmp_path / "archive"),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", *args],
        cwd=cwd or tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _drop_examples(tmp_path: Path) -> list[str]:
    """The README's sample records, copied into the drop folder; their session identifiers."""
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    for record in EXAMPLES.glob("*.xml"):
        shutil.copyfile(record, drop / record.name)
    return sorted(record.stem for record in EXAMPLES.glob("*.xml"))


def test_the_log_file_is_under_the_data_path_by_default(tmp_path: Path) -> None:
    sessions = _drop_examples(tmp_path)
    done = _nxdrop(tmp_path, "run", "--once")
    assert done.returncode == 0, done.stderr
    log = tmp_path / "state" / "logs" / "nxdrop.log"
    text = log.read_text(encoding="utf-8")
    for session in sessions:
        # The same lines as stderr, with a time and a level: what NexusLIMS users grep.
        assert re.search(
            rf"^\d{{4}}-\d\d-\d\d [\d:,]+ INFO nxdrop\.\S+: {session}\.xml exported", text, re.M
        )
        assert f"<6>{session}.xml exported" in done.stderr


def test_a_relative_log_path_is_taken_from_the_working_directory(tmp_path: Path) -> None:
    _drop_examples(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    done = _nxdrop(tmp_path, "run", "--once", cwd=work, NX_LOG_PATH="my-logs")
    assert done.returncode == 0, done.stderr
    assert "exported" in (work / "my-logs" / "nxdrop.log").read_text(encoding="utf-8")
    assert not (tmp_path / "state" / "logs").exists()


@pytest.mark.parametrize("off", ["none", "None"])
def test_none_switches_the_log_file_off(tmp_path: Path, off: str) -> None:
    _drop_examples(tmp_path)
    done = _nxdrop(tmp_path, "run", "--once", NX_LOG_PATH=off)
    assert done.returncode == 0, done.stderr
    assert "exported" in done.stderr  # stderr (the journal) still has every line
    assert not list(tmp_path.rglob("nxdrop.log*"))
    assert not (tmp_path / "state" / "logs").exists()


@pytest.mark.parametrize("where", ["under a file", "nxdrop.log is a folder"])
@pytest.mark.parametrize("command", ["run", "export"])
def test_a_log_folder_that_cannot_be_written_is_a_configuration_error(
    tmp_path: Path, where: str, command: str
) -> None:
    # Both fail for root too (CI runs as root, for whom permissions are no obstacle).
    (tmp_path / "a-file").write_text("not a folder\n")
    folder = tmp_path / "a-file" / "logs"
    if where == "nxdrop.log is a folder":
        folder = tmp_path / "logs"
        (folder / "nxdrop.log").mkdir(parents=True)
    sessions = _drop_examples(tmp_path)
    args = ["run", "--once"] if command == "run" else ["export", *(f"{s}.xml" for s in sessions)]
    done = _nxdrop(tmp_path, *args, cwd=tmp_path / "drop", NX_LOG_PATH=str(folder))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"nxdrop: configuration error: NX_LOG_PATH={folder}: ")
    assert "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1
    # Nothing was exported with the log switched off behind the operator's back.
    assert sorted(p.stem for p in (tmp_path / "drop").glob("*.xml")) == sessions
    assert not (tmp_path / "archive").exists()


def test_the_log_file_rotates_at_its_limit_and_keeps_a_bounded_number_of_files(
    make_settings: Callable[..., Settings], root_logging: None
) -> None:
    # The documented bound (README, docs/deploy.md): 10 MiB a file, 5 older files kept.
    assert (LOG_MAX_BYTES, LOG_BACKUPS) == (10 * 1024 * 1024, 5)
    settings = make_settings()
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        setup_logging(settings, stream=devnull)
        log = logging.getLogger("nxdrop.pipeline")
        filler = "x" * 65_000
        lines = (LOG_BACKUPS + 2) * LOG_MAX_BYTES // len(filler) + 1  # 7 files' worth
        for n in range(lines):
            log.info("line %06d %s", n, filler)
    folder = settings.data_path / "logs"
    assert settings.log_path == folder
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["nxdrop.log", *(f"nxdrop.log.{i}" for i in range(1, LOG_BACKUPS + 1))]
    for path in folder.iterdir():
        assert 0 < path.stat().st_size <= LOG_MAX_BYTES, path.name
    # Oldest first: nxdrop.log.5 … nxdrop.log.1, then nxdrop.log, ending with the last line.
    order = [folder / f"nxdrop.log.{i}" for i in range(LOG_BACKUPS, 0, -1)] + [
        folder / "nxdrop.log"
    ]
    numbers = [
        int(m.group(1))
        for path in order
        for m in re.finditer(r" line (\d{6}) ", path.read_text(encoding="utf-8"))
    ]
    assert numbers == list(range(numbers[0], lines))
    assert numbers[0] > 0, "the oldest lines are gone: the files are bounded"


def test_a_log_file_moved_or_removed_is_not_written_into(
    make_settings: Callable[..., Settings], root_logging: None, tmp_path: Path
) -> None:
    folder = tmp_path / "logs"
    with open(os.devnull, "w", encoding="utf-8") as devnull:
        setup_logging(make_settings(log_path=folder), stream=devnull)
        log = logging.getLogger("nxdrop.pipeline")
        live = folder / "nxdrop.log"
        log.info("first")
        live.rename(folder / "nxdrop.log-20240115")  # logrotate's "create", or an operator's mv
        log.info("second")
        live.unlink()  # an operator's rm
        log.info("third")
        with open(live, "r+", encoding="utf-8") as fh:  # logrotate's "copytruncate"
            fh.truncate(0)
        log.info("fourth")
    moved = (folder / "nxdrop.log-20240115").read_text(encoding="utf-8")
    assert moved.endswith(" INFO nxdrop.pipeline: first\n")
    assert "second" not in moved
    text = live.read_bytes()
    assert b"\0" not in text, "writing went on at the old offset after a truncation"
    assert text.decode().splitlines()[-1].endswith(" INFO nxdrop.pipeline: fourth")
    assert len(text.decode().splitlines()) == 1


def test_two_processes_sharing_the_log_file_follow_each_others_rotation(tmp_path: Path) -> None:
    # The daemon and an `nxdrop export` run by hand: two handlers on one nxdrop.log. After
    # one of them rotates, the other must write into the new file, not the renamed one.
    daemon = LogFileHandler(tmp_path, max_bytes=2000, backups=3)
    by_hand = LogFileHandler(tmp_path, max_bytes=2000, backups=3)
    try:
        for n in range(200):
            for name, handler in (("daemon", daemon), ("by-hand", by_hand)):
                message = f"{name} {n:03d} " + "." * 40
                handler.handle(
                    logging.LogRecord("nxdrop", logging.INFO, "", 0, message, None, None)
                )
    finally:
        daemon.close()
        by_hand.close()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["nxdrop.log", "nxdrop.log.1", "nxdrop.log.2", "nxdrop.log.3"]
    last = (tmp_path / "nxdrop.log").read_text(encoding="utf-8").splitlines()
    assert "daemon 199 " in last[-2] and "by-hand 199 " in last[-1]
    for path in tmp_path.iterdir():
        assert path.stat().st_size <= 2000 + 200, path.name  # a line over, at most


def test_a_log_file_that_stops_working_is_reported_once_and_taken_up_again(
    make_settings: Callable[..., Settings],
    root_logging: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "logs"
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        setup_logging(make_settings(log_path=folder), stream=stream)
        log = logging.getLogger("nxdrop.pipeline")
        log.info("before")
        shutil.rmtree(folder)  # its disk or folder went away under the daemon
        for n in range(3):
            log.info("meanwhile %d", n)
        folder.mkdir()
        log.info("after")
        stream.seek(0)
        assert stream.read().splitlines() == [
            "<6>before",
            *(f"<6>meanwhile {n}" for n in range(3)),  # stderr (the journal) lost nothing
            "<6>after",
        ]
    said = capsys.readouterr().err.splitlines()
    path = folder / "nxdrop.log"
    assert said == [
        f"<4>nxdrop: cannot write {path}: No such file or directory; until it works, only stderr",
        f"<4>nxdrop: writing {path} again",
    ]
    assert path.read_text(encoding="utf-8").endswith(" INFO nxdrop.pipeline: after\n")
