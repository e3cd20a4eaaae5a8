"""The eLabFTW destination: one experiment per session, the one NexusLIMS documents.

What the experiment holds is built by :mod:`~nxdrop.destinations.elabftw_document` (pure
functions: title, body, tags, extra fields, the PATCH that brings one up to date); the
calls are :mod:`~nxdrop.destinations.elabftw_api`'s; this module decides what to do.

One session, one experiment. Its "Session ID" field says whose it is (or "Session", in an
experiment made by an nxdrop older than NexusLIMS's shape: still ours), its "SHA-256" field
which record it shows. New content for the session (``update``) rewrites that experiment's
title, body and fields and attaches the new XML beside the old one; the same content again
(``reconcile``) only adds what is new (the CDCS link). An experiment is ours only if its
session field is this session exactly: anything else found by id or by search is left alone.

No duplicates: every step looks before it acts. Before creating, ``export`` looks for the
session's experiment, archived ones included: on eLabFTW 5.4 and newer with the extended
search for the exact fields (``extrafield:"SHA-256":<sha> OR`` the session field, one
query), on older servers with a text search for the session identifier (title and body);
every hit is read and its fields compared exactly. An experiment is created with its tags,
in one request. A team may forbid users to create tags: eLabFTW then refuses the create only
after it has stored the experiment, with no id in its answer, so the experiment is found by
its SHA-256 and finished like any other, its tags added one at a time; one the team does
not let the key create is reported, not fatal. The upload is recognised
by the hash eLabFTW keeps of each file, the CDCS link by the field and the link in the
body, new content by the SHA-256 field, which changes last. A retry after any failure, even
after a request whose answer was lost, therefore does nothing twice.

Nothing a person wrote is overwritten when only the link is new: the body's "Related
Records" part is appended (``bodyappend``) and the field merged in (``metadatamerge``, on
eLabFTW 5.6 and newer; older servers get the metadata just read, changed).

eLabFTW 5.2 is the oldest server supported (see ``elabftw_api.MINIMUM``): it is checked
by ``nxdrop check`` and before every export.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from nxdrop.destinations import elabftw_document as doc
from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.destinations.elabftw_api import (
    ARCHIVED,
    CONTENT_TYPE_ON_CREATE,
    EXTENDED_SEARCH,
    METADATA_MERGE,
    ELabFTWApi,
)
from nxdrop.exceptions import DestinationError, PermanentError
from nxdrop.http import LazyClient, check_base_url, join_url

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

_LIST_LIMIT = 1000  # categories/statuses: the server's default page is 15
# The session searches are SQL LIKE: "_" matches any character and a longer identifier
# holds a shorter one, so neighbouring sessions are found too.
_SESSION_HITS = 100


class ELabFTWDestination(ExportDestination):
    """Exports each session as the eLabFTW experiment NexusLIMS documents, XML attached."""

    name = "elabftw"
    priority = 85
    reads = frozenset({"cdcs"})  # links to the CDCS record: waits for CDCS alone

    def __init__(self) -> None:
        self.site: str | None = None
        self.category_setting: str | None = None
        self.status_setting: str | None = None
        self.team_setting = "current"
        self._client: LazyClient | None = None
        self._api: ELabFTWApi | None = None
        self._lock = threading.Lock()
        self._ids: tuple[int | None, int | None] | None = None

    def configure(self, settings: Settings) -> None:
        """Take the ``NX_ELABFTW_*`` settings; the server is not contacted here."""
        url, key = settings.elabftw_url, settings.elabftw_api_key
        if url:
            check_base_url(url, "NX_ELABFTW_URL")
        self.site = url or None
        self.category_setting = (settings.elabftw_experiment_category or "").strip() or None
        self.status_setting = (settings.elabftw_experiment_status or "").strip() or None
        self.team_setting = settings.elabftw_team.strip() or "current"
        if url and key is not None and key.get_secret_value():
            self._client = LazyClient(
                join_url(url, "api/v2"),
                settings,
                {"Authorization": key.get_secret_value(), "Accept": "application/json"},
            )
            self._api = ELabFTWApi(self._client)

    @property
    def enabled(self) -> bool:
        """On when both ``NX_ELABFTW_URL`` and ``NX_ELABFTW_API_KEY`` are set."""
        return self._client is not None

    @property
    def disabled_reason(self) -> str | None:
        """Why it is off, for ``nxdrop destinations``."""
        return None if self.enabled else "NX_ELABFTW_URL and NX_ELABFTW_API_KEY must both be set"

    @property
    def endpoint(self) -> str:
        """The eLabFTW site: experiments found on another site are never taken for ours."""
        return self.site.rstrip("/") + "/" if self.site and self.enabled else ""

    def validate_config(self) -> tuple[bool, str | None]:
        """Reach eLabFTW with the key (``GET users/me``), check its version (``GET info``)
        and resolve category and status."""
        if not self.enabled:
            return False, self.disabled_reason
        try:
            self.api.me()
            self.api.version()
            self._category_status()
        except DestinationError as exc:
            return False, str(exc)
        except Exception as exc:  # a check reports, it never raises
            return False, self.api.http.redactor.scrub(f"unexpected {type(exc).__name__}: {exc}")
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Make the session's experiment, or continue the one it already has.

        First the experiment an earlier attempt made for these exact bytes, then this
        session's experiment made for an earlier version: either is brought up to date in
        place. Only when there is neither is an experiment created.
        """
        self.api.version()  # an unsupported server is refused before anything is sent
        category, status = self._category_status()
        facts = _facts(context)
        # Nothing to find where the log vouches that nothing was ever sent for the session.
        found = None if context.unseen else self._find(facts)
        if found is not None:
            return self._complete(found, facts, context)
        return self._create(facts, context, category, status)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """New content for the session: rewrite the experiment ``previous`` made, in place.

        Title, body and extra fields then describe the new record (a CDCS link is kept, or
        added if CDCS has one now) and the new XML is attached beside the earlier one. An
        experiment that is gone or is not this session's is left alone: the record is
        exported instead.
        """
        self.api.version()
        found = self._ours(previous.record_id, context.session_identifier)
        if found is None:
            return self.export(context)
        return self._complete(found, _facts(context), context)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same record again: check the experiment ``earlier`` made and add what is new.

        If it is still there, this session's and showing these bytes, the CDCS link is added
        when CDCS has one the experiment lacks, missing tags are added, and the XML attached
        again if it was removed. Otherwise the record is exported (which continues the
        session's experiment, if any).
        """
        self.api.version()
        found = self._ours(earlier.record_id, context.session_identifier)
        if found is None or doc.sha_of(found) != context.sha256:
            return self.export(context)
        return self._complete(found, _facts(context), context)

    def holds_no_records(self) -> bool | None:
        """Whether eLabFTW shows this key no experiment of NexusLIMS's making, archived ones
        included: none with the word in its title or body (nxdrop's and NexusLIMS's), and
        none tagged ``NexusLIMS`` (an experiment of an older nxdrop)."""
        self.api.version()
        return not (
            self.api.search(q=f'"{doc.TAG}"', limit=1) or self.api.search(tag=doc.TAG, limit=1)
        )

    # -- finding our experiment --------------------------------------------------------

    @property
    def api(self) -> ELabFTWApi:
        if self._api is None:
            raise PermanentError("eLabFTW is not configured (NX_ELABFTW_URL, NX_ELABFTW_API_KEY)")
        return self._api

    def _ours(self, record_id: str | None, session: str) -> dict[str, Any] | None:
        """The experiment ``record_id`` if it is still there and is this session's."""
        if not record_id or not record_id.isdigit():
            return None
        experiment = self.api.read(int(record_id))
        if experiment is None:
            why = "is gone (deleted, or not readable with this API key)"
        elif doc.session_of(experiment) != session:
            why = f"belongs to session {doc.session_of(experiment)!r}"
        else:
            return experiment
        log.warning(
            "eLabFTW experiment %s %s: leaving it alone, exporting %s anew",
            record_id,
            why,
            session,
            extra={"SESSION_ID": session, "DESTINATION": self.name, "RECORD_ID": record_id},
        )
        return None

    def _find(self, facts: doc.Facts) -> dict[str, Any] | None:
        """This session's experiment: the one for these bytes, else the newest of the session.

        The extended search names the field, so an experiment whose title, body or
        custom_id happens to match is not even listed; the text search of older servers
        lists them, and the exact comparison of the fields sorts them out.
        """
        if self.api.version() >= EXTENDED_SEARCH:
            # One query for both: a new record (the common case) costs one empty answer.
            fields = [(doc.SHA_256, facts.sha256)]
            fields += [(name, facts.session) for name in (doc.SESSION_ID, doc.OLD_SESSION)]
            query = " OR ".join(_field_query(name, value) for name, value in fields)
            try:
                return self._pick(self.api.search(extended=query, limit=_SESSION_HITS), facts)
            except PermanentError as exc:
                if exc.status_code != 400:
                    raise
                # The query's grammar refused (a session identifier with a line break, say):
                # the text search still finds the session's experiment by its title.
                log.info("eLabFTW refused the extended search (%s); searching the text", exc)
        return self._pick(self.api.search(q=_text_term(facts.session), limit=_SESSION_HITS), facts)

    def _pick(self, hits: list[dict[str, Any]], facts: doc.Facts) -> dict[str, Any] | None:
        """Of ``hits``, the session's experiment for these bytes, else its newest one (before
        nxdrop kept one experiment per session, each version of a record made one)."""
        newest: dict[str, Any] | None = None
        for hit in sorted(hits, key=lambda h: int(h["id"]), reverse=True):
            if not doc.may_be_ours(hit, facts.session, None):
                continue
            experiment = self.api.read(int(hit["id"]))
            if experiment is None or doc.session_of(experiment) != facts.session:
                continue
            if doc.sha_of(experiment) == facts.sha256:
                return experiment
            newest = newest or experiment
        return newest

    # -- making and changing it --------------------------------------------------------

    def _create(
        self,
        facts: doc.Facts,
        context: ExportContext,
        category: int | None,
        status: int | None,
    ) -> ExportResult:
        payload: dict[str, Any] = {
            "title": doc.title(facts),
            "body": doc.body(facts),
            "content_type": doc.HTML,
            # The SHA-256 is stored with the experiment itself, so whatever happens after
            # this request (a lost answer, a crash), the next attempt finds it.
            "metadata": doc.new_metadata(facts),
            "tags": doc.tags(facts),
        }
        if category is not None:
            payload["category"] = category
        if status is not None:
            payload["status"] = status
        try:
            experiment_id = self.api.create(payload)
        except PermanentError as exc:
            if exc.status_code != 400:
                raise
            # A team that forbids users to create tags refuses a new tag only after the
            # experiment is stored (src/traits/InsertTagsTrait.php, src/models/Tags.php
            # ``create``), and its answer has no id: find it by its SHA-256, then finish it
            # as any other found experiment, adding the tags one at a time.
            found = self._find(facts)
            if found is None or doc.sha_of(found) != facts.sha256:
                raise
            log.info("eLabFTW refused a tag of the new experiment %s (%s)", found["id"], exc)
            return self._complete(found, facts, context)
        upload_id = self.api.upload(
            experiment_id, f"{facts.session}.xml", context.content, facts.sha256
        )
        if self.api.version() < CONTENT_TYPE_ON_CREATE:
            # Older servers store the key's preferred editor instead: the body is HTML.
            self.api.patch(experiment_id, {"content_type": doc.HTML})
        return self._result(experiment_id, upload_id, facts.cdcs_url, [])

    def _complete(
        self, experiment: dict[str, Any], facts: doc.Facts, context: ExportContext
    ) -> ExportResult:
        """Make this session's ``experiment`` show the record; do only what is missing.

        The upload comes first and the SHA-256 field changes last, so the field never names
        bytes that are not attached, and a retry (whatever reply was lost) finds every step
        it has done: the upload by its hash, the tags, the fields and the link by their
        values.
        """
        experiment_id = int(experiment["id"])
        # CDCS's result now, else the link the experiment has: a CDCS failure this time
        # round does not take away a link that works.
        facts = replace(facts, cdcs_url=facts.cdcs_url or doc.cdcs_of(experiment))
        if experiment.get("state") == ARCHIVED:
            return self._archived(experiment, facts)
        version = self.api.version()
        try:
            upload_id = doc.attached(experiment, facts.sha256)
            if upload_id is None:
                upload_id = self.api.upload(
                    experiment_id, f"{facts.session}.xml", context.content, facts.sha256
                )
            wanted = doc.missing_tags(experiment, doc.tags(facts))
            missing = self._add_tags(experiment_id, wanted, facts.session)
            changes = doc.changes(
                experiment,
                facts,
                merge=version >= METADATA_MERGE,
                fix_content_type=version < CONTENT_TYPE_ON_CREATE,
            )
            if changes:
                self.api.patch(experiment_id, changes)
        except PermanentError as exc:
            if exc.status_code not in (403, 422):
                raise
            # Readable but not writable: locked (a timestamp or a colleague locks it),
            # archived meanwhile, or write access withdrawn. A second experiment for the
            # session is no answer.
            raise PermanentError(
                f"eLabFTW experiment {experiment_id} of session {facts.session} cannot be "
                f"changed with this API key (locked or archived by someone, or no write "
                f"access): {exc}",
                status_code=exc.status_code,
            ) from exc
        return self._result(experiment_id, upload_id, facts.cdcs_url, missing)

    def _archived(self, experiment: dict[str, Any], facts: doc.Facts) -> ExportResult:
        """An archived experiment of the session: eLabFTW lets nothing change it but
        unarchiving (src/models/AbstractEntity.php ``patch``: 422), and nxdrop does not
        undo what a person decided. The same record is there: reuse it; new content: say so.
        """
        experiment_id = int(experiment["id"])
        upload_id = doc.attached(experiment, facts.sha256)
        if doc.sha_of(experiment) != facts.sha256 or upload_id is None:
            raise PermanentError(
                f"eLabFTW experiment {experiment_id} of session {facts.session} is archived, "
                f"and eLabFTW allows no change to an archived experiment: unarchive it so "
                f"that nxdrop can bring it up to date (attach this version of the record)",
                status_code=422,
            )
        linked = doc.cdcs_of(experiment)
        if facts.cdcs_url and linked != facts.cdcs_url:
            log.warning(
                "eLabFTW experiment %s of session %s is archived: the CDCS link %s is not "
                "added (unarchive it and export the record again to add it)",
                experiment_id,
                facts.session,
                facts.cdcs_url,
                extra={"SESSION_ID": facts.session, "DESTINATION": self.name},
            )
        return self._result(experiment_id, upload_id, linked, [], archived=True)

    def _add_tags(self, experiment_id: int, tags: list[str], session: str) -> list[str]:
        """Add ``tags`` one at a time; the ones eLabFTW refuses are returned, not raised.

        A team can forbid users to create tags (``user_create_tag`` off): a tag the team
        has is then added, a new one refused with 400 "Users cannot create tags."
        (src/models/Tags.php ``create``). The experiment is complete without it; an admin
        can create the tag, and the next export of the session adds it.
        """
        refused: list[str] = []
        reasons: list[str] = []
        for tag in tags:
            try:
                self.api.add_tag(experiment_id, tag)
            except PermanentError as exc:
                if exc.status_code != 400:
                    raise
                refused.append(tag)
                reasons.append(str(exc))
        if refused:
            log.warning(
                "eLabFTW experiment %s of session %s: tags %s could not be added (%s); an "
                "eLabFTW admin can create them or let users create tags, and the next export "
                "of this session adds them",
                experiment_id,
                session,
                ", ".join(repr(t) for t in refused),
                reasons[0],
                extra={"SESSION_ID": session, "DESTINATION": self.name},
            )
        return refused

    def _result(
        self,
        experiment_id: int,
        upload_id: int | None,
        cdcs: str | None,
        missing_tags: list[str],
        *,
        archived: bool = False,
    ) -> ExportResult:
        assert self.site is not None
        metadata: dict[str, Any] = {"upload_id": upload_id, "cdcs_url": cdcs}
        if missing_tags:
            metadata["tags_missing"] = missing_tags
        if archived:
            metadata["archived"] = True
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=str(experiment_id),
            record_url=join_url(self.site, f"experiments.php?mode=view&id={experiment_id}"),
            metadata=metadata,
        )

    # -- category, status, team ----------------------------------------------------------

    def _category_status(self) -> tuple[int | None, int | None]:
        """Category and status ids from the settings, titles resolved once (then cached)."""
        with self._lock:
            if self._ids is None:
                team: list[int] = []  # looked up only if a title needs it
                self._ids = (
                    self._resolve(
                        "CATEGORY", self.category_setting, "experiments_categories", team
                    ),
                    self._resolve("STATUS", self.status_setting, "experiments_status", team),
                )
            return self._ids

    def _resolve(self, what: str, value: str | None, kind: str, team: list[int]) -> int | None:
        """An id as it is, a title looked up among the team's own entries.

        Since eLabFTW 5.4 the list holds other teams' entries too, those not private
        (src/models/AbstractStatus.php ``readAll``: ``is_private = 0 OR team = :team``);
        each carries its ``team``. Another team's entry of the same title is not ours.
        """
        if value is None or value.isdigit():
            return int(value) if value else None
        if not team:
            team.append(self._team_id())
        entries = [
            e
            for e in self.api.entries(team[0], kind, _LIST_LIMIT)
            if e.get("team") is None or e.get("team") == team[0]
        ]
        matches = [e for e in entries if str(e.get("title", "")).strip() == value]
        if not matches:
            folded = value.casefold()
            matches = [e for e in entries if str(e.get("title", "")).strip().casefold() == folded]
        setting = f"NX_ELABFTW_EXPERIMENT_{what}={value!r}"
        if not matches:
            available = ", ".join(repr(e.get("title")) for e in entries) or "none"
            raise PermanentError(
                f"{setting}: no such experiment {what.lower()} in team {team[0]}; "
                f"available: {available}"
            )
        if len(matches) > 1:
            ids = ", ".join(str(e.get("id")) for e in matches)
            raise PermanentError(
                f"{setting}: team {team[0]} has several experiment {what.lower()} entries of "
                f"that title (ids {ids}); set the id instead"
            )
        return int(matches[0]["id"])

    def _team_id(self) -> int:
        """NX_ELABFTW_TEAM as an id; ``current`` is the key's team, from ``users/me``.

        The spec allows ``current`` only on ``teams/{id}`` itself (admins only), not on
        ``teams/{id}/experiments_categories``, so the id is looked up.
        """
        if self.team_setting.isdigit():
            return int(self.team_setting)
        if self.team_setting != "current":
            raise PermanentError(f"NX_ELABFTW_TEAM={self.team_setting!r}: a team id or 'current'")
        me = self.api.me()
        team, teams = me.get("team"), me.get("teams") or []
        if not isinstance(team, int) and len(teams) == 1 and isinstance(teams[0], dict):
            team = teams[0].get("id")  # the spec's users_full lists teams; the server adds team
        if not isinstance(team, int):
            raise PermanentError("cannot tell the API key's team; set NX_ELABFTW_TEAM to its id")
        return team


def _facts(context: ExportContext) -> doc.Facts:
    cdcs = context.successful_result("cdcs")
    return doc.Facts(
        session=context.session_identifier,
        instrument=context.instrument_pid,
        user=context.user,
        start=context.dt_from,
        end=context.dt_to,
        sha256=context.sha256,
        cdcs_url=cdcs.record_url if cdcs is not None and cdcs.record_url else None,
    )


def _text_term(session: str) -> str:
    """A quoted term of eLabFTW's text search that finds the session's experiment by title.

    The grammar has changed over the releases (src/node/grammar/queryGrammar.pegjs): how a
    backslash inside quotes reads differs, and a line break ends the query with a syntax
    error. The longest piece of the identifier without any of those is searched instead:
    the search is a LIKE anyway and every hit is compared exactly, so a broader search
    finds the same experiment.
    """
    piece = max(re.split(r'[\\"\n\r\f]+', session), key=len)
    # Nothing searchable left: every experiment of ours has the title's prefix.
    return f'"{piece or doc.TITLE_PREFIX.strip()}"'


def _field_query(name: str, value: str) -> str:
    """``extrafield:"<name>":"<value>"``, the value matched literally.

    The grammar (src/node/grammar/queryGrammar.pegjs FieldMetadata, List2, Escape) reads
    ``\\"`` as a quote and ``\\%`` ``\\_`` as the SQL wildcards taken literally; any other
    backslash is a backslash. The match is still ``LIKE '%value%'`` on the lower-cased
    field (QueryBuilderVisitor::visitMetadataField), so hits are compared exactly after.
    """

    def quoted(text: str) -> str:
        escaped = "".join("\\" + c if c in '%_"' else c for c in text)
        return f'"{escaped}"'

    # A hex SHA-256 goes bare, as the search syntax documents it.
    bare = re.fullmatch(r"[A-Za-z0-9.-]+", value) is not None
    return f"extrafield:{quoted(name)}:{value if bare else quoted(value)}"
