"""The watchdog glue on real folders with real observers, and the settle tracker on real files."""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.events import FileSystemEvent, FileSystemEventHandler, PatternMatchingEventHandler
from watchdog.observers.inotify import InotifyObserver

from nxdrop.folders import DropFolder, WorkFolder
from nxdrop.settle import SettleTracker
from nxdrop.watcher import (
    EVENTS,
    OVERFLOW_LOGGER,
    DropHandler,
    Kind,
    Sighting,
    Watcher,
)

DEADLINE = 30.0
OBSERVERS = ["inotify", "polling"]


class Sightings:
    """What a watcher reported, with waits that end as soon as the awaited sighting came."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[Sighting] = queue.SimpleQueue()
        self.seen: list[Sighting] = []
        self.woken = threading.Event()

    def put(self, sighting: Sighting | None) -> None:
        if sighting is None:  # a wakeup: look at the watcher
            self.woken.set()
        else:
            self.queue.put(sighting)

    def wait_for(self, path: Path, kinds: set[Kind] | None = None) -> Sighting:
        deadline = time.monotonic() + DEADLINE
        while (left := deadline - time.monotonic()) > 0:
            try:
                sighting = self.queue.get(timeout=left)
            except queue.Empty:
                break
            self.seen.append(sighting)
            if sighting.path == path and (kinds is None or sighting.kind in kinds):
                return sighting
        raise AssertionError(f"no {kinds or 'sighting'} for {path.name}; saw {self.seen}")

    def names(self) -> set[str]:
        return {s.path.name for s in self.seen}


@pytest.fixture
def folder(drop: Path) -> DropFolder:
    folder = DropFolder(drop)
    folder.create()
    return folder


@pytest.fixture(params=OBSERVERS)
def watching(
    request: pytest.FixtureRequest, folder: DropFolder
) -> Iterator[tuple[Watcher, Sightings]]:
    sightings = Sightings()
    watcher = Watcher(folder, request.param, settle_seconds=0.2, sink=sightings.put)
    watcher.start()
    yield watcher, sightings
    watcher.stop()


def test_a_copied_file_is_ready_on_close_or_settles_when_polling(
    watching: tuple[Watcher, Sightings], drop: Path, corpus: Path
) -> None:
    watcher, sightings = watching
    shutil.copy(corpus / "example_record.xml", drop / "a.xml")
    expected = {Kind.READY} if watcher.kind == "inotify" else {Kind.CHANGED}
    sightings.wait_for(drop / "a.xml", expected)


def test_a_part_renamed_to_xml_is_ready(
    watching: tuple[Watcher, Sightings], drop: Path, corpus: Path
) -> None:
    watcher, sightings = watching
    part = drop / "b.xml.part"
    shutil.copy(corpus / "example_record.xml", part)
    if watcher.kind == "polling":  # the poll must see the .part before the rename
        marker = drop / "marker.xml"
        marker.write_bytes(b"<x/>")
        sightings.wait_for(marker)
    part.rename(drop / "b.xml")
    sightings.wait_for(drop / "b.xml", {Kind.READY})
    assert "b.xml.part" not in sightings.names()


def test_a_file_moved_in_from_another_folder_is_ready(
    watching: tuple[Watcher, Sightings], drop: Path, tmp_path: Path, corpus: Path
) -> None:
    watcher, sightings = watching
    outside = tmp_path / "elsewhere.xml"
    shutil.copy(corpus / "example_record.xml", outside)
    outside.rename(drop / "c.xml")
    # inotify sees a move whose source is outside; polling sees a new file, to settle
    expected = {Kind.READY} if watcher.kind == "inotify" else {Kind.CHANGED}
    sightings.wait_for(drop / "c.xml", expected)


def test_names_that_are_not_records_make_no_sighting(
    watching: tuple[Watcher, Sightings], drop: Path
) -> None:
    _, sightings = watching
    for name in (".hidden.xml", "x.xml.part", "x.xml.tmp", "x.xml~", "notes.txt", ".xml"):
        (drop / name).write_bytes(b"<x/>")
    (drop / "sub.xml").mkdir()
    (drop / "sub.xml" / "inner.xml").write_bytes(b"<x/>")
    (drop / "uploaded" / "done.xml").write_bytes(b"<x/>")
    # Events arrive in order: once the marker is seen, the others would have been too.
    marker = drop / "marker.xml"
    marker.write_bytes(b"<x/>")
    sightings.wait_for(marker)
    assert sightings.names() == {"marker.xml"}


def test_a_hard_link_settles_for_want_of_a_close(
    folder: DropFolder, drop: Path, tmp_path: Path
) -> None:
    sightings = Sightings()
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=sightings.put)
    watcher.start()
    try:
        (tmp_path / "original.xml").write_bytes(b"<x/>")
        os.link(tmp_path / "original.xml", drop / "linked.xml")
        assert sightings.wait_for(drop / "linked.xml").kind is Kind.CHANGED
    finally:
        watcher.stop()


def test_a_write_in_progress_waits_for_the_close(folder: DropFolder, drop: Path) -> None:
    sightings = Sightings()
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=sightings.put)
    watcher.start()
    try:
        with open(drop / "slow.xml", "wb") as fh:
            fh.write(b"<x>")
            fh.flush()
            sightings.wait_for(drop / "slow.xml", {Kind.WRITING})
            fh.write(b"</x>")
        sightings.wait_for(drop / "slow.xml", {Kind.READY})
    finally:
        watcher.stop()


def test_the_move_of_a_claimed_file_is_paired_and_not_held_back(
    folder: DropFolder, drop: Path
) -> None:
    """An unpaired move out would hold every later event for 0.5 s: the latency of the next file."""
    work, _ = WorkFolder.acquire(folder, host="lab")
    sightings = Sightings()
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=sightings.put)
    watcher.start()
    raw: queue.SimpleQueue[FileSystemEvent] = queue.SimpleQueue()

    class Raw(FileSystemEventHandler):
        def on_moved(self, event: FileSystemEvent) -> None:
            raw.put(event)

    try:
        assert watcher.observer is not None
        # The very watch of the watcher (same path, recursion and filter): its move grouper
        watcher.observer.schedule(Raw(), str(drop), recursive=True, event_filter=list(EVENTS))
        (drop / "done.xml").write_bytes(b"<x/>")
        sightings.wait_for(drop / "done.xml", {Kind.READY})
        work.claim(drop / "done.xml")
        event = raw.get(timeout=DEADLINE)
    finally:
        watcher.stop()
        work.release()
    assert (event.src_path, event.dest_path) == (
        str(drop / "done.xml"),
        str(work.path / "done.xml"),
    )


def test_watchdogs_own_patterns_lose_the_part_rename(drop: Path) -> None:
    """Why nxdrop filters names itself: both traps are real in the installed watchdog."""
    got: queue.SimpleQueue[tuple[str, FileSystemEvent]] = queue.SimpleQueue()

    class Recording(PatternMatchingEventHandler):
        def __init__(self, label: str, patterns: list[str], ignore: list[str]) -> None:
            super().__init__(patterns=patterns, ignore_patterns=ignore)
            self.label = label

        def on_any_event(self, event: FileSystemEvent) -> None:
            got.put((self.label, event))

    class Marker(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            if str(event.dest_path).endswith("marker.xml"):
                got.put(("marker", event))

    observer = InotifyObserver()
    observer.schedule(Recording("star", ["*.xml"], []), str(drop))
    observer.schedule(Recording("globstar", ["**/*.xml"], ["**/*.part"]), str(drop))
    observer.schedule(Marker(), str(drop))
    observer.start()
    try:
        (drop / "plain.xml").write_bytes(b"<x/>")
        (drop / "r.xml.part").write_bytes(b"<x/>")
        (drop / "r.xml.part").rename(drop / "r.xml")
        (drop / "m.tmp").write_bytes(b"<x/>")
        (drop / "m.tmp").rename(drop / "marker.xml")
        events: list[tuple[str, FileSystemEvent]] = []
        while not events or events[-1][0] != "marker":
            events.append(got.get(timeout=DEADLINE))
    finally:
        observer.stop()
        observer.join()
    seen = {(label, os.path.basename(str(e.dest_path or e.src_path))) for label, e in events}
    assert not any(label == "star" for label, _ in seen)  # full_match: `*.xml` matches nothing
    assert ("globstar", "plain.xml") in seen  # `**/*.xml` does match...
    assert ("globstar", "r.xml") not in seen  # ...but the move from an ignored name is gone


def test_the_handler_never_raises_into_the_observer(
    folder: DropFolder, drop: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def sink(sighting: Sighting) -> None:
        raise RuntimeError("boom")

    handler = DropHandler(folder, sink, closes=True)
    from watchdog.events import FileClosedEvent

    with caplog.at_level(logging.ERROR):
        handler.dispatch(FileClosedEvent(str(drop / "a.xml")))
    assert "cannot handle" in caplog.text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_dead_observer_is_seen_and_restarted(folder: DropFolder, drop: Path) -> None:
    sightings = Sightings()
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=sightings.put)
    watcher.start()
    try:
        assert watcher.healthy()
        crashed = Crasher()
        assert watcher.observer is not None
        watcher.observer.schedule(crashed, str(drop))  # a second handler on the same watch
        (drop / "first.xml").write_bytes(b"<x/>")
        crashed.wait_until_dead(watcher)
        assert not watcher.healthy()
        # The daemon is woken to look now, not at its next periodic look (15 s away).
        assert sightings.woken.wait(DEADLINE) and watcher.ended()
        watcher.restart()
        assert watcher.healthy()
        (drop / "second.xml").write_bytes(b"<x/>")
        sightings.wait_for(drop / "second.xml", {Kind.READY})
    finally:
        watcher.stop()


class Crasher(FileSystemEventHandler):
    """A handler that raises: watchdog's dispatcher thread dies of it."""

    def dispatch(self, event: FileSystemEvent) -> None:
        raise RuntimeError("handler crash (on purpose)")

    @staticmethod
    def wait_until_dead(watcher: Watcher) -> None:
        assert watcher.observer is not None
        watcher.observer.join(timeout=DEADLINE)
        assert not watcher.observer.is_alive()


def test_an_overflow_warning_raises_the_alarm_once(folder: DropFolder) -> None:
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=lambda s: None)
    watcher.start()
    try:
        assert not watcher.overflowed()
        logging.getLogger(OVERFLOW_LOGGER).warning(
            "Inotify queue overflowed; filesystem events were lost"
        )
        assert watcher.overflowed()
        assert not watcher.overflowed()
    finally:
        watcher.stop()


def test_a_folder_that_cannot_be_watched_raises_and_leaves_no_thread(tmp_path: Path) -> None:
    threads = threading.active_count()
    watcher = Watcher(DropFolder(tmp_path / "missing"), "inotify", 0.2, sink=lambda s: None)
    with pytest.raises(FileNotFoundError):
        watcher.start()
    assert not watcher.healthy()
    assert threading.active_count() == threads


def test_a_vanished_watched_folder_makes_the_watcher_unhealthy(tmp_path: Path) -> None:
    folder = DropFolder(tmp_path / "gone")
    folder.create()
    watcher = Watcher(folder, "inotify", settle_seconds=0.2, sink=lambda s: None)
    watcher.start()
    try:
        shutil.rmtree(folder.path)
        deadline = time.monotonic() + DEADLINE
        while watcher.healthy() and time.monotonic() < deadline:
            time.sleep(0.01)  # polling a thread's state: there is no event to await
        assert not watcher.healthy()
    finally:
        watcher.stop()


# -- the settle tracker ----------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tracker(clock: Clock) -> SettleTracker:
    return SettleTracker(settle_seconds=2, patience=60, clock=clock)


def test_a_file_settles_when_size_and_mtime_stand_still(
    tracker: SettleTracker, clock: Clock, drop: Path
) -> None:
    path = drop / "a.xml"
    path.write_bytes(b"<x")
    tracker.note(path)
    clock.now += 1.9
    assert tracker.due() == []
    with path.open("ab") as fh:
        fh.write(b"/>")  # a change restarts the wait
    clock.now += 1.9
    assert tracker.due() == []
    clock.now += 1.9
    assert tracker.due() == []
    clock.now += 0.2
    assert tracker.due() == [path]
    assert path not in tracker


def test_an_mtime_change_alone_restarts_the_wait(
    tracker: SettleTracker, clock: Clock, drop: Path
) -> None:
    path = drop / "a.xml"
    path.write_bytes(b"<x/>")
    tracker.note(path)
    clock.now += 1.5
    assert tracker.due() == []
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000))
    clock.now += 1.5
    assert tracker.due() == []
    clock.now += 2
    assert tracker.due() == [path]


def test_a_noted_change_restarts_the_wait(tracker: SettleTracker, clock: Clock, drop: Path) -> None:
    path = drop / "a.xml"
    path.write_bytes(b"<x/>")
    tracker.note(path)
    clock.now += 1.5
    tracker.note(path)
    clock.now += 1.5
    assert tracker.due() == []
    clock.now += 0.5
    assert tracker.due() == [path]


def test_a_file_being_written_or_empty_waits_for_patience(
    tracker: SettleTracker, clock: Clock, drop: Path
) -> None:
    writing, empty = drop / "writing.xml", drop / "empty.xml"
    writing.write_bytes(b"<x")
    empty.touch()
    tracker.note(writing, writing=True)
    tracker.note(empty)
    clock.now += 30
    assert tracker.due() == []
    clock.now += 31
    assert sorted(tracker.due()) == [empty, writing]


def test_a_file_found_old_waits_only_for_the_rest(
    tracker: SettleTracker, clock: Clock, drop: Path
) -> None:
    path = drop / "a.xml"
    path.write_bytes(b"<x/>")
    tracker.note(path, age=1.5)  # a scan saw an mtime 1.5 s old
    clock.now += 0.4
    assert tracker.due() == []
    clock.now += 0.1
    assert tracker.due() == [path]


def test_a_vanished_file_is_dropped(tracker: SettleTracker, clock: Clock, drop: Path) -> None:
    path = drop / "a.xml"
    path.write_bytes(b"<x/>")
    tracker.note(path)
    path.unlink()
    clock.now += 5
    assert tracker.due() == []
    assert len(tracker) == 0


def test_a_symlink_is_tracked_not_followed(
    tracker: SettleTracker, clock: Clock, drop: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target.xml"
    target.write_bytes(b"<x")
    link = drop / "link.xml"
    link.symlink_to(target)
    tracker.note(link)
    clock.now += 1
    target.write_bytes(b"<x/> and more")  # the target's changes are not the link's
    clock.now += 1.5
    assert tracker.due() == [link]


def test_real_time_settling(drop: Path) -> None:
    """The real clock, a short settle time: due soon after the last write, not before."""
    tracker = SettleTracker(settle_seconds=0.3, patience=60)
    path = drop / "a.xml"
    path.write_bytes(b"<x/>")
    written = time.monotonic()
    tracker.note(path)
    found: list[Path] = []
    deadline = written + DEADLINE
    while not found and time.monotonic() < deadline:
        found = tracker.due()
        time.sleep(0.02)  # the daemon's check cadence
    assert found == [path]
    assert time.monotonic() - written >= 0.3


def test_after_lost_events_a_file_being_written_settles_instead_of_waiting(
    tracker: SettleTracker, clock: Clock, drop: Path
) -> None:
    path = drop / "x.xml"
    path.write_text("<Experiment/>")
    tracker.note(path, writing=True)  # its close event died with the observer
    clock.now += tracker.settle_seconds
    assert tracker.due() == []  # still waiting for a close that will not come
    tracker.events_lost()
    assert tracker.due() == [path]
