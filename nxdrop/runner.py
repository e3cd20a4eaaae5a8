"""One destination for one record: which call the log calls for, retries, and the upload log.

What ``upload_log`` knows of this destination, this session and this endpoint decides the
call: nothing yet → ``export``; the same bytes → ``reconcile`` (check, add a new link,
reuse); other bytes → ``update`` (one session, one record). The attempt's row is written
``in_flight`` before the destination is called, so a crash leaves a trace that the next
start turns into ``interrupted`` and the next attempt is told of (``context.interrupted``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import DestinationError, TransientError
from nxdrop.metrics import Metrics
from nxdrop.records import Record
from nxdrop.redact import Redactor
from nxdrop.store import AttemptState, Standing, Store, UploadRow

if TYPE_CHECKING:
    from nxdrop.lookahead import Lookahead

log = logging.getLogger(__name__)

MIN_RETRY_DELAY = 0.2  # seconds, however soon a server asks to be asked again
# Exponential backoff with full jitter: a random wait up to 0.5 s, 1 s, 2 s, … 30 s.
BACKOFF_FIRST, BACKOFF_MAX = 0.5, 30.0
LOOKAHEAD = 50  # sessions a destination is asked about at once
# How long a destination's "I hold nothing of this session" is trusted; a destination that
# cannot tell is asked again after as long.
VOUCH_SECONDS = 60.0


@dataclass
class Stop:
    """How far a stop has gone: ``requested`` (finish what runs, wait for no retry) and
    ``now`` (abandon after the current call)."""

    requested: threading.Event = field(default_factory=threading.Event)
    now: threading.Event = field(default_factory=threading.Event)

    def request(self) -> None:
        self.requested.set()

    def force(self) -> None:
        self.requested.set()
        self.now.set()


class Abandoned(Exception):
    """nxdrop is stopping and this record is left for the next start."""


class DestinationRunner:
    """Runs one destination; one instance serves every worker thread."""

    def __init__(
        self,
        destination: ExportDestination,
        store: Store,
        *,
        worker: str,
        retry_max_time: float,
        stop: Stop,
        redactor: Redactor,
        metrics: Metrics,
        lookahead: Lookahead,
    ) -> None:
        self.destination = destination
        self.name = str(destination.name)
        self.store = store
        self.worker = worker
        self.retry_max_time = retry_max_time
        self.stop = stop
        self.redactor = redactor
        self.metrics = metrics
        self._bugs_told: set[str] = set()  # a bug's traceback is logged once, not per record
        self._census_lock = threading.Lock()
        self._from_start: bool | None = None  # whether the log knows all made at the endpoint
        self.lookahead = lookahead  # the ready files' sessions, asked about in batches
        self._batch_lock = threading.Lock()
        self._answers: dict[str, tuple[bool, float]] = {}  # session → (held, when), oldest first
        self._ask_after = 0.0

    def run(self, context: ExportContext, record: Record, standing: Standing) -> ExportResult:
        """Export, update or reconcile; log the attempt; never raises but :class:`Abandoned`."""
        unseen = not standing.attempted and (
            self._logged_from_start() or self._vouched_absent(context.session_identifier)
        )
        context = context.evolve(interrupted=standing.interrupted, unseen=unseen)
        earlier = standing.latest_success
        call, state = self._call_for(context, record, earlier)
        endpoint = self.destination.endpoint
        attempt_id = self.store.begin_attempt(record, self.name, endpoint, self.worker)
        started = time.monotonic()
        try:
            result = self._with_retries(context, call, attempt_id)
            if result.error_message:  # nothing a server echoed is kept: not a secret
                result = replace(result, error_message=self.redactor.scrub(result.error_message))
        except Abandoned as exc:
            failed = _failed(self.name, exc, context.attempt)
            self.store.finish_attempt(
                attempt_id, failed, AttemptState.FAILED, time.monotonic() - started
            )
            raise
        if not result.success:
            state = AttemptState.FAILED
        elif earlier is not None and result.record_id != earlier.record_id:
            state = AttemptState.SUCCEEDED  # the earlier record was gone: this one is new
        took = time.monotonic() - started
        self.store.finish_attempt(attempt_id, result, state, took)
        self.metrics.destination_done(
            self.name, state.value, calls=result.attempts, seconds=took, success=result.success
        )
        self._log(record, result, state)
        return result

    def _logged_from_start(self) -> bool:
        """Whether the log knows every record made at the destination's endpoint: the
        database says so, or the endpoint holds none of the destination's records now (asked
        once per process; a census that fails is asked again at the next record)."""
        if self._from_start is None:
            with self._census_lock:
                if self._from_start is None:
                    self._from_start = self._census()
        return bool(self._from_start)

    def _census(self) -> bool | None:
        endpoint = self.destination.endpoint
        if not endpoint:  # no endpoint, nothing to vouch for
            return False
        if self.store.logged_from_start(self.name, endpoint):
            return True
        try:
            empty = self.destination.holds_no_records()
        except Exception as exc:  # a census is an optimisation: never a failure
            log.info("%s: cannot tell whether %s is empty (%s)", self.name, endpoint, exc)
            return None
        if empty:
            self.store.note_empty(self.name, endpoint)
            log.info(
                "%s: %s holds no record of nxdrop's yet: the log knows all it makes there",
                self.name,
                endpoint,
            )
        return bool(empty)  # None, "cannot tell": not asked again in this process

    def _vouched_absent(self, session: str) -> bool:
        """Whether the destination said, within ``VOUCH_SECONDS``, that it holds no record
        of ``session``: asked about the next sessions at once (``holds_records_of``), where
        the log cannot vouch for the endpoint, instead of a lookup before each create."""
        with self._batch_lock:
            now = time.monotonic()
            answers = self._answers
            while answers:  # forget what is too old to trust: oldest first
                oldest = next(iter(answers))
                if now - answers[oldest][1] < VOUCH_SECONDS:
                    break
                del answers[oldest]
            answer = answers.get(session)
            if answer is None and now >= self._ask_after:
                batch = self.lookahead.batch(session, LOOKAHEAD, skip=answers)
                if len(batch) > 1:  # one session alone is the record's own lookup
                    answer = self._ask(batch, now)
            return answer is not None and not answer[0]

    def _ask(self, batch: list[str], now: float) -> tuple[bool, float] | None:
        try:
            held = self.destination.holds_records_of(batch)
        except Exception as exc:  # an optimisation: never a failure
            log.info("%s: cannot tell which sessions it holds (%s)", self.name, exc)
            held = None
        if held is None:
            self._ask_after = now + VOUCH_SECONDS
            return None
        log.debug("%s holds records of %d of %d sessions", self.name, len(held), len(batch))
        for session in batch:
            self._answers[session] = (session in held, now)
        return self._answers[batch[0]]

    def _call_for(
        self, context: ExportContext, record: Record, earlier: UploadRow | None
    ) -> tuple[Callable[[], ExportResult], AttemptState]:
        """``export``, ``reconcile`` (same bytes) or ``update`` (new bytes, same session)."""
        destination = self.destination
        if earlier is None:
            return (lambda: destination.export(context)), AttemptState.SUCCEEDED
        previous = earlier.as_result()
        if earlier.file_sha256 == record.sha256:
            return (lambda: destination.reconcile(context, previous)), AttemptState.REUSED
        return (lambda: destination.update(context, previous)), AttemptState.UPDATED

    def _log(self, record: Record, result: ExportResult, state: AttemptState) -> None:
        extra = {
            "SESSION_ID": record.session_identifier,
            "DESTINATION": self.name,
            "RECORD_ID": result.record_id or "",
            "FILE": record.name,
        }
        if result.success:
            how = {AttemptState.REUSED: " (already there)", AttemptState.UPDATED: " (updated)"}
            where = result.record_url or result.record_id
            log.info(
                "%s → %s: %s%s", record.name, self.name, where, how.get(state, ""), extra=extra
            )
        else:
            log.warning(
                "%s → %s failed: %s", record.name, self.name, result.error_message, extra=extra
            )

    def _with_retries(
        self, context: ExportContext, call: Callable[[], ExportResult], attempt_id: int
    ) -> ExportResult:
        name = self.name
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            context.attempt = attempt
            # A failed call may have reached the server: the retry looks before it creates.
            context.unseen = context.unseen and attempt == 1
            try:
                result = call()
            except TransientError as exc:
                delay = (
                    max(exc.retry_after, MIN_RETRY_DELAY)  # "0" must not make a busy loop
                    if exc.retry_after is not None
                    else _backoff(attempt)
                )
                if delay > self.retry_max_time - (time.monotonic() - started):
                    return _failed(name, exc, attempt, "gave up retrying: ")
                if self.stop.requested.is_set():
                    # A record waiting to retry is not in flight: leave it for the next start.
                    raise Abandoned(f"nxdrop stopped while retrying: {exc}") from exc
                log.info(
                    "%s: %s; retry %d in %.1f s",
                    name,
                    exc,
                    attempt,
                    delay,
                    extra={"SESSION_ID": context.session_identifier, "DESTINATION": name},
                )
                self.store.note_retry(attempt_id, attempt, self.redactor.scrub(str(exc)))
                if self.stop.requested.wait(delay):
                    raise Abandoned(f"nxdrop stopped while retrying: {exc}") from exc
                continue
            except DestinationError as exc:
                return _failed(name, exc, attempt)
            except Exception as exc:
                bug = f"{type(exc).__name__}: {exc}"
                if bug not in self._bugs_told:  # a bug: its traceback once, then one line
                    self._bugs_told.add(bug)
                    log.exception(
                        "destination %s raised (a bug; later ones are logged in one line)",
                        name,
                        extra={"SESSION_ID": context.session_identifier, "DESTINATION": name},
                    )
                return _failed(name, exc, attempt, f"unexpected {type(exc).__name__}: ")
            if not isinstance(result, ExportResult):
                return ExportResult(
                    False,
                    name,
                    attempts=attempt,
                    error_message=f"export() returned {type(result).__name__}, not an ExportResult",
                )
            return replace(result, destination_name=name, attempts=max(result.attempts, attempt))


def _failed(name: str, exc: BaseException, attempts: int, prefix: str = "") -> ExportResult:
    return ExportResult(
        success=False,
        destination_name=name,
        error_message=f"{prefix}{exc}",
        status_code=getattr(exc, "status_code", None),
        attempts=attempts,
    )


def _backoff(attempt: int) -> float:
    """The wait after failed call number ``attempt``: uniform below an exponential cap, so
    that workers failing together do not retry together ("full jitter")."""
    return random.uniform(0, min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (attempt - 1)))
