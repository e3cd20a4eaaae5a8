"""``nxdrop status --html FILE``: one self-contained page of the last days' exports.

For a facility manager who will not open a terminal: the records of the period per hour by
outcome (``session_log``) and by destination (``upload_log``), and the failures with their
reasons, newest first. The page is one file — inline CSS and SVG, no script, nothing
fetched — so it opens from disk, a mail attachment or a shared folder alike.

Every value from the database is untrusted text (session identifiers are file names, error
messages quote servers): it is escaped, and the page's Content-Security-Policy forbids
scripts and loads all the same, so a slip would show as a refusal, never run.

:func:`load` reads the period's rows (and only those: a facility has years of them);
:func:`summarize` turns them into :class:`Figures` and :func:`render` the figures into the
page, both pure functions of their arguments.
"""

from __future__ import annotations

import html
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any

from nxdrop.destinations.base import utcnow
from nxdrop.exceptions import ConfigError
from nxdrop.fsops import write_atomically
from nxdrop.store import AttemptState, RecordStatus, Store

MAX_DAYS = 366  # past a year, bars of one hour are no longer a picture
MAX_FAILURES = 500  # rows of the failures table; the totals count them all

# ``session_log.record_status``, in the page's order, with what the page calls it and says
# it means (the manager knows the folders, not the statuses).
OUTCOMES: dict[str, tuple[str, str]] = {
    RecordStatus.COMPLETED: ("exported", "in uploaded/"),
    RecordStatus.BUILT_NOT_EXPORTED: ("not exported", "a destination failed; in failed/"),
    RecordStatus.ERROR: ("rejected", "not a valid record, nothing sent; in failed/"),
    RecordStatus.EXPORTING: ("in progress", "being exported, or cut off by a stop"),
}
# ``upload_log.state`` as the page counts it: one kind per attempt.
KINDS: dict[str, str] = {
    "succeeded": "succeeded",
    "failed": "failed",
    "interrupted": "interrupted",
    "in_flight": "in flight",
}
_KIND_OF_STATE: dict[str, str] = {
    AttemptState.SUCCEEDED.value: "succeeded",
    AttemptState.UPDATED.value: "succeeded",
    AttemptState.REUSED.value: "succeeded",
    AttemptState.FAILED.value: "failed",
    AttemptState.INTERRUPTED.value: "interrupted",
    AttemptState.IN_FLIGHT.value: "in_flight",
}
_CHARTED_KINDS = ("succeeded", "failed")


@dataclass(frozen=True)
class Period:
    """The instants the page covers, both ends included (UTC)."""

    since: datetime
    until: datetime

    @classmethod
    def last(cls, days: int, until: datetime) -> Period:
        """The ``days`` days up to ``until``."""
        return cls(until - timedelta(days=days), until)

    def __contains__(self, when: datetime) -> bool:
        return self.since <= when <= self.until

    def hours(self) -> list[datetime]:
        """The starts of the hours the period touches, in UTC: the bars of a chart.

        UTC hours, labelled in local time, so that a change to or from summer time neither
        merges two hours into one bar nor leaves a gap.
        """
        first, last = _hour(self.since), _hour(self.until)
        count = int((last - first) / timedelta(hours=1)) + 1
        return [first + timedelta(hours=i) for i in range(count)]


@dataclass(frozen=True)
class Failure:
    """One row of the failures table: a destination's failed attempt, or a rejection
    (``destination`` ``None``: the record was refused before any destination was called)."""

    when: datetime
    session: str
    destination: str | None
    error: str | None
    file_name: str | None
    status_code: int | None = None
    attempts: int | None = None
    record_now: str | None = None  # the session's record_status when the page was made


@dataclass(frozen=True)
class Figures:
    """What the page counts, all within :attr:`period`: records by ``record_status``,
    attempts by destination and kind (:data:`KINDS`), and both per hour, keyed by the UTC
    start of the hour (hours with nothing are left out)."""

    period: Period
    outcomes: Counter[str]
    destinations: dict[str, Counter[str]]
    hourly_outcomes: dict[datetime, Counter[str]]
    hourly_destinations: dict[datetime, Counter[tuple[str, str]]]  # (destination, kind)

    @property
    def failures(self) -> int:
        """Rows the failures table would have without its cut: failed attempts and
        rejected records."""
        failed = sum(kinds["failed"] for kinds in self.destinations.values())
        return failed + self.outcomes[RecordStatus.ERROR]

    def statuses(self) -> list[str]:
        """The record statuses to show: the known ones, then any other found."""
        return [*OUTCOMES, *sorted(set(self.outcomes) - set(OUTCOMES))]


def summarize(
    period: Period,
    sessions: Iterable[tuple[datetime, str]],
    attempts: Iterable[tuple[datetime, str, str]],
) -> Figures:
    """Count ``sessions`` (timestamp, record_status) and ``attempts`` (timestamp,
    destination, state) of the period, in total and per hour (UTC hour starts)."""
    outcomes: Counter[str] = Counter()
    hourly_outcomes: dict[datetime, Counter[str]] = {}
    for when, status in sessions:
        if when in period:
            outcomes[status] += 1
            hourly_outcomes.setdefault(_hour(when), Counter())[status] += 1
    destinations: dict[str, Counter[str]] = {}
    hourly_destinations: dict[datetime, Counter[tuple[str, str]]] = {}
    for when, destination, state in attempts:
        if when in period:
            kind = _KIND_OF_STATE.get(state, state)
            destinations.setdefault(destination, Counter())[kind] += 1
            hourly_destinations.setdefault(_hour(when), Counter())[destination, kind] += 1
    return Figures(
        period,
        outcomes,
        dict(sorted(destinations.items())),
        hourly_outcomes,
        hourly_destinations,
    )


def load(
    store: Store, period: Period, *, limit: int = MAX_FAILURES
) -> tuple[list[tuple[datetime, str]], list[tuple[datetime, str, str]], list[Failure]]:
    """The period's rows: (timestamp, record_status) of the sessions, (timestamp,
    destination, state) of the attempts, and the ``limit`` newest failures."""
    Upload, Session = store.UploadLog, store.SessionLog
    upload_in = (Upload.timestamp >= period.since) & (Upload.timestamp <= period.until)
    session_in = (Session.timestamp >= period.since) & (Session.timestamp <= period.until)
    failed = AttemptState.FAILED.value
    queries = (
        Session.select(Session.timestamp, Session.record_status).where(session_in),
        Upload.select(Upload.timestamp, Upload.destination_name, Upload.state).where(upload_in),
        Upload.select(
            Upload.timestamp,
            Upload.session_identifier,
            Upload.destination_name,
            Upload.error_message,
            Upload.file_name,
            Upload.status_code,
            Upload.attempts,
        )
        .where(upload_in & (Upload.state == failed))
        .order_by(Upload.timestamp.desc(), Upload.id.desc())
        .limit(limit),
        Session.select(
            Session.timestamp, Session.session_identifier, Session.error_message, Session.file_name
        )
        .where(session_in & (Session.record_status == RecordStatus.ERROR.value))
        .order_by(Session.timestamp.desc())
        .limit(limit),
    )

    def read() -> tuple[list[Any], list[Any], list[Failure], dict[str, str]]:
        # One transaction: in SQLite one snapshot, so that the counts, the table and the
        # records' state now agree while a daemon writes.
        with store.db.atomic():
            sessions, attempts, failed_rows, rejected_rows = [list(q.tuples()) for q in queries]
            failures = [
                Failure(when, session, destination, error, file_name, status_code, tries)
                for when, session, destination, error, file_name, status_code, tries in failed_rows
            ]
            failures += [
                Failure(when, session, None, error, file_name)
                for when, session, error, file_name in rejected_rows
            ]
            failures = sorted(failures, key=lambda f: f.when, reverse=True)[:limit]
            # Whether each failed record is still failing: what a manager asks next.
            names = sorted({f.session for f in failures})
            now = Session.select(Session.session_identifier, Session.record_status).where(
                Session.session_identifier.in_(names)
            )
            return sessions, attempts, failures, dict(now.tuples()) if names else {}

    sessions, attempts, failures, now = store.database.run(read)
    failures = [replace(f, record_now=now.get(f.session)) for f in failures]
    return sessions, attempts, failures


def write_report(store: Store, path: Path, *, days: int) -> None:
    """Write the page of the last ``days`` days to ``path`` (replaced in one rename).

    Raises :class:`~nxdrop.exceptions.ConfigError` for a ``days`` out of range or a path
    that cannot be written, and lets :class:`~nxdrop.exceptions.DatabaseUnavailable` pass.
    """
    if not 1 <= days <= MAX_DAYS:
        raise ConfigError(f"--days: {days}: give a number of days from 1 to {MAX_DAYS}")
    # Whole seconds: the page's <time> elements carry the period's ends exactly.
    made = utcnow().replace(microsecond=0)
    period = Period.last(days, made)
    sessions, attempts, failures = load(store, period)
    page = render(summarize(period, sessions, attempts), failures, made=made)
    try:
        # One rename: a page opened from a shared folder is never a half-written one.
        write_atomically(path, page.encode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"--html {path}: cannot write it: {exc.strerror or exc}") from exc


# -- the page ------------------------------------------------------------------------------

_CSS = """
:root { color-scheme: light; --ok: #2e7d32; --bad: #c62828; --warn: #ef6c00;
  --idle: #8d8d8d; --rule: #d7d7d7; }
body { font: 15px/1.45 system-ui, sans-serif; color: #1d1d1d; margin: 0 auto;
  max-width: 1100px; padding: 1rem 1.5rem 3rem; }
h1 { font-size: 1.5rem; margin-bottom: .2rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.meta, .note { color: #555; } .note { font-size: .9rem; }
.totals { display: flex; flex-wrap: wrap; gap: .8rem; list-style: none; padding: 0; }
.totals li { border: 1px solid var(--rule); border-left-width: 6px; border-radius: 4px;
  padding: .4rem .8rem; min-width: 9rem; }
.totals .n { display: block; font-size: 1.6rem; font-weight: 600; }
.totals small { color: #555; display: block; font-size: .8rem; }
.legend { list-style: none; padding: 0; display: flex; gap: 1rem; font-size: .9rem; }
.swatch { display: inline-block; width: .8em; height: .8em; margin-right: .3em;
  background: var(--c); }
.totals li { border-left-color: var(--c); } svg rect { fill: var(--c); }
svg.chart { width: 100%; height: auto; display: block; }
svg .axis { font-size: 11px; fill: #555; } svg .rule { stroke: var(--rule); }
svg .day { stroke: #ececec; } svg .empty { font-size: 14px; fill: #777; }
table { border-collapse: collapse; width: 100%; margin: .5rem 0; }
th, td { border-bottom: 1px solid var(--rule); padding: .3rem .5rem; text-align: left;
  vertical-align: top; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
td.error { white-space: pre-wrap; overflow-wrap: anywhere; }
td.nowrap, #hourly tbody th { white-space: nowrap; } td.id { overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
details summary { cursor: pointer; color: #333; }
.o-COMPLETED, .k-succeeded { --c: var(--ok); } .o-BUILT_NOT_EXPORTED { --c: var(--warn); }
.o-ERROR, .k-failed { --c: var(--bad); } .o-EXPORTING, .o-other { --c: var(--idle); }
"""
# Nothing to run and nothing to fetch: a value that escaped its escaping would be refused.
_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def render(
    figures: Figures, failures: Sequence[Failure], *, made: datetime, tz: tzinfo | None = None
) -> str:
    """The page: ``figures`` and the ``failures`` table, made at ``made``; times in ``tz``
    (the local time zone when ``None``)."""
    period = figures.period
    days = round((period.until - period.since) / timedelta(days=1))
    title = f"nxdrop: records of the last {days} day{'s' if days != 1 else ''}"
    zones = dict.fromkeys([_zone(period.since, tz), _zone(period.until, tz)])  # in order
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        f"<h1>{_e(title)}</h1>",
        f'<p class="meta">From {_time(period.since, tz, "since")} to '
        f"{_time(period.until, tz, 'until')}; made {_time(made, tz, 'made')}. "
        f'Times are local: <span id="zone">{_e(" / ".join(zones))}</span>.</p>',
        _outcome_section(figures, tz),
        _destination_section(figures, tz),
        _failure_section(figures, failures, tz),
        _hourly_section(figures, tz),
        "</body>",
        "</html>",
        "",
    ]
    return "\n".join(parts)


def _outcome_section(figures: Figures, tz: tzinfo | None) -> str:
    statuses = figures.statuses()
    cards = "".join(
        f'<li class="{_status_class(s)}" data-status="{_e(s)}">'
        f'<span class="n">{figures.outcomes[s]}</span>'
        f"{_e(_status_label(s))} <small>{_e(OUTCOMES.get(s, ('', ''))[1])}</small></li>"
        for s in statuses
    )
    series = [
        (_status_class(s), _status_label(s), _counts(figures.hourly_outcomes, s)) for s in statuses
    ]
    return (
        '<section id="records"><h2>Records</h2>'
        f'<ul class="totals" id="outcomes">{cards}</ul>'
        + _legend(series)
        + _chart(figures.period.hours(), series, tz, "records per hour, by outcome", 150)
        + '<p class="note">A record counts once, at its latest outcome: a record retried '
        "later counts at the time of its last run.</p></section>"
    )


def _destination_section(figures: Figures, tz: tzinfo | None) -> str:
    head = "".join(f'<th class="n" scope="col">{_e(label)}</th>' for label in KINDS.values())
    rows = "".join(
        f'<tr data-destination="{_e(name)}"><th scope="row">{_e(name)}</th>'
        + "".join(f'<td class="n" data-kind="{k}">{kinds[k]}</td>' for k in KINDS)
        + "</tr>"
        for name, kinds in figures.destinations.items()
    )
    if not rows:
        return (
            '<section id="destinations"><h2>Destinations</h2>'
            "<p>No record was sent to any destination in this period.</p></section>"
        )
    hours = figures.period.hours()
    charts = "".join(
        f"<h3>{_e(name)}</h3>"
        + _chart(
            hours,
            [
                (f"k-{k}", KINDS[k], _counts(figures.hourly_destinations, (name, k)))
                for k in _CHARTED_KINDS
            ],
            tz,
            f"attempts at {name} per hour",
            70,
        )
        for name in figures.destinations
    )
    legend_series: _Series = [(f"k-{k}", KINDS[k], {}) for k in _CHARTED_KINDS]
    return (
        '<section id="destinations"><h2>Destinations</h2>'
        '<p class="note">Each time a record was sent to a destination, one attempt: '
        "a record that failed and was retried counts each time.</p>"
        '<table id="destination-totals"><thead><tr><th scope="col">destination</th>'
        f"{head}</tr></thead><tbody>{rows}</tbody></table>"
        + _legend(legend_series)
        + charts
        + "</section>"
    )


def _failure_section(figures: Figures, failures: Sequence[Failure], tz: tzinfo | None) -> str:
    if not failures:
        return '<section id="failures"><h2>Failures</h2><p>No failure in this period.</p></section>'
    rows = "".join(_failure_row(f, tz) for f in failures)
    total = figures.failures
    shown = (
        f"The newest {len(failures)} of {total} are listed."
        if len(failures) < total
        else f"All {total} are listed, newest first."
    )
    return (
        f'<section id="failures"><h2>Failures ({total})</h2>'
        f'<p class="note" id="failures-shown">{shown} To send a record again, move it from '
        "failed/ back into the drop folder (<code>nxdrop retry SESSION</code>).</p>"
        '<table id="failure-table"><thead><tr><th scope="col">when</th>'
        '<th scope="col">session</th><th scope="col">destination</th>'
        '<th scope="col">reason</th><th scope="col">file</th>'
        '<th scope="col">record now</th></tr></thead>'
        f"<tbody>{rows}</tbody></table></section>"
    )


def _failure_row(failure: Failure, tz: tzinfo | None) -> str:
    if failure.destination is None:
        kind, destination = "rejected", "none (rejected)"
    else:
        kind, destination = "failed", failure.destination
    details = []
    if failure.status_code is not None:
        details.append(f"HTTP {failure.status_code}")
    if failure.attempts:
        details.append(f"{failure.attempts} tr{'y' if failure.attempts == 1 else 'ies'}")
    reason = failure.error or "(no message)"
    if details:
        reason += f" ({', '.join(details)})"
    now = failure.record_now
    return (
        f'<tr data-kind="{kind}" data-destination="{_e(failure.destination or "")}">'
        f'<td class="nowrap">{_time(failure.when, tz)}</td>'
        f'<td class="id">{_e(failure.session)}</td><td>{_e(destination)}</td>'
        f'<td class="error">{_e(reason)}</td><td class="id">{_e(failure.file_name or "")}</td>'
        f"<td>{_e(_status_label(now) if now else 'gone from the log')}</td></tr>"
    )


def _hourly_section(figures: Figures, tz: tzinfo | None) -> str:
    """Every bar's numbers, as a table: for those who read numbers, and for the tests."""
    statuses = figures.statuses()
    columns = [(d, k) for d in figures.destinations for k in _CHARTED_KINDS]
    head = "".join(f'<th class="n" scope="col">{_e(_status_label(s))}</th>' for s in statuses)
    head += "".join(f'<th class="n" scope="col">{_e(d)} {_e(KINDS[k])}</th>' for d, k in columns)
    hours = sorted(set(figures.hourly_outcomes) | set(figures.hourly_destinations), reverse=True)
    rows = []
    for hour in hours:
        outcomes = figures.hourly_outcomes.get(hour, Counter())
        attempts = figures.hourly_destinations.get(hour, Counter())
        rows.append(
            f'<tr data-hour="{_utc(hour)}"><th scope="row">{_e(_hour_label(hour, tz))}</th>'
            + "".join(f'<td class="n" data-status="{_e(s)}">{outcomes[s]}</td>' for s in statuses)
            + "".join(
                f'<td class="n" data-destination="{_e(d)}" data-kind="{k}">{attempts[d, k]}</td>'
                for d, k in columns
            )
            + "</tr>"
        )
    return (
        '<section id="hours"><details><summary>The numbers per hour</summary>'
        '<div class="scroll"><table id="hourly"><thead><tr><th scope="col">hour</th>'
        f"{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></details></section>"
    )


_Series = Sequence[tuple[str, str, Mapping[datetime, int]]]  # (CSS class, label, per hour)


def _chart(hours: list[datetime], series: _Series, tz: tzinfo | None, label: str, high: int) -> str:
    """A stacked bar per hour, as inline SVG, days marked at local midnight."""
    width, left, top, bottom = 1000, 40, 6, 20
    step = (width - left) / len(hours)
    totals = [sum(counts.get(h, 0) for _, _, counts in series) for h in hours]
    peak = max(totals)
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {top + high + bottom}" role="img" '
        f'aria-label="{_e(label)}" xmlns="http://www.w3.org/2000/svg">',
        f'<line class="rule" x1="{left}" x2="{width}" y1="{top + high}" y2="{top + high}"/>',
    ]
    midnights = [i for i, h in enumerate(hours) if h.astimezone(tz).hour == 0]
    every = math.ceil(len(midnights) / 10) or 1  # at most about ten day labels
    for n, i in enumerate(midnights):
        x = f"{left + i * step:.1f}"
        out.append(f'<line class="day" x1="{x}" x2="{x}" y1="{top}" y2="{top + high}"/>')
        if n % every == 0:
            day = hours[i].astimezone(tz).strftime("%a %d %b")
            out.append(f'<text class="axis" x="{x}" y="{top + high + 15}">{_e(day)}</text>')
    if not peak:
        out.append(
            f'<text class="empty" x="{(width + left) / 2}" y="{top + high / 2}" '
            'text-anchor="middle">nothing in this period</text></svg>'
        )
        return "".join(out)
    out.append(f'<text class="axis" x="{left - 5}" y="{top + 10}" text-anchor="end">{peak}</text>')
    out.append(f'<text class="axis" x="{left - 5}" y="{top + high}" text-anchor="end">0</text>')
    bar = max(step * 0.8, 0.5)
    for i, hour in enumerate(hours):
        if not totals[i]:
            continue
        y = float(top + high)
        said = ", ".join(f"{c.get(hour, 0)} {name}" for _, name, c in series if c.get(hour, 0))
        out.append(f"<g><title>{_e(_hour_label(hour, tz))}: {_e(said)}</title>")
        for css, _, counts in series:
            count = counts.get(hour, 0)
            if count:
                size = high * count / peak
                y -= size
                out.append(
                    f'<rect class="{css}" x="{left + i * step:.2f}" y="{y:.2f}" '
                    f'width="{bar:.2f}" height="{size:.2f}"/>'
                )
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _legend(series: _Series) -> str:
    items = "".join(
        f'<li><span class="swatch {css}"></span>{_e(name)}</li>' for css, name, _ in series
    )
    return f'<ul class="legend">{items}</ul>'


def _counts(hourly: Mapping[datetime, Counter[Any]], key: Any) -> dict[datetime, int]:
    return {hour: counts[key] for hour, counts in hourly.items() if counts[key]}


def _status_label(status: str) -> str:
    return OUTCOMES.get(status, (status, ""))[0]


def _status_class(status: str) -> str:
    return f"o-{status}" if status in OUTCOMES else "o-other"


def _hour(when: datetime) -> datetime:
    return when.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _utc(when: datetime) -> str:
    """A valid HTML ``datetime`` value (whole seconds, UTC)."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _local(when: datetime, tz: tzinfo | None) -> str:
    return when.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")


def _time(when: datetime, tz: tzinfo | None, ident: str | None = None) -> str:
    id_attr = f' id="{ident}"' if ident else ""
    return f'<time{id_attr} datetime="{_utc(when)}">{_e(_local(when, tz))}</time>'


def _hour_label(hour: datetime, tz: tzinfo | None) -> str:
    start = hour.astimezone(tz)
    end = (hour + timedelta(hours=1)).astimezone(tz)
    if start.tzname() != end.tzname():  # the hour a clock change ends
        return f"{start:%a %Y-%m-%d %H:%M %Z}–{end:%H:%M %Z}"
    return f"{start:%a %Y-%m-%d %H:%M}–{end:%H:%M %Z}"


def _zone(when: datetime, tz: tzinfo | None) -> str:
    local = when.astimezone(tz)
    offset = local.utcoffset() or timedelta(0)
    sign, minutes = ("-" if offset < timedelta(0) else "+"), abs(offset) // timedelta(minutes=1)
    return f"{local.tzname()} (UTC{sign}{minutes // 60:02d}:{minutes % 60:02d})"


# What HTML5 forbids in text (controls, lone surrogates, noncharacters), shown as escapes.
_UNSHOWABLE = re.compile(
    "[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(chr(plane | 0xFFFE) + chr(plane | 0xFFFF) for plane in range(0, 0x110000, 0x10000))
    + "]"
)


def _e(value: object) -> str:
    """``value`` as HTML text or attribute value: escaped, and what HTML cannot hold shown
    as ``\\xNN``/``\\uNNNN``."""
    text = _UNSHOWABLE.sub(_escape_char, str(value))
    return html.escape(text, quote=True)


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
