"""Races a builder and an operator can start, against a real ``nxdrop run`` and stateful fakes.

Each test drops records the way a user does, then looks at what every destination holds,
as a user would: one record per session, holding the newest content, and nothing in
``uploaded/`` that no destination was sent. The slow test destination (priority 110, before
all others) holds a record in flight until the test opens its gate.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests

from tests.fixtures.cdcs_fake import start_fake_cdcs
from tests.fixtures.service import Service, record, wait_until
from tests.fixtures.world import World

GATE_FIRST = {"SLOWDEST_PRIORITY": "110"}


def start(service: Callable[..., Service], world: World, **extra: str) -> Service:
    svc = service(site=world.site, **world.env, **GATE_FIRST, **extra)
    svc.ready()
    return svc


def settled(svc: Service) -> bool:
    """Nothing left in the drop folder or the working folder, nothing running."""
    work = svc.drop / ".nxdrop" / "work"
    in_work = [p for p in work.rglob("*.xml")] if work.exists() else []
    return not list(svc.drop.glob("*.xml")) and not in_work


def assert_one_record_each(world: World, session: str, content: bytes) -> None:
    assert world.holds(session) == {
        "cdcs": [content],
        "elabftw": [content],
        "archive": [content],
    }
    assert world.announced(content)


def test_a_record_rebuilt_while_it_is_exported_is_exported_again(
    service: Callable[..., Service], world: World, corpus: Path
) -> None:
    svc = start(service, world, NX_SETTLE_SECONDS="0.3")
    first, rebuilt = record(corpus, 1), record(corpus, 2)
    svc.slow.joinpath("gate").unlink()
    (svc.drop / "x.xml").write_bytes(first)
    wait_until(lambda: svc.calls() == ["x"], "the first version in flight")
    # The builder writes the session anew: a temporary file renamed over the record.
    (svc.drop / "x.xml.part").write_bytes(rebuilt)
    os.replace(svc.drop / "x.xml.part", svc.drop / "x.xml")
    svc.open_gate()

    wait_until(lambda: world.holds("x")["archive"] == [rebuilt], "the rebuilt record archived")
    wait_until(lambda: settled(svc), "the drop folder to empty")
    assert_one_record_each(world, "x", rebuilt)
    assert sorted(p.read_bytes() for p in svc.uploaded.iterdir()) == sorted([first, rebuilt])


def test_a_record_appended_to_while_it_is_exported_is_exported_with_its_new_end(
    service: Callable[..., Service], world: World, corpus: Path, tmp_path: Path
) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    first = record(corpus, 1)
    (drop / "x.xml").write_bytes(first)
    old = time.time() - 60
    os.utime(drop / "x.xml", (old, old))
    writer = (drop / "x.xml").open("ab")  # the builder still has it open
    try:
        svc = start(service, world, gate=False)
        wait_until(lambda: svc.calls() == ["x"], "the export in flight")
        writer.write(b"<!-- a last line, written late -->\n")
    finally:
        writer.close()
    final = first + b"<!-- a last line, written late -->\n"
    svc.open_gate()

    wait_until(lambda: world.holds("x")["archive"] == [final], "the final bytes archived")
    wait_until(lambda: settled(svc), "the drop folder to empty")
    assert_one_record_each(world, "x", final)
    assert [p.read_bytes() for p in svc.uploaded.iterdir()] == [final]


def test_two_names_of_one_session_make_one_record_per_destination(
    service: Callable[..., Service], world: World, corpus: Path, tmp_path: Path
) -> None:
    # An operator's retry racing the builder: x.xml and x.1.xml, the same bytes, at once.
    drop = tmp_path / "drop"
    drop.mkdir()
    sessions = [f"2024-03-0{i}_titan_{i}" for i in range(1, 9)]
    old = time.time() - 60
    for i, session in enumerate(sessions):
        for name in (f"{session}.xml", f"{session}.1.xml"):
            (drop / name).write_bytes(record(corpus, i))
            os.utime(drop / name, (old, old))
    svc = start(service, world)

    wait_until(lambda: len(list(svc.uploaded.iterdir())) == 16, "all sixteen files exported")
    for i, session in enumerate(sessions):
        assert_one_record_each(world, session, record(corpus, i))
        assert world.uploads(session) == [[record(corpus, i)]]
    assert sum(world.webhook.deliveries.values()) == len(sessions)


def test_a_switched_cdcs_never_takes_anothers_record_for_ours(
    corpus: Path, drop: Path, tmp_path: Path
) -> None:
    staging, stop_staging = start_fake_cdcs()
    production, stop_production = start_fake_cdcs()
    try:
        # Production already holds a private draft with the id staging will give ours.
        draft = requests.post(
            f"{production.url}rest/data/",
            json={"template": production.template_id, "title": "a-draft", "xml_content": "<d/>"},
            headers={"Authorization": f"Token {production.user_token}"},
            timeout=30,
        ).json()["id"]
        assert draft == staging.next_id
        content = record(corpus, 1)

        def run_once(cdcs_url: str) -> subprocess.CompletedProcess[str]:
            (drop / "x.xml").write_bytes(content)
            env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
            env |= {
                "NX_DATA_PATH": str(tmp_path / "state"),
                "NX_DROP_PATH": str(drop),
                "NX_SETTLE_SECONDS": "0.1",
                "NX_CDCS_URL": cdcs_url,
                "NX_CDCS_TOKEN": staging.user_token,
            }
            return subprocess.run(
                [sys.executable, "-m", "nxdrop", "run", "--once"],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )

        assert run_once(staging.url).returncode == 0
        assert staging.records_titled("x")[0]["id"] == draft
        switched = run_once(production.url)  # staging → production, the file dropped again

        assert switched.returncode == 0, switched.stderr
        untouched = production.record(draft)
        assert (untouched["title"], untouched["xml_content"]) == ("a-draft", "<d/>")
        assert untouched["workspace"] is None  # still private
        [ours] = production.records_titled("x")
        assert ours["xml_content"].encode() == content and ours["workspace"] is not None
    finally:
        stop_staging()
        stop_production()
