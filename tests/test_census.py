"""Looking before creating only where the log cannot vouch: the census of an endpoint.

A destination looks for the session's record before it creates one, so that nothing is
made twice. Where the database has logged an endpoint since it held none of the
destination's records, and has never logged an attempt for the session there, there is
nothing to find: the lookup is skipped (one request per record and destination fewer).
Everywhere else — a fresh database in front of a server that holds records, a retry after a
reply that was lost — it still looks.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from nxdrop.app import App
from nxdrop.daemon import Daemon
from nxdrop.destinations.cdcs import CDCSDestination
from nxdrop.destinations.elabftw import ELabFTWDestination
from nxdrop.pipeline import Outcome
from nxdrop.settings import Settings
from nxdrop.systemd import Notifier
from tests.fixtures.cdcs_fake import FakeCDCS
from tests.fixtures.elabftw_fake import FakeELabFTW
from tests.fixtures.service import record

MakeApp = Callable[..., App]
MakeSettings = Callable[..., Settings]


def both(
    make_app: MakeApp, make_settings: MakeSettings, cdcs: FakeCDCS, elab: FakeELabFTW, state: Path
) -> App:
    settings = {
        "data_path": state,
        "cdcs_url": cdcs.url,
        "cdcs_token": cdcs.user_token,
        "elabftw_url": elab.url,
        "elabftw_api_key": elab.api_key,
        "retry_max_time": 30,
    }
    destinations = (CDCSDestination(), ELabFTWDestination())
    for destination in destinations:
        destination.configure(make_settings(**settings))
    return make_app(*destinations, **settings)


def drop_records(drop: Path, corpus: Path, count: int, first: int = 0) -> list[Path]:
    paths = [drop / f"2024-01-15_FEI-Titan-TEM_{n}.xml" for n in range(first, first + count)]
    for path in paths:
        path.write_bytes(record(corpus, int(path.stem.rsplit("_", 1)[1])))
    return paths


def lookups(cdcs: FakeCDCS, elab: FakeELabFTW) -> tuple[int, int]:
    """The per-session lookups made: CDCS lists by title, eLabFTW's extended search."""
    by_title = [r for r in cdcs.calls("GET", "rest/data/") if "title" in r.query]
    by_title = [r for r in by_title if "regex" not in r.query]
    searched = [r for r in elab.calls("GET", "experiments") if "extended" in r.query]
    return len(by_title), len(searched)


def titles(cdcs: FakeCDCS) -> list[str]:
    return sorted(r["title"] for r in cdcs.data.values())


def sessions(elab: FakeELabFTW) -> list[str]:
    return sorted(e["title"] for e in elab.experiments.values())


def test_empty_servers_are_not_searched_for_records_never_sent(
    make_app: MakeApp,
    make_settings: MakeSettings,
    cdcs_fake: FakeCDCS,
    elabftw_fake: FakeELabFTW,
    drop: Path,
    corpus: Path,
    tmp_path: Path,
) -> None:
    app = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "state")
    for path in drop_records(drop, corpus, 3):
        assert app.pipeline.process(path).outcome is Outcome.EXPORTED

    assert lookups(cdcs_fake, elabftw_fake) == (0, 0)
    # One create each: CDCS publishes in the create, eLabFTW tags in it.
    assert len(cdcs_fake.calls("POST", "rest/data/")) == 3
    assert len(elabftw_fake.calls("POST", "experiments")) == 3
    assert len(titles(cdcs_fake)) == len(sessions(elabftw_fake)) == 3

    # The same file again: the log knows the session now, and checks what it holds.
    again = drop / "uploaded" / "2024-01-15_FEI-Titan-TEM_0.xml"
    shutil.move(again, drop / again.name)
    assert app.pipeline.process(drop / again.name).outcome is Outcome.EXPORTED
    assert len(titles(cdcs_fake)) == len(sessions(elabftw_fake)) == 3


def test_a_fresh_database_in_front_of_servers_holding_records_finds_them(
    make_app: MakeApp,
    make_settings: MakeSettings,
    cdcs_fake: FakeCDCS,
    elabftw_fake: FakeELabFTW,
    drop: Path,
    corpus: Path,
    tmp_path: Path,
) -> None:
    first = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "first")
    paths = drop_records(drop, corpus, 2)
    for path in paths:
        assert first.pipeline.process(path).outcome is Outcome.EXPORTED
    made = (titles(cdcs_fake), sessions(elabftw_fake))

    # The database is lost; the records are dropped again, one of them rebuilt.
    fresh = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "fresh")
    for path in paths:
        shutil.move(drop / "uploaded" / path.name, path)
    paths[1].write_bytes(record(corpus, 99))
    for path in paths:
        assert fresh.pipeline.process(path).outcome is Outcome.EXPORTED

    assert lookups(cdcs_fake, elabftw_fake) == (2, 2)
    assert (titles(cdcs_fake), sessions(elabftw_fake)) == made  # nothing made twice


def test_a_backlog_in_front_of_a_server_holding_records_is_looked_for_in_batches(
    make_app: MakeApp,
    make_settings: MakeSettings,
    cdcs_fake: FakeCDCS,
    elabftw_fake: FakeELabFTW,
    drop: Path,
    corpus: Path,
    tmp_path: Path,
) -> None:
    """A fresh database in front of a CDCS that holds records cannot vouch for it: CDCS is
    asked about the backlog's sessions 50 at a time, and only a session it holds a record
    of is looked for on its own (README "Looking before creating")."""
    first = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "first")
    held = drop_records(drop, corpus, 2)
    for path in held:
        assert first.pipeline.process(path).outcome is Outcome.EXPORTED
    first_id = cdcs_fake.records_titled("2024-01-15_FEI-Titan-TEM_1")[0]["id"]

    # The database is lost; the two are dropped again (one rebuilt) among 60 new records.
    fresh = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "fresh")
    for path in held:
        shutil.move(drop / "uploaded" / path.name, path)
    held[1].write_bytes(record(corpus, 99))
    backlog = held + drop_records(drop, corpus, 60, first=2)
    an_hour_ago = time.time() - 3600  # a backlog: nothing waits to settle
    for path in backlog:
        os.utime(path, (an_hour_ago, an_hour_ago))
    calls_before = len(cdcs_fake.requests)

    summary = Daemon(fresh, notifier=Notifier({}), watch=False).run_once()

    assert summary.ok and summary.counts[Outcome.EXPORTED] == 62
    batches = [r for r in cdcs_fake.calls("GET", "rest/data/") if "regex" in r.query]
    assert len(batches) == 2  # 62 sessions, 50 at a time
    assert lookups(cdcs_fake, elabftw_fake)[0] == 2  # the two CDCS holds, on their own
    assert len(cdcs_fake.requests) - calls_before < 62 + 2 + 2 + 5  # a create each, little else
    assert set(cdcs_fake.title_counts().values()) == {1}  # nothing made twice
    assert len(cdcs_fake.title_counts()) == 62
    [rebuilt] = cdcs_fake.records_titled("2024-01-15_FEI-Titan-TEM_1")
    assert rebuilt["id"] == first_id and "copy 99" in rebuilt["xml_content"]


def test_a_lost_reply_to_a_create_is_looked_for_on_the_retry(
    make_app: MakeApp,
    make_settings: MakeSettings,
    cdcs_fake: FakeCDCS,
    elabftw_fake: FakeELabFTW,
    drop: Path,
    corpus: Path,
    tmp_path: Path,
) -> None:
    app = both(make_app, make_settings, cdcs_fake, elabftw_fake, tmp_path / "state")
    cdcs_fake.fail_next("POST", "rest/data/", 504, after=True)  # made, the answer lost
    elabftw_fake.fail_next("POST", "experiments", 504, after=True)
    [path] = drop_records(drop, corpus, 1)

    report = app.pipeline.process(path)

    assert report.outcome is Outcome.EXPORTED, report.error
    assert [r.attempts for r in report.results] == [2, 2]
    assert len(titles(cdcs_fake)) == len(sessions(elabftw_fake)) == 1
