"""kill -9 at random moments: no record lost, none published twice, no attempt left in flight.

A real ``nxdrop run`` exports 100 records to one stateful fake of each destination — CDCS,
eLabFTW, the archive and the webhook plugin (whose receiver honours its idempotency key) —
each answering in 20–50 ms, while the test kills it with SIGKILL at random moments (before
it is ready, mid-call, mid-move) at least 15 times and starts it again, dropping more
records in between. Then one last run finishes the work, and the test counts, as a user
would: every record exactly once in ``uploaded/`` and nowhere else, exactly one record per
session at every destination, holding the file's bytes, and no attempt still ``in_flight``.
"""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures.service import Service, record, wait_until
from tests.fixtures.world import World

RECORDS = 100
KILLS = 15


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing(
    service: Callable[..., Service], world: World, corpus: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    drop = tmp_path / "drop"
    drop.mkdir()
    contents = {
        f"2024-05-{seed:02d}_chaos_{i:03d}.xml": record(corpus, seed * 1000 + i)
        for i in range(RECORDS)
    }
    waiting = list(contents)
    rng.shuffle(waiting)

    def drop_some(n: int) -> None:
        for _ in range(min(n, len(waiting))):
            name = waiting.pop()
            (drop / name).write_bytes(contents[name])

    def start() -> Service:
        return service(slow=False, site=world.site, NX_WORKERS="4", **world.env)

    drop_some(RECORDS // 2)  # half of them wait at the first start
    started = time.monotonic()
    for _ in range(KILLS):
        svc = start()
        drop_some(rng.randint(0, 8))
        time.sleep(rng.uniform(0.05, 1.5))  # the random moment of the kill, not a wait
        svc.proc.send_signal(signal.SIGKILL)
        svc.proc.wait(timeout=30)
    drop_some(len(waiting))
    svc = start()
    svc.ready()
    work = drop / ".nxdrop" / "work"
    wait_until(
        lambda: len(list(svc.uploaded.iterdir())) == RECORDS and not list(work.rglob("*.xml")),
        "every record exported",
        timeout=300,
    )
    svc.signal(signal.SIGTERM)
    assert svc.wait_exit() == 0
    elapsed = time.monotonic() - started

    # Nothing lost: each record in exactly one place, uploaded/, with its own bytes.
    assert {p.name: p.read_bytes() for p in svc.uploaded.iterdir()} == contents
    assert list(drop.glob("*.xml")) == [] and list(svc.failed.iterdir()) == []
    assert list(work.rglob("*")) == [
        p for p in work.rglob("*") if p.is_dir() or p.suffix == ".lock"
    ]

    # Nothing twice: one record per session at every destination, holding the file's bytes.
    sessions = {name.removesuffix(".xml"): content for name, content in contents.items()}
    assert world.cdcs.title_counts() == Counter(dict.fromkeys(sessions, 1))
    assert len(world.elabftw.experiments) == RECORDS
    assert sorted(p.name for p in world.archive.rglob("*.xml")) == sorted(contents)
    for session, content in sessions.items():
        assert world.holds(session) == {
            "cdcs": [content],
            "elabftw": [content],
            "archive": [content],
        }, session
        assert world.uploads(session) == [[content]], session
    assert len(world.webhook.posts) == RECORDS
    assert {p["session_identifier"] for p in world.webhook.posts} == set(sessions)

    # The log: every session completed, nothing left in flight or locked.
    with sqlite3.connect(tmp_path / "state" / "nxdrop.db") as db:
        states = Counter(s for (s,) in db.execute("SELECT state FROM upload_log"))
        statuses = db.execute("SELECT record_status, owner FROM session_log").fetchall()
    assert states["in_flight"] == 0
    assert statuses == [("COMPLETED", None)] * RECORDS
    resent = sum(n - 1 for n in world.webhook.deliveries.values())
    print(
        f"seed {seed}: {KILLS} kills, {elapsed:.1f} s; attempts {dict(states)}; "
        f"webhook posts re-sent and recognised: {resent}"
    )
