"""``nxdrop status --html``: the page a facility manager opens, checked in a real browser.

A database is filled through the real :class:`Store` API with known rows over ten days (the
store's clock set for each), the page is made by ``python -m nxdrop`` as a subprocess, and
Debian's Chromium, driven by Playwright, opens it from disk: nothing fails to load, nothing
is logged to the console, the numbers it shows are what plain SQL counts, and the hostile
text in the log is shown as text, never run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest

from nxdrop.destinations import ExportResult
from nxdrop.records import Record
from nxdrop.report import Failure, Period, load, render, summarize
from nxdrop.store import AttemptState, RecordStatus, Store
from tests.conftest import REPO, unavailable

if TYPE_CHECKING:
    from playwright.sync_api import Browser

CHROMIUM_ARGS = [
    "--no-sandbox",  # CI runs as root
    "--disable-gpu",
    # No network here beyond the package registries: nothing may try to reach out.
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
TZ = "Europe/Berlin"
HOSTILE_ERROR = '<script>window.__pwned = 1</script> HTTP 500 & "quotes"'
HOSTILE_SESSION = "2026-11-27_<img src=x onerror=window.__pwned=2>_7"
REJECTION = "not well-formed XML: <script>window.__pwned = 3</script>\x1b[31m at line 1"
SUCCEEDED = ("succeeded", "updated", "reused")


@dataclass
class Export:
    """One record's run, as the pipeline logs it: the session lock, one attempt per
    destination, the outcome, the lock released."""

    hours_ago: float
    session: str
    status: RecordStatus
    attempts: tuple[tuple[str, AttemptState, str | None], ...] = ()
    error: str | None = None  # a rejection's reason


def _scenario(tag: str = "") -> list[Export]:
    """Ten days of a facility's log; ``tag`` makes the sessions unique."""
    ok, updated, reused = AttemptState.SUCCEEDED, AttemptState.UPDATED, AttemptState.REUSED
    failed, in_flight = AttemptState.FAILED, AttemptState.IN_FLIGHT
    done, not_done = RecordStatus.COMPLETED, RecordStatus.BUILT_NOT_EXPORTED
    s = [f"2026-11-2{n}_FEI-Titan-TEM_{n}{tag}" for n in range(10)]
    return [
        # Outside the 7 days: never counted.
        Export(400, s[0], RecordStatus.ERROR, error="too old to show"),
        Export(200, s[1], done, (("cdcs", failed, "too old to show"),)),
        # Failed at eLabFTW, and exported when retried an hour later.
        Export(100, s[2], not_done, (("cdcs", ok, None), ("elabftw", failed, "HTTP 403"))),
        Export(99, s[2], done, (("cdcs", reused, None), ("elabftw", ok, None))),
        Export(160, s[3], done, (("archive", ok, None),)),
        # Killed mid-record: the attempt becomes interrupted, the session stays EXPORTING.
        Export(50, s[4], RecordStatus.EXPORTING, (("cdcs", in_flight, None),)),
        Export(
            30,
            HOSTILE_SESSION + tag,
            not_done,
            (("cdcs", failed, HOSTILE_ERROR), ("elabftw", failed, "needs the CDCS record")),
        ),
        Export(5, s[5], RecordStatus.ERROR, error=REJECTION),
        # Failed at CDCS, then exported: "record now" says so.
        Export(1.7, s[6], not_done, (("cdcs", failed, "HTTP 503"),)),
        Export(0.5, s[6], done, (("cdcs", updated, None),)),
        Export(1.2, s[7], done, (("cdcs", ok, None), ("elabftw", ok, None), ("archive", ok, None))),
    ]


# What the scenario puts in the 7 days (hard numbers, so that the page and SQL cannot agree
# on nothing).
EXPECTED_OUTCOMES = {"COMPLETED": 4, "BUILT_NOT_EXPORTED": 1, "ERROR": 1, "EXPORTING": 1}
EXPECTED_DESTINATIONS = {
    "archive": {"succeeded": 2, "failed": 0, "interrupted": 0, "in_flight": 0},
    "cdcs": {"succeeded": 4, "failed": 2, "interrupted": 1, "in_flight": 0},
    "elabftw": {"succeeded": 2, "failed": 2, "interrupted": 0, "in_flight": 0},
}


def _record(session: str) -> Record:
    return Record(
        path=Path(f"{session}.xml"),
        name=f"{session}.xml",
        signature=(0, 0, 0),
        content=b"",
        sha256=hashlib.sha256(session.encode()).hexdigest(),
        session_identifier=session,
        title="A session",
        instrument_pid="FEI-Titan-TEM",
        user="ned",
        dt_from=None,
        dt_to=None,
    )


def _log(store: Store, exports: list[Export], now: datetime, clock: Callable[..., None]) -> None:
    """Write ``exports`` through the real Store API, each at its time before ``now``."""
    for n, export in enumerate(exports):
        at = now - timedelta(hours=export.hours_ago)
        clock(at)
        worker = f"lab-{n}"
        record = _record(export.session)
        assert store.lock_session(export.session, worker, record.name)
        for i, (destination, state, error) in enumerate(export.attempts):
            attempt = store.begin_attempt(record, destination, f"https://{destination}/", worker)
            if state is AttemptState.IN_FLIGHT:
                continue
            clock(at + timedelta(seconds=2 + i))  # one after the other, as the pipeline runs
            ok = state is not AttemptState.FAILED
            result = ExportResult(
                ok,
                destination,
                record_id="7" if ok else None,
                error_message=error,
                status_code=None if ok else 500,
                attempts=1 if ok else 3,
            )
            store.finish_attempt(attempt, result, state, 2.0)
        if export.status is RecordStatus.EXPORTING:
            store.recover([worker])  # killed mid-record: what the next start does
            continue
        if export.status is RecordStatus.ERROR:
            store.set_session(
                export.session, export.status, file_name=record.name, error_message=export.error
            )
        else:
            store.set_session(export.session, export.status, record=record)
        store.unlock_session(export.session, worker)


@pytest.fixture
def logged(tmp_path: Path) -> Path:
    """A state folder whose database holds :func:`_scenario`; its path."""
    state = tmp_path / "state"
    clock = [datetime.now(UTC)]
    store = Store(f"sqlite:///{state / 'nxdrop.db'}", clock=lambda: clock[0])
    _log(store, _scenario(), datetime.now(UTC), lambda at: clock.__setitem__(0, at))
    store.close()
    return state


def _make_page(state: Path, page: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NX_")}
    env |= {"NX_DATA_PATH": str(state), "TZ": TZ}
    return subprocess.run(
        [sys.executable, "-m", "nxdrop", "status", "--html", str(page), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """Debian's Chromium (``apt-get install chromium``), driven by Playwright: Playwright's
    own browser download cannot work here."""
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        unavailable("Playwright is not installed (pip install playwright)")
    executable = shutil.which("chromium")
    if executable is None:
        unavailable("Chromium is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Error as exc:
            unavailable(f"Chromium does not start: {exc}")
        yield browser
        browser.close()


# Everything the page shows that the test checks, read from the rendered DOM.
READ_PAGE = """() => {
  const text = (el) => el.innerText.trim();
  const rows = (selector) => [...document.querySelectorAll(selector)];
  return {
    since: document.querySelector('#since').getAttribute('datetime'),
    until: document.querySelector('#until').getAttribute('datetime'),
    zone: text(document.querySelector('#zone')),
    outcomes: Object.fromEntries(rows('#outcomes li[data-status]')
      .map((li) => [li.dataset.status, text(li.querySelector('.n'))])),
    destinations: Object.fromEntries(rows('#destination-totals tr[data-destination]')
      .map((tr) => [tr.dataset.destination, Object.fromEntries(
        [...tr.querySelectorAll('td[data-kind]')].map((td) => [td.dataset.kind, text(td)]))])),
    hourly: rows('#hourly tr[data-hour]').map((tr) => [tr.dataset.hour,
      [...tr.querySelectorAll('td')].map((td) =>
        [td.dataset.status || `${td.dataset.destination}/${td.dataset.kind}`, text(td)])]),
    failures: rows('#failure-table tbody tr').map((tr) => [...tr.cells].map(text)),
    failureKinds: rows('#failure-table tbody tr').map((tr) => tr.dataset.kind),
    scripts: document.scripts.length,
    images: document.images.length,
    pwned: window.__pwned === undefined ? null : window.__pwned,
  };
}"""


def test_page_in_chromium_shows_what_the_database_says(
    chromium: Browser, logged: Path, tmp_path: Path
) -> None:
    page_file = tmp_path / "report" / "nxdrop.html"
    page_file.parent.mkdir()
    made = _make_page(logged, page_file, "--days", "7")
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == f"wrote {page_file}"

    page = chromium.new_page()
    problems: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}"))
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
    page.on("request", lambda r: requests.append(r.url))
    response = page.goto(page_file.as_uri(), wait_until="load")
    assert response is not None and response.ok
    page.get_by_text("The numbers per hour").click()  # open the table as a person would
    assert page.locator("#hourly").is_visible()
    page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
    shown = page.evaluate(READ_PAGE)
    page.close()

    # Rendered without a word on the console, and nothing fetched but the page itself.
    assert problems == []
    assert set(requests) == {page_file.as_uri()}

    # The period, as the page states it, in the database's own format.
    since, until = (_stored(shown[end]) for end in ("since", "until"))
    assert _parse(shown["until"]) - _parse(shown["since"]) == timedelta(days=7)
    assert abs(datetime.now(UTC) - _parse(shown["until"])) < timedelta(minutes=5)
    assert set(shown["zone"].split(" / ")) <= {"CET (UTC+01:00)", "CEST (UTC+02:00)"}

    db = sqlite3.connect(logged / "nxdrop.db")
    period = (since, until)
    expected = _sql_figures(db, period)
    assert expected["outcomes"] == EXPECTED_OUTCOMES  # the scenario is what it says
    assert expected["destinations"] == EXPECTED_DESTINATIONS
    assert {k: int(v) for k, v in shown["outcomes"].items()} == expected["outcomes"]
    assert {
        d: {k: int(v) for k, v in kinds.items()} for d, kinds in shown["destinations"].items()
    } == expected["destinations"]
    hourly = {hour: {key: int(v) for key, v in cells if int(v)} for hour, cells in shown["hourly"]}
    assert hourly == expected["hourly"]

    # The failures, newest first: each failed attempt and each rejection of the period.
    rows = db.execute(
        """SELECT "timestamp", session_identifier, destination_name, error_message, file_name
        FROM upload_log WHERE state = 'failed' AND "timestamp" BETWEEN ? AND ?
        UNION ALL
        SELECT "timestamp", session_identifier, NULL, error_message, file_name
        FROM session_log WHERE record_status = 'ERROR' AND "timestamp" BETWEEN ? AND ?
        ORDER BY 1 DESC""",
        (*period, *period),
    ).fetchall()
    assert len(rows) == len(shown["failures"]) == 5
    berlin = ZoneInfo(TZ)
    for (stamp, session, destination, error, file_name), cells in zip(
        rows, shown["failures"], strict=True
    ):
        when, shown_session, shown_destination, reason, shown_file, _now = cells
        local = datetime.fromisoformat(stamp).astimezone(berlin)
        assert when == local.strftime("%Y-%m-%d %H:%M:%S %Z")
        assert shown_session == session
        assert shown_destination == (destination or "none (rejected)")
        assert reason.startswith(error.replace("\x1b", "\\x1b"))
        assert shown_file == file_name
    assert shown["failureKinds"] == ["failed", "rejected", "failed", "failed", "failed"]
    # The record that failed at eLabFTW and was retried is exported now: the page says so.
    assert shown["failures"][-1][5] == "exported"
    assert shown["failures"][0][5] == "exported"  # the 503, fixed by the update after it

    # Hostile text is shown as text: nothing ran, no element was made of it.
    assert shown["pwned"] is None
    assert shown["scripts"] == 0 and shown["images"] == 0
    texts = [cell for row in shown["failures"] for cell in row]
    assert any(HOSTILE_ERROR in cell for cell in texts)
    assert HOSTILE_SESSION in texts
    assert any("<script>window.__pwned = 3</script>" in cell for cell in texts)


def _sql_figures(db: sqlite3.Connection, period: tuple[str, str]) -> dict[str, Any]:
    """The page's numbers, counted in plain SQL over the stored rows."""
    kind = f"""CASE WHEN state IN {SUCCEEDED} THEN 'succeeded' ELSE state END"""
    where = '"timestamp" BETWEEN ? AND ?'
    outcomes = dict(
        db.execute(
            f"SELECT record_status, count(*) FROM session_log WHERE {where} GROUP BY 1", period
        ).fetchall()
    )
    destinations: dict[str, dict[str, int]] = {}
    for name, k, count in db.execute(
        f"SELECT destination_name, {kind}, count(*) FROM upload_log WHERE {where} GROUP BY 1, 2",
        period,
    ):
        kinds = destinations.setdefault(
            name, {"succeeded": 0, "failed": 0, "interrupted": 0, "in_flight": 0}
        )
        kinds[k] = count
    # Hours in UTC: the first 13 characters of the stored ISO timestamp.
    hourly: dict[str, dict[str, int]] = {}
    for hour, key, count in db.execute(
        f"""SELECT substr("timestamp", 1, 13), record_status, count(*) FROM session_log
        WHERE {where} GROUP BY 1, 2
        UNION ALL
        SELECT substr("timestamp", 1, 13), destination_name || '/' || {kind}, count(*)
        FROM upload_log WHERE {where} AND {kind} IN ('succeeded', 'failed') GROUP BY 1, 2""",
        (*period, *period),
    ):
        hourly.setdefault(f"{hour}:00:00Z", {})[key] = count
    return {"outcomes": outcomes, "destinations": destinations, "hourly": hourly}


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _stored(value: str) -> str:
    """A page's ``datetime`` attribute as ``upload_log`` stores times in SQLite."""
    return _parse(value).astimezone(UTC).isoformat(timespec="microseconds")


# -- without a browser -------------------------------------------------------------------


def test_figures_count_each_hour_and_nothing_outside_the_period() -> None:
    until = datetime(2026, 11, 29, 12, 30, tzinfo=UTC)
    period = Period.last(1, until)
    hours = period.hours()
    assert hours[0] == datetime(2026, 11, 28, 12, tzinfo=UTC)
    assert hours[-1] == datetime(2026, 11, 29, 12, tzinfo=UTC)
    assert len(hours) == 25
    sessions = [
        (period.since, "COMPLETED"),  # the first instant is in
        (period.since - timedelta(microseconds=1), "COMPLETED"),  # just before it is not
        (until, "ERROR"),
        (until - timedelta(minutes=20), "ERROR"),
        (until + timedelta(seconds=1), "ERROR"),  # logged after the page was made
    ]
    attempts = [
        (until, "cdcs", "reused"),
        (until, "cdcs", "updated"),
        (until, "cdcs", "failed"),
        (until - timedelta(hours=2), "elabftw", "interrupted"),
        (until - timedelta(days=3), "elabftw", "failed"),
    ]
    figures = summarize(period, sessions, attempts)
    assert figures.outcomes == {"COMPLETED": 1, "ERROR": 2}
    assert figures.hourly_outcomes == {
        datetime(2026, 11, 28, 12, tzinfo=UTC): {"COMPLETED": 1},
        datetime(2026, 11, 29, 12, tzinfo=UTC): {"ERROR": 2},
    }
    assert figures.destinations == {
        "cdcs": {"succeeded": 2, "failed": 1},
        "elabftw": {"interrupted": 1},
    }
    assert figures.hourly_destinations[datetime(2026, 11, 29, 10, tzinfo=UTC)] == {
        ("elabftw", "interrupted"): 1
    }
    assert figures.failures == 3  # two rejections, one failed attempt


def test_hours_are_utc_hours_labelled_in_local_time_across_a_clock_change() -> None:
    # Europe/Berlin leaves summer time at 03:00 on 25 October 2026: 02:00-03:00 twice.
    until = datetime(2026, 10, 25, 6, tzinfo=UTC)
    period = Period.last(1, until)
    when = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 CEST
    later = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)  # 02:30 CET, an hour later
    figures = summarize(period, [(when, "COMPLETED"), (later, "COMPLETED")], [])
    assert len(figures.hourly_outcomes) == 2
    page = render(figures, [], made=until, tz=ZoneInfo(TZ))
    assert "Sun 2026-10-25 02:00 CEST–02:00 CET" in page  # the hour before the change
    assert "Sun 2026-10-25 02:00–03:00 CET" in page  # the hour after it
    assert '<span id="zone">CEST (UTC+02:00) / CET (UTC+01:00)</span>' in page


def test_untrusted_text_is_escaped_and_the_page_loads_nothing() -> None:
    until = datetime(2026, 11, 29, 12, tzinfo=UTC)
    period = Period.last(7, until)
    hostile = '"><script>alert(1)</script><img src=//evil.example/x.png>\x00\x1b\ud800'
    failure = Failure(until, hostile, hostile, hostile, hostile, 500, 3, "BUILT_NOT_EXPORTED")
    figures = summarize(period, [(until, "BUILT_NOT_EXPORTED")], [(until, hostile, "failed")])
    page = render(figures, [failure], made=until, tz=UTC)
    assert "<script" not in page and "<img" not in page and "evil.example/x.png>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "\\x00\\x1b\\ud800" in page  # shown as escapes: HTML cannot hold them
    page.encode("utf-8")  # no lone surrogate left
    for outside in ("http://", "https://", "@import", "url("):
        assert outside not in page.replace("http://www.w3.org/2000/svg", "")
    assert "default-src 'none'" in page


def test_days_out_of_range_and_an_unwritable_path_are_usage_errors(
    logged: Path, tmp_path: Path
) -> None:
    for days in ("0", "367"):
        made = _make_page(logged, tmp_path / "page.html", "--days", days)
        assert made.returncode == 2
        assert "--days" in made.stderr and "Traceback" not in made.stderr
    made = _make_page(logged, tmp_path / "no" / "such" / "page.html")
    assert made.returncode == 2
    assert "cannot write it" in made.stderr and "Traceback" not in made.stderr
    assert not (tmp_path / "page.html").exists()


@pytest.mark.postgres
def test_figures_match_sql_on_postgresql(postgres_url: str) -> None:
    """PostgreSQL keeps times as TIMESTAMPTZ: the period's bounds select the same rows."""
    import psycopg2

    clock = [datetime.now(UTC)]
    store = Store(postgres_url, clock=lambda: clock[0])
    now = datetime.now(UTC).replace(microsecond=0)
    _log(store, _scenario(f"-{uuid.uuid4().hex[:8]}"), now, lambda at: clock.__setitem__(0, at))
    period = Period.last(7, now)
    sessions, attempts, failures = load(store, period)
    store.close()
    figures = summarize(period, sessions, attempts)

    conn = psycopg2.connect(postgres_url)
    with conn, conn.cursor() as cur:
        bounds = (period.since, period.until)
        cur.execute(
            'SELECT record_status, count(*) FROM session_log WHERE "timestamp" BETWEEN %s AND %s'
            " GROUP BY 1",
            bounds,
        )
        assert dict(cur.fetchall()) == figures.outcomes
        cur.execute('SELECT count(*) FROM upload_log WHERE "timestamp" BETWEEN %s AND %s', bounds)
        assert cur.fetchone()[0] == sum(sum(k.values()) for k in figures.destinations.values())
    conn.close()
    assert len(failures) == min(figures.failures, 500)
    assert [f.when for f in failures] == sorted((f.when for f in failures), reverse=True)
