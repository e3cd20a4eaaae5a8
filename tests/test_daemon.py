"""The daemon: a real ``python -m nxdrop run`` on real folders, real inotify, real signals.

The destination of the subprocess tests is ``tests/plugins/slowdest``, a plugin found
through its entry point on ``PYTHONPATH``: it logs every call and waits for a gate file.
A few cases (a crashing handler, events the kernel dropped, the queue bounds) drive
:class:`Daemon` in-process, where its observer and queues can be reached.

Every wait polls for a condition up to a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pty
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from nxdrop.app import App
from nxdrop.daemon import BATCH, Daemon
from nxdrop.destinations import ExportContext, ExportResult
from nxdrop.pipeline import Outcome
from nxdrop.systemd import Notifier
from nxdrop.watcher import OVERFLOW_LOGGER, Kind, Sighting
from tests.fixtures.service import DEADLINE, Service, record, wait_until, xml_names
from tests.test_watcher import Crasher

OBSERVERS = ["inotify", "polling"]
RECORD_SMALL = (
    Path(__file__).resolve().parent.parent
    / "examples"
    / "records"
    / ("2024-01-15_FEI-Titan-TEM_9001.xml")
)


# -- taking files ------------------------------------------------------------------------


@pytest.mark.parametrize("observer", OBSERVERS)
def test_files_present_at_start_are_taken(
    service: Callable[..., Service], corpus: Path, tmp_path: Path, observer: str
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    names = [f"2024-01-0{i}_titan_{i}.xml" for i in range(1, 4)]
    for i, name in enumerate(names):
        (drop / name).write_bytes(record(corpus, i))
    old = time.time() - 3600
    os.utime(drop / names[0], (old, old))  # long there: taken without settling
    svc = service(NX_OBSERVER=observer)
    svc.ready()
    wait_until(lambda: xml_names(svc.uploaded) == set(names), "all three in uploaded/")
    assert sorted(svc.calls("done")) == sorted(n.removesuffix(".xml") for n in names)
    assert xml_names(drop) == set()


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_slow_writer_is_exported_whole_after_it_closes(
    service: Callable[..., Service], corpus: Path, observer: str
) -> None:
    # Polling has no close event: the settle time must outlast the writer's pauses.
    svc = service(NX_OBSERVER=observer, NX_SETTLE_SECONDS="0.5" if observer == "inotify" else "1")
    svc.ready()
    content = (corpus / "example_record.xml").read_bytes()
    chunks = [content[i : i + 9200] for i in range(0, len(content), 9200)]
    path = svc.drop / "slow.xml"
    with path.open("wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            time.sleep(0.2)  # the writer's own pace: ten chunks over two seconds
        assert svc.calls() == [], "taken before the writer closed it"
    closed = time.monotonic()
    wait_until(lambda: (svc.uploaded / "slow.xml").exists(), "slow.xml in uploaded/")
    latency = time.monotonic() - closed
    print(f"{observer}: close → uploaded/ in {latency:.3f} s")
    assert (svc.uploaded / "slow.xml").read_bytes() == content
    lines = (svc.slow / "calls.log").read_text().splitlines()
    assert lines[0].split() == [
        "start",
        "slow",
        hashlib.sha256(content).hexdigest(),
        str(len(content)),
    ]
    assert svc.calls() == ["slow"]


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_part_file_renamed_to_xml_is_taken(
    service: Callable[..., Service], corpus: Path, observer: str
) -> None:
    svc = service(NX_OBSERVER=observer)
    svc.ready()
    part = svc.drop / "renamed.xml.part"
    part.write_bytes(record(corpus, 1))
    part.rename(svc.drop / "renamed.xml")
    started = time.monotonic()
    wait_until(lambda: (svc.uploaded / "renamed.xml").exists(), "renamed.xml in uploaded/")
    print(f"{observer}: rename → uploaded/ in {time.monotonic() - started:.3f} s")
    assert svc.calls() == ["renamed"]
    assert set(os.listdir(svc.drop)) == {"uploaded", "failed", ".nxdrop"}


@pytest.mark.parametrize("observer", OBSERVERS)
def test_files_copied_or_moved_in_from_another_folder_are_taken(
    service: Callable[..., Service], corpus: Path, tmp_path: Path, observer: str
) -> None:
    svc = service(NX_OBSERVER=observer)
    svc.ready()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "copied.xml").write_bytes(record(corpus, 1))
    (elsewhere / "moved.xml").write_bytes(record(corpus, 2))
    shutil.copy(elsewhere / "copied.xml", svc.drop / "copied.xml")
    os.rename(elsewhere / "moved.xml", svc.drop / "moved.xml")
    wait_until(lambda: xml_names(svc.uploaded) == {"copied.xml", "moved.xml"}, "both uploaded")
    assert sorted(svc.calls()) == ["copied", "moved"]


@pytest.mark.parametrize("observer", OBSERVERS)
def test_a_burst_of_500_files_is_taken_once_each(
    service: Callable[..., Service], corpus: Path, observer: str
) -> None:
    svc = service(NX_OBSERVER=observer)
    svc.ready()
    names = [f"2024-02-01_burst_{i:03d}.xml" for i in range(500)]
    started = time.monotonic()
    for i, name in enumerate(names):
        (svc.drop / name).write_bytes(record(corpus, i))
    wait_until(lambda: len(xml_names(svc.uploaded)) == 500, "500 files in uploaded/", 120)
    print(f"{observer}: 500 files exported in {time.monotonic() - started:.2f} s")
    assert xml_names(svc.uploaded) == set(names)
    starts = Counter(svc.calls())
    assert len(starts) == 500 and set(starts.values()) == {1}, starts.most_common(3)
    assert xml_names(svc.drop) == set() and xml_names(svc.failed) == set()


# -- stopping --------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_exports_finish_and_leaves_the_queue(
    service: Callable[..., Service], corpus: Path, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    names = [f"2024-03-01_stop_{i}.xml" for i in range(4)]
    for i, name in enumerate(names):
        (drop / name).write_bytes(record(corpus, i))
    svc = service(gate=False, NX_WORKERS="2")
    svc.ready()
    wait_until(lambda: len(svc.calls()) == 2, "two exports in flight")
    sent = svc.signal(signal.SIGTERM)
    svc.notify.wait_for(lambda line: line == "STOPPING=1", "STOPPING=1")
    svc.open_gate()  # the two in flight may now finish
    assert svc.wait_exit() == 0
    print(f"SIGTERM → exit in {time.monotonic() - sent:.2f} s")
    in_flight = set(svc.calls())
    assert len(in_flight) == 2
    for name in names:
        expected = ["uploaded"] if name.removesuffix(".xml") in in_flight else ["drop"]
        assert svc.places(name) == expected, name


def test_the_stop_timeout_abandons_what_is_still_running(
    service: Callable[..., Service], corpus: Path
) -> None:
    svc = service(gate=False, NX_STOP_TIMEOUT="1", SLOWDEST_TIMEOUT="3")
    svc.ready()
    (svc.drop / "stuck.xml").write_bytes(record(corpus, 1))
    wait_until(lambda: svc.calls() == ["stuck"], "the export to start")
    sent = svc.signal(signal.SIGTERM)
    assert svc.wait_exit() == 0
    elapsed = time.monotonic() - sent
    print(f"SIGTERM with a stuck export → exit in {elapsed:.2f} s")
    assert 1 <= elapsed < 15
    assert svc.places("stuck.xml") == ["drop"]  # abandoned cleanly, to run again at start
    assert "timeout" in (svc.slow / "calls.log").read_text()


def test_a_record_waiting_to_retry_is_abandoned_at_once(
    service: Callable[..., Service], corpus: Path
) -> None:
    # The destination is busy (503, Retry-After) for as long as nxdrop keeps retrying.
    svc = service(
        NX_WORKERS="1",
        NX_STOP_TIMEOUT="60",
        NX_RETRY_MAX_TIME="60",
        SLOWDEST_MODE="transient",
    )
    svc.ready()
    (svc.drop / "busy.xml").write_bytes(record(corpus, 1))
    (svc.drop / "queued.xml").write_bytes(record(corpus, 2))
    wait_until(lambda: svc.calls().count("busy") >= 2, "a retry")
    sent = svc.signal(signal.SIGTERM)
    assert svc.wait_exit() == 0
    elapsed = time.monotonic() - sent
    print(f"SIGTERM while retrying → exit in {elapsed:.2f} s")
    assert elapsed < 10  # not the 60 s stop timeout, nor the 60 s retry budget
    assert svc.places("busy.xml") == ["drop"]
    assert svc.places("queued.xml") == ["drop"]
    assert "queued" not in svc.calls()


def test_a_second_signal_stops_at_once(service: Callable[..., Service], corpus: Path) -> None:
    svc = service(gate=False, NX_WORKERS="1", NX_STOP_TIMEOUT="60", SLOWDEST_TIMEOUT="3")
    svc.ready()
    (svc.drop / "stuck.xml").write_bytes(record(corpus, 1))
    wait_until(lambda: svc.calls() == ["stuck"], "the export to start")
    svc.signal(signal.SIGTERM)
    svc.notify.wait_for(lambda line: line == "STOPPING=1", "STOPPING=1")
    sent = svc.signal(signal.SIGINT)
    assert svc.wait_exit() == 0
    elapsed = time.monotonic() - sent
    print(f"second signal → exit in {elapsed:.2f} s")
    assert elapsed < 10  # the call in flight ends (3 s), the 60 s stop timeout does not count
    assert svc.places("stuck.xml") == ["drop"]


# -- systemd ------------------------------------------------------------------------------------


def test_sd_notify_ready_status_watchdog_stopping_and_sighup(
    service: Callable[..., Service], corpus: Path
) -> None:
    svc = service(WATCHDOG_USEC="200000")  # ping every 0.1 s; WATCHDOG_PID unset
    svc.notify.wait_for(lambda line: line.startswith("READY=1"), "READY=1")
    assert svc.notify.lines[0] == "READY=1"  # nothing before READY
    assert svc.notify.lines[1].startswith("STATUS=0 queued, 0 exporting; 0 exported, 0 failed")
    wait_until(lambda: svc.notify.count("WATCHDOG=1") >= 3, "three WATCHDOG=1 pings")
    (svc.drop / "a.xml").write_bytes(record(corpus, 1))
    status = svc.notify.wait_for(lambda line: "1 exported" in line, "STATUS with the export")
    assert status.startswith("STATUS=") and "last: a.xml exported at" in status

    svc.signal(signal.SIGHUP)
    svc.wait_log("does not reload its configuration")
    (svc.drop / "b.xml").write_bytes(record(corpus, 2))
    svc.notify.wait_for(lambda line: "2 exported" in line, "STATUS after SIGHUP")
    pings = svc.notify.count("WATCHDOG=1")
    wait_until(lambda: svc.notify.count("WATCHDOG=1") > pings, "WATCHDOG=1 after SIGHUP")

    svc.signal(signal.SIGTERM)
    svc.notify.wait_for(lambda line: line == "STOPPING=1", "STOPPING=1")
    assert svc.wait_exit() == 0


# -- run --once -----------------------------------------------------------------------------------


def once(
    tmp_path: Path, stderr: Any = None, *, launcher: Sequence[str] = (), **extra: str
) -> subprocess.Popen[bytes]:
    """``nxdrop run --once`` on ``tmp_path/drop``, to the archive; ``extra`` environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NX_", "SLOWDEST_"))}
    env.update(
        NX_DATA_PATH=str(tmp_path / "state"),
        NX_DROP_PATH=str(tmp_path / "drop"),
        NX_ARCHIVE_PATH=str(tmp_path / "archive"),
        NX_SETTLE_SECONDS="0.2",
    )
    env.update(extra)
    command = [*launcher, sys.executable, "-m", "nxdrop", "run", "--once"]
    stdout = subprocess.PIPE if launcher else subprocess.DEVNULL
    return subprocess.Popen(command, env=env, stderr=stderr, stdout=stdout)


# Linux keeps a process's peak RSS across exec: a child forked from pytest reports pytest's
# size if that is larger than its own. So nxdrop is forked from this small process instead,
# which passes on its exit code and prints nxdrop's own peak RSS (KiB).
LAUNCHER = [
    sys.executable,
    "-c",
    "import os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execv(sys.argv[1], sys.argv[1:])\n"
    "_, status, usage = os.wait4(pid, 0)\n"
    "print(usage.ru_maxrss)\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n",
]


def run_once_measured(root: Path, count: int) -> tuple[int, int, float]:
    """``run --once`` over ``count`` small records (archive only): exit code, peak RSS in
    KiB (the child's own rusage), seconds."""
    drop = root / "drop"
    drop.mkdir(parents=True)
    head, rest = RECORD_SMALL.read_bytes().split(b"\n", 1)
    old = time.time() - 3600
    for i in range(count):
        path = drop / f"2024-06-01_backlog_{i:05d}.xml"
        path.write_bytes(head + f"\n<!-- {i} -->\n".encode() + rest)
        os.utime(path, (old, old))
    started = time.monotonic()
    with (root / "stderr.log").open("wb") as log:
        proc = once(root, stderr=log, launcher=LAUNCHER)
        out, _ = proc.communicate(timeout=600)
    return proc.returncode, int(out), time.monotonic() - started


def test_run_once_exports_a_backlog_of_20000_with_flat_memory(tmp_path: Path) -> None:
    code, small_peak, _ = run_once_measured(tmp_path / "small", 2_000)
    assert code == 0
    code, peak, seconds = run_once_measured(tmp_path / "large", 20_000)
    print(
        f"run --once: 20,000 records in {seconds:.1f} s ({20_000 / seconds:.0f}/s); "
        f"peak RSS {peak / 1024:.1f} MiB (2,000 records: {small_peak / 1024:.1f} MiB)"
    )
    assert code == 0, (tmp_path / "large" / "stderr.log").read_text()[-2000:]
    uploaded = tmp_path / "large" / "drop" / "uploaded"
    assert len(list(uploaded.iterdir())) == 20_000
    assert list((tmp_path / "large" / "drop").glob("*.xml")) == []
    # Ten times the files: only the sorted list of their names grows (~0.2 KiB a file).
    assert peak - small_peak < 10 * 1024


def test_run_once_counts_a_file_it_could_not_finish(tmp_path: Path, corpus: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "done.xml").write_bytes(record(corpus, 1))
    writer = (drop / "writing.xml").open("wb")  # a builder that never finishes
    try:
        writer.write(record(corpus, 2)[:100])
        writer.flush()
        proc = once(tmp_path, stderr=subprocess.PIPE, NX_SETTLE_SECONDS="0.5")
        _, err = proc.communicate(timeout=DEADLINE)
    finally:
        writer.close()
    assert proc.returncode == 1
    assert b"1 of 2 files not exported" in err
    assert xml_names(drop / "uploaded") == {"done.xml"}


def test_run_once_exit_codes_and_no_progress_bar_off_a_terminal(
    tmp_path: Path, corpus: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "a.xml").write_bytes(record(corpus, 1))
    (drop / "b.xml").write_bytes(record(corpus, 2))
    proc = once(tmp_path, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0, err
    assert xml_names(drop / "uploaded") == {"a.xml", "b.xml"}
    assert b"\r[" not in err and b"2/2" not in err

    (drop / "c.xml").write_bytes(record(corpus, 3))
    (drop / "broken.xml").write_bytes(b"<not xml")
    proc = once(tmp_path, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 1, err
    assert xml_names(drop / "failed") == {"broken.xml"}
    assert "c.xml" in xml_names(drop / "uploaded")


def test_run_once_draws_a_progress_bar_on_a_terminal_and_log_lines_above_it(
    tmp_path: Path, corpus: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    for i in range(3):
        (drop / f"p{i}.xml").write_bytes(record(corpus, i))
    (drop / "broken.xml").write_bytes(b"<not xml")  # logs an error between two bars
    leader, follower = pty.openpty()
    proc = once(tmp_path, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other end closed
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=DEADLINE) == 1  # the broken record
    assert b"4/4" in output and b"[" + b"#" * 30 + b"]" in output
    # What the terminal shows: each piece after an erase starts a line of its own; a log
    # line is never written onto the bar's line.
    lines = output.replace(b"\r\n", b"\n").split(b"\n")  # the terminal's \n is \r\n
    pieces = [p.removeprefix(b"\x1b[K") for line in lines for p in line.split(b"\r")]
    pieces = [p for p in pieces if p.strip()]
    assert any(p.startswith(b"ERROR   broken.xml rejected") for p in pieces), output
    bar = re.compile(rb"\[[#.]{30}\] [1-4]/4 exported [0-3], not exported [01]")
    assert all(bar.fullmatch(p) for p in pieces if p.startswith(b"[")), output
    assert pieces[-2].startswith(b"[" + b"#" * 30 + b"] 4/4"), output
    assert pieces[-1] == b"nxdrop: 1 of 4 files not exported", output


# -- in-process: the observer's crashes, lost events, dedup and the queue bound --------------------


class GateDestination:
    """Blocks every export until its gate opens; counts calls and concurrent calls per record."""

    name = "gate"
    priority = 10
    enabled = True

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.running: Counter[str] = Counter()
        self.most_at_once = 0

    def validate_config(self) -> tuple[bool, str | None]:
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        session = context.session_identifier
        with self.lock:
            self.calls[session] += 1
            self.running[session] += 1
            self.most_at_once = max(self.most_at_once, self.running[session])
        self.gate.wait(DEADLINE)
        with self.lock:
            self.running[session] -= 1
        return ExportResult(True, self.name, record_id=session)


@pytest.fixture
def daemon_for(
    make_app: Callable[..., App],
) -> Iterator[Callable[..., tuple[Daemon, GateDestination]]]:
    """An in-process daemon with the gate destination (gate open unless told)."""
    made: list[tuple[Daemon, GateDestination]] = []

    def make(
        *, gate: bool = True, watch: bool = True, **overrides: Any
    ) -> tuple[Daemon, GateDestination]:
        values: dict[str, Any] = {"settle_seconds": 0.3, "stop_timeout": 5, "workers": 2}
        dest = GateDestination()
        if gate:
            dest.gate.set()
        app = make_app(dest, **(values | overrides))
        daemon = Daemon(app, notifier=Notifier({}), watch=watch)
        made.append((daemon, dest))
        return daemon, dest

    yield make
    for daemon, dest in made:
        dest.gate.set()
        daemon.shutdown()


def loop_until(daemon: Daemon, predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        daemon.loop_once()


def test_no_event_is_lost_past_a_full_batch_of_the_inbox(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]], drop: Path, corpus: Path
) -> None:
    """A burst puts more events into the inbox than the loop takes at once (BATCH): each
    is handled, none is left for a rescan."""
    daemon, dest = daemon_for(watch=False)  # no observer: the sightings below are all
    daemon.start()
    paths = [drop / f"2024-02-01_inbox_{i:04d}.xml" for i in range(BATCH + 10)]
    for i, path in enumerate(paths):
        path.write_bytes(record(corpus, i))
    for path in paths:  # what the observer puts there: one close event each
        daemon.inbox.put(Sighting(path, Kind.READY))
    uploaded = drop / "uploaded"
    loop_until(daemon, lambda: len(xml_names(uploaded)) == len(paths), "every file exported")
    assert len(dest.calls) == len(paths) and xml_names(drop) == set()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_crashed_observer_is_restarted_and_files_keep_coming(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]],
    drop: Path,
    corpus: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    daemon, dest = daemon_for(rescan_seconds=300)
    daemon.start()
    watcher = daemon.intake.watcher
    assert watcher is not None
    old = watcher.observer
    assert old is not None
    old.schedule(Crasher(), str(drop))  # raises in watchdog's thread: it dies
    with caplog.at_level(logging.WARNING, logger="nxdrop"):
        (drop / "a.xml").write_bytes(record(corpus, 1))
        Crasher.wait_until_dead(watcher)
        assert not daemon.healthy()  # no WATCHDOG=1 now
        loop_until(daemon, lambda: watcher.observer is not old, "the watcher restarted")
        loop_until(daemon, lambda: (drop / "uploaded" / "a.xml").exists(), "a.xml uploaded")
    assert daemon.healthy()
    assert "watcher on" in caplog.text and "died; restarting it" in caplog.text
    (drop / "b.xml").write_bytes(record(corpus, 2))
    loop_until(daemon, lambda: (drop / "uploaded" / "b.xml").exists(), "b.xml uploaded")
    assert dest.calls == Counter({"a": 1, "b": 1})


def test_files_whose_events_were_lost_are_found_by_the_rescan(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]],
    drop: Path,
    corpus: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon, dest = daemon_for(rescan_seconds=0.5)
    daemon.start()
    watcher = daemon.intake.watcher
    assert watcher is not None and watcher.handler is not None
    monkeypatch.setattr(watcher.handler, "dispatch", lambda event: None)  # deaf
    with caplog.at_level(logging.INFO, logger="nxdrop"):
        for i in range(5):
            (drop / f"lost{i}.xml").write_bytes(record(corpus, i))
        loop_until(daemon, lambda: len(xml_names(drop / "uploaded")) == 5, "five uploaded")
    assert "found by the rescan" in caplog.text
    assert set(dest.calls.values()) == {1}


def test_an_event_overflow_makes_an_immediate_rescan(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]],
    drop: Path,
    corpus: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    daemon, _ = daemon_for(rescan_seconds=3600)
    daemon.start()
    watcher = daemon.intake.watcher
    assert watcher is not None and watcher.handler is not None
    monkeypatch.setattr(watcher.handler, "dispatch", lambda event: None)
    (drop / "dropped.xml").write_bytes(record(corpus, 1))
    # What watchdog logs when the kernel reports IN_Q_OVERFLOW:
    logging.getLogger(OVERFLOW_LOGGER).warning(
        "Inotify queue overflowed; filesystem events were lost"
    )
    loop_until(daemon, lambda: (drop / "uploaded" / "dropped.xml").exists(), "dropped.xml uploaded")


def test_a_file_named_again_while_in_flight_is_not_exported_twice(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]], drop: Path, corpus: Path
) -> None:
    path = drop / "twice.xml"
    path.write_bytes(record(corpus, 1))
    old = time.time() - 60
    os.utime(path, (old, old))
    daemon, dest = daemon_for(gate=False, rescan_seconds=0.05, workers=4)
    daemon.start()
    loop_until(daemon, lambda: dest.calls["twice"] == 1, "the export to start")
    for _ in range(20):  # closes, renames, rescans: all name the same file
        daemon.inbox.put(Sighting(path, Kind.READY))
        daemon.inbox.put(Sighting(path, Kind.CHANGED))
        daemon.loop_once(timeout=0.01)
    assert dest.calls["twice"] == 1
    dest.gate.set()
    loop_until(daemon, lambda: daemon.counts[Outcome.EXPORTED] == 1, "the export to finish")
    idle = "0 queued, 0 exporting; 1 exported"
    loop_until(daemon, lambda: daemon.status_line().startswith(idle), "the echoes to die down")
    assert dest.most_at_once == 1 and dest.calls["twice"] == 1

    path.write_bytes(record(corpus, 2))  # dropped again under the same name: a new record
    loop_until(daemon, lambda: daemon.counts[Outcome.EXPORTED] == 2, "the second export")
    assert dest.calls["twice"] == 2
    assert xml_names(drop / "uploaded") == {"twice.xml", "twice.1.xml"}


def test_the_backlog_held_in_memory_is_bounded_and_the_rest_is_found_later(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]], drop: Path, corpus: Path
) -> None:
    old = time.time() - 60
    for i in range(12):
        (drop / f"q{i:02d}.xml").write_bytes(record(corpus, i))
        os.utime(drop / f"q{i:02d}.xml", (old + i, old + i))
    daemon, dest = daemon_for(gate=False, workers=1, queue_size=3)
    daemon.start()
    loop_until(daemon, lambda: sum(dest.calls.values()) == 1, "one export in flight")
    daemon.loop_once(timeout=0.05)
    assert len(daemon.intake) <= 3 and daemon.dispatcher.queued <= 1  # the rest: in the folder
    assert daemon.status_line().startswith(
        f"{len(daemon.intake) + daemon.dispatcher.queued} queued, 1 exporting"
    )
    dest.gate.set()
    loop_until(daemon, lambda: len(xml_names(drop / "uploaded")) == 12, "all twelve uploaded")
    assert set(dest.calls.values()) == {1} and len(dest.calls) == 12
    assert list(dest.calls) == [f"q{i:02d}" for i in range(12)]  # oldest first


def test_run_once_lets_fresh_files_settle(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]], drop: Path, corpus: Path
) -> None:
    old = time.time() - 60
    (drop / "old.xml").write_bytes(record(corpus, 1))
    os.utime(drop / "old.xml", (old, old))
    (drop / "new.xml").write_bytes(record(corpus, 2))  # just written: settles first
    daemon, dest = daemon_for(watch=False)
    summary = daemon.run_once()
    assert summary.ok and summary.found == 2
    assert summary.counts == Counter({Outcome.EXPORTED: 2})
    assert list(dest.calls) == ["old", "new"]


def test_files_of_one_session_wait_for_each_other(
    daemon_for: Callable[..., tuple[Daemon, GateDestination]], drop: Path, corpus: Path
) -> None:
    old = time.time() - 60
    for i, name in enumerate(("x.xml", "x.1.xml", "x.2.xml", "y.xml")):
        (drop / name).write_bytes(record(corpus, i))  # a rebuild each: updates, not reuses
        os.utime(drop / name, (old + i, old + i))
    daemon, dest = daemon_for(gate=False, workers=4, watch=False)
    daemon.intake.start()
    daemon._feed()
    loop_until(daemon, lambda: sum(dest.calls.values()) == 2, "x and y under way")
    daemon.loop_once(timeout=0.1)
    assert dest.calls == Counter({"x": 1, "y": 1})  # x.1.xml and x.2.xml wait for x.xml
    dest.gate.set()
    loop_until(daemon, lambda: len(xml_names(drop / "uploaded")) == 4, "all four uploaded")
    assert dest.most_at_once == 1 and dest.calls == Counter({"x": 3, "y": 1})
