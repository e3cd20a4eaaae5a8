"""The CDCS destination: records into a NIST CDCS (NexusLIMS-CDCS) through its REST API.

One session, one record: a session's record is the token user's own record titled with the
session identifier (under the configured template), or one of the same title and template
that nxdrop gave to the session's user. New content for the session replaces that record's
XML in place (``PATCH rest/data/<id>/``), so its id, and every link to it, stay valid. A
record id from the log is trusted only after CDCS confirms the record is still there, is
titled with this session and is among those records: anybody else's record is never
patched, published or taken for ours.

CDCS answers 500 for a record that fails its template and for its own faults alike; the
record is checked against the template's XSD here first (:mod:`.cdcs_schema`), so a record
that fails is never sent and a 500 for one that passes is a fault worth a retry. A record
is created published, in one request (``workspace`` in the POST). With
``NX_CDCS_USER_OWNED_RECORDS`` it is then given to the CDCS user of its experimenter
(``change-owner``, as NexusLIMS 2.7 does), and that user's records of the session count
as the session's too.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import DestinationError, PermanentError, TransientError
from nxdrop.http import LazyClient, check_base_url, join_url
from nxdrop.http.bodies import RawJsonString, StreamedBody, json_body

if TYPE_CHECKING:
    from nxdrop.destinations.cdcs_schema import TemplateSchemas
    from nxdrop.http.client import HttpClient
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

# CDCS pages lists by 10; a title matching more pages than this is not our doing.
_MAX_PAGES = 50
# Titles asked about at once go into one regular expression, in the query string: kept well
# under the 4,094 bytes that gunicorn, CDCS's server, allows a request line.
_PATTERN_BUDGET = 3000
# Outside these, a title's characters become "." in such a pattern (see holds_records_of).
_NOT_PLAIN = re.compile(r"[^A-Za-z0-9_-]")
# Answers that hold records leave their XML undecoded: compared with the record's bytes a
# piece at a time, it never costs a record-sized str (or two, or four).
_XML = ("xml_content",)
# What core-main-app's access control says (``access_control/api.py``) when a write is not
# allowed. A create does the check while saving, outside the view's 403 handler, so CDCS
# answers these with 500; they are refusals, and a retry cannot help.
_REFUSALS = (
    "The user doesn't have enough rights to publish.",
    "The user does not have the permission to write into this workspace.",
    "The user doesn't have enough rights.",
    "Unable to write if not authenticated.",
)
_NO_PUBLISH = _REFUSALS[0]
# NexusLIMS writes the experimenter as "First Last (username)" (its NEMO harvester), or as
# the username alone where it has no name.
_USERNAME_IN_PARENS = re.compile(r"\(\s*([^()\s]+)\s*\)\s*$")
_SUPERUSER = (
    "records given to their users (NX_CDCS_USER_OWNED_RECORDS) need NX_CDCS_TOKEN to be a "
    "CDCS superuser's token, as NexusLIMS requires: the user list, every user's records and "
    "change-owner are admin-only"
)


class _Listed(NamedTuple):
    """One of the session's records, as CDCS lists it, without its XML."""

    record: dict[str, Any]
    same_xml: bool  # whether its XML is exactly the record's bytes


@dataclass(frozen=True)
class _Owner:
    """Who a record is to belong to (``NX_CDCS_USER_OWNED_RECORDS``): the username taken
    from the experimenter, and the CDCS user's id (``None`` when there is no such user)."""

    username: str | None
    user_id: str | None


class CDCSDestination(ExportDestination):
    """One CDCS record per session, titled by its session identifier, kept up to date and
    published.

    Before creating, it looks among the token user's records of this title and template: one
    with exactly this XML (an interrupted attempt made it) is reused, else the most recent
    one is updated in place, so not even a fresh database leads to a second record.
    """

    name = "cdcs"
    priority = 100
    reads = frozenset()  # needs no other destination: runs beside them

    def __init__(self) -> None:
        self.template_setting: str | None = None
        self.assign = True
        self.user_owned = False
        self._client: LazyClient | None = None
        self._lock = threading.Lock()
        self._template: str | None = None
        self._workspace: str | None = None
        self._schemas_made: TemplateSchemas | None = None
        self._schemas_lock = threading.Lock()
        self._unchecked: set[str] = set()  # templates already warned about

    def configure(self, settings: Settings) -> None:
        """Take the ``NX_CDCS_*`` settings; the server is not contacted here."""
        url, token = settings.cdcs_url, settings.cdcs_token
        if url:
            check_base_url(url, "NX_CDCS_URL")
        self.template_setting = settings.cdcs_template or None
        self.assign = settings.cdcs_assign_to_public_workspace
        self.user_owned = settings.cdcs_user_owned_records
        if url and token is not None and token.get_secret_value():
            self._client = LazyClient(
                url, settings, {"Authorization": f"Token {token.get_secret_value()}"}
            )

    @property
    def enabled(self) -> bool:
        """On when both ``NX_CDCS_URL`` and ``NX_CDCS_TOKEN`` are set."""
        return self._client is not None

    @property
    def disabled_reason(self) -> str:
        """Why it is off, for ``nxdrop destinations``."""
        return "NX_CDCS_URL and NX_CDCS_TOKEN must both be set"

    @property
    def endpoint(self) -> str:
        """The CDCS base URL: records found at another URL are never taken for ours."""
        return self._client.base_url.rstrip("/") + "/" if self._client is not None else ""

    def validate_config(self) -> tuple[bool, str | None]:
        """Reach CDCS with the token: find the template and its XSD, the public workspace if
        publishing, and, for ``NX_CDCS_USER_OWNED_RECORDS``, that the token is a superuser's.
        """
        if not self.enabled:
            return False, self.disabled_reason
        try:
            template = self._template_id()
            problem = self._schemas().get(template).problem
            if problem is not None:
                # Not a failure: CDCS still checks every record; only its 500s are ambiguous.
                self._warn_unchecked(template, problem)
            if self.assign:
                self._workspace_id()
            if self.user_owned:
                self._users()
                # rest/user/ lets staff in; the list of every user's records only superusers.
                self._admin_get("rest/admin/data/", title="", template=template)
                log.info(
                    "NX_CDCS_USER_OWNED_RECORDS: records are given to the CDCS user of their "
                    "experimenter; NX_CDCS_TOKEN is a superuser's, as this needs",
                    extra={"DESTINATION": self.name},
                )
        except DestinationError as exc:
            return False, str(exc)
        except Exception as exc:  # a check reports, it never raises
            return False, self._http().redactor.scrub(f"unexpected {type(exc).__name__}: {exc}")
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Make CDCS hold this record as the session's one record, published.

        Among the token user's records of this title and template: the one with exactly
        this XML is reused; failing that the most recent one is updated in place; failing
        that a record is created.
        """
        return self._settle(context, None, stored_id=None)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """Replace the XML of the session's record ``previous`` made; same id, same URL.

        A record that is gone, unreadable to this token or titled otherwise is not ours: it
        is never touched, and the session's record is found or made as :meth:`export` does.
        """
        return self._follow(context, previous)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same bytes again: check that ``earlier``'s record is still ours and current.

        Ours and unchanged: published (and given to its user) if need be, and reused. Ours
        but with other XML (edited on the server): updated. Not ours (gone, another user's,
        another title, as after the server was reinstalled): never touched; :meth:`export`
        instead.
        """
        return self._follow(context, earlier)

    # -- internals ---------------------------------------------------------------------

    def _http(self) -> HttpClient:
        if self._client is None:
            raise PermanentError("CDCS is not configured: set NX_CDCS_URL and NX_CDCS_TOKEN")
        return self._client.client

    def _get(self, path: str, **params: str) -> Any:
        try:
            return self._http().json("GET", path, params=params or None, raw=_XML)
        except PermanentError as exc:
            if exc.status_code in (401, 403):
                raise PermanentError(
                    f"CDCS refused NX_CDCS_TOKEN: {exc}", status_code=exc.status_code
                ) from exc
            raise _server_fault(exc) from exc

    def _admin_get(self, path: str, **params: str) -> Any:
        """A GET that only a superuser may make (``NX_CDCS_USER_OWNED_RECORDS``)."""
        try:
            return self._http().json("GET", path, params=params or None, raw=_XML)
        except PermanentError as exc:
            if exc.status_code in (401, 403):
                raise PermanentError(f"{_SUPERUSER}: {exc}", status_code=exc.status_code) from exc
            raise _server_fault(exc) from exc

    def _template_id(self) -> str:
        with self._lock:
            if self._template is None:
                self._template = self._find_template()
            return self._template

    def _find_template(self) -> str:
        managers = [
            m
            for m in self._get("rest/template-version-manager/global/")
            if not m.get("is_disabled")
        ]
        wanted = self.template_setting
        if wanted is None:
            if len(managers) == 1:
                return str(managers[0]["current"])
            titles = ", ".join(repr(m["title"]) for m in managers) or "none"
            raise PermanentError(
                f"CDCS has {len(managers)} global templates ({titles}): "
                "set NX_CDCS_TEMPLATE to the title of the one records are validated against"
            )
        for m in managers:
            if m["title"] == wanted:
                return str(m["current"])
        for m in managers:
            # An id, even of an older version, is the operator's deliberate choice.
            if wanted == str(m["current"]) or wanted in map(str, m.get("versions", ())):
                return wanted
        titles = ", ".join(repr(m["title"]) for m in managers) or "none"
        raise PermanentError(
            f"NX_CDCS_TEMPLATE={wanted!r}: no global template on CDCS has this title or id "
            f"(there are: {titles})"
        )

    def _fetch_template(self, template_id: str) -> dict[str, Any]:
        """``GET rest/template/<id>/``: the template, its XSD in ``content``."""
        template = self._get(f"rest/template/{template_id}/")
        if not isinstance(template, dict):
            raise PermanentError(f"CDCS template {template_id}: not a template: {template!r:.200}")
        return template

    def _workspace_id(self) -> str:
        with self._lock:
            if self._workspace is None:
                spaces = self._get("rest/workspace/read_access/")
                public = [w for w in spaces if w.get("is_public")] or [
                    w for w in spaces if w.get("title") == "Global Public Workspace"
                ]
                if not public:
                    raise PermanentError(
                        "CDCS shows no public workspace to this token's user; "
                        "set NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE=false to keep records private"
                    )
                self._workspace = str(public[0]["id"])
            return self._workspace

    def _follow(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """Update or reuse the record ``earlier`` names, if CDCS shows it is ours."""
        title = context.session_identifier
        stored_id = earlier.record_id
        if stored_id and not self._looks_ours(stored_id, title):
            stored_id = None
        return self._settle(context, earlier, stored_id=stored_id)

    def _looks_ours(self, record_id: str, title: str) -> bool:
        """Whether ``GET rest/data/<id>/`` shows this session's record (ownership is
        checked by :meth:`_settle` against the session's records)."""
        why: str | None = None
        try:
            stored = self._http().json("GET", f"rest/data/{record_id}/", raw=_XML)
        except PermanentError as exc:
            # 403: someone else's private record (or a bad token, which the listing in
            # ``_settle`` reports as such). 404: deleted, or a reinstalled server.
            if exc.status_code not in (403, 404):
                raise _server_fault(exc) from exc
            why = "is gone" if exc.status_code == 404 else "is not readable with this token"
        else:
            if stored.get("title") != title:
                why = f"is titled {stored.get('title')!r}"
        if why is not None:
            log.warning(
                "CDCS record %s %s: not this session's record, left untouched",
                record_id,
                why,
                extra={"SESSION_ID": title, "DESTINATION": self.name, "RECORD_ID": record_id},
            )
            return False
        return True

    def _settle(
        self, context: ExportContext, earlier: ExportResult | None, stored_id: str | None
    ) -> ExportResult:
        """Reuse, update or create the session's one record; publish it; give it to its
        user; its result.

        ``stored_id`` is preferred among the session's records (links to it stay valid),
        then one with exactly this XML, then the most recent one.
        """
        template = self._template_id()
        workspace = self._workspace_id() if self.assign else None
        title = context.session_identifier
        owner = self._owner(context) if self.user_owned else None
        # Records given away (by this or an earlier run with NX_CDCS_USER_OWNED_RECORDS) are
        # no longer among the token user's own: they are found among their owner's.
        owners = {owner.user_id} if owner is not None and owner.user_id else set()
        given = (earlier.metadata.get("owner_id") if earlier is not None else None) or None
        if given is not None:
            owners.add(str(given))
        # Nothing to find where the log vouches that nothing was ever sent for the session.
        skip = context.unseen and earlier is None and stored_id is None
        listed = [] if skip else self._session_records(title, template, context.content, owners)
        found = next(
            (r for r in listed if stored_id and str(r.record.get("id")) == stored_id), None
        )
        if stored_id and found is None:
            log.warning(
                "CDCS record %s is not among the records titled %r (template %s) of this "
                "token's user%s: left untouched",
                stored_id,
                title,
                template,
                " (or of the user it gave the session's record to)" if owners else "",
                extra={"SESSION_ID": title, "DESTINATION": self.name, "RECORD_ID": stored_id},
            )
        if found is None:
            found = next((r for r in listed if r.same_xml), None)
        if found is None and listed:
            found = max(listed, key=lambda r: _recency(r.record))
        if found is None:
            record = self._create(title, template, workspace, context)
        elif not found.same_xml:
            record = self._replace_xml(found.record, template, context)
        else:
            record = found.record
        self._publish(record, workspace)
        metadata: dict[str, Any] = {"template": template, "workspace": workspace, "title": title}
        if owner is not None and owner.user_id:
            self._give(record, owner)
        if owner is not None or given is not None:
            # Who owns it now: where the next attempt looks, even with the setting off.
            metadata["owner"] = owner.username if owner is not None and owner.user_id else None
            owner_id = record.get("user_id")
            metadata["owner_id"] = None if owner_id is None else str(owner_id)
        record_id = str(record["id"])
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=record_id,
            record_url=join_url(self._http().base_url, f"data?id={record_id}"),
            metadata=metadata,
        )

    def holds_no_records(self) -> bool | None:
        """Whether CDCS holds no record under the template: none of the token user's, and
        with ``NX_CDCS_USER_OWNED_RECORDS`` none of any user's. A first page is enough."""
        template = self._template_id()
        if self._get("rest/data/", template=template, page="1")["results"]:
            return False
        return not (self.user_owned and self._admin_get("rest/admin/data/", template=template))

    def holds_records_of(self, sessions: Sequence[str]) -> set[str] | None:
        """Which of ``sessions`` CDCS holds a record of under the template: the titles in
        one listing (``regex=true``, ``^(a|b|…)$``), not one listing per session.

        In the pattern every character but ASCII letters, digits, ``_`` and ``-`` is ``.``,
        and CDCS matches it regardless of case: it means the same on every database CDCS
        runs on, and what it matches beyond the titles is sorted out here, exactly. With
        ``NX_CDCS_USER_OWNED_RECORDS`` every user's records are listed. ``None`` when more
        records match than one page shows: each record then looks for its own.
        """
        template = self._template_id()
        held: set[str] = set()
        for pattern in _title_patterns(sessions):
            query = {"title": pattern, "regex": "true", "template": template}
            if self.user_owned:  # a record given away is among its owner's only
                found = self._admin_get("rest/admin/data/", **query)
            else:
                found = self._get("rest/data/", **query, page="1")
            if isinstance(found, dict) and found.get("next"):
                return None  # more than a page: each record looks for its own
            rows = found.get("results", []) if isinstance(found, dict) else found
            held.update(str(r.get("title")) for r in rows)
        return held.intersection(sessions)

    def _session_records(
        self, title: str, template: str, content: bytes, owners: Iterable[str]
    ) -> list[_Listed]:
        """The session's records: the token user's own with this title and template, and
        those of ``owners`` (users records were given to); each once."""
        listed = self._own_records(title, template, content)
        for user_id in sorted(owners):
            listed += self._records_of(user_id, title, template, content)
        seen: set[str] = set()
        unique = []
        for r in listed:
            key = str(r.record.get("id"))
            if key not in seen:
                seen.add(key)
                unique.append(r)
        return unique

    def _own_records(self, title: str, template: str, content: bytes) -> list[_Listed]:
        """The token user's records with this title and template (CDCS lists no others),
        each with whether its XML is exactly ``content``.

        The XML itself is not kept: a session's records may each be as large as a record.
        """
        records: list[_Listed] = []
        # Page by number: ``next`` is built from the server's own idea of its URL, which
        # behind a reverse proxy with a sub-path may lack the sub-path.
        for page in range(1, _MAX_PAGES + 1):
            found = self._get("rest/data/", title=title, template=template, page=str(page))
            for r in found["results"]:
                xml = r.pop("xml_content", None)
                if r.get("title") == title:
                    records.append(_Listed(r, _holds(xml, content)))
            if not found.get("next"):
                break
        return records

    def _records_of(self, user_id: str, title: str, template: str, content: bytes) -> list[_Listed]:
        """``user_id``'s records with this title and template, from the superuser's list of
        every user's records (``rest/admin/data/``: one answer, not paged)."""
        found = self._admin_get("rest/admin/data/", title=title, template=template, user=user_id)
        rows = found.get("results", []) if isinstance(found, dict) else found
        records: list[_Listed] = []
        for r in rows:
            xml = r.pop("xml_content", None)
            mine = str(r.get("user_id")) == user_id and str(r.get("template")) == template
            if mine and r.get("title") == title:
                records.append(_Listed(r, _holds(xml, content)))
        return records

    def _check(self, template: str, context: ExportContext, what: str) -> str | None:
        """Check the record against the template before it is sent; refused records never
        are. Returns why it could not be checked here, or ``None`` when it passed."""
        from nxdrop.destinations.cdcs_schema import TemplateViolation

        try:
            record = context.record
            passed = record.valid_against if record is not None else None
            problem = self._schemas().check(template, context.content, passed)
        except TemplateViolation as exc:
            raise PermanentError(
                f"CDCS template {template} refuses {what}, so it was not sent: {exc}"
            ) from None
        if problem is not None:
            self._warn_unchecked(template, problem)
        return problem

    def _schemas(self) -> TemplateSchemas:
        """The templates' schemas, made at the first check: lxml comes with them, and a
        start with nothing to send does not load it."""
        with self._schemas_lock:
            if self._schemas_made is None:
                from nxdrop.destinations.cdcs_schema import TemplateSchemas

                self._schemas_made = TemplateSchemas(self._fetch_template)
            return self._schemas_made

    def _warn_unchecked(self, template: str, problem: str) -> None:
        """Say once per template that its records are sent unchecked, and what that means."""
        with self._lock:
            if template in self._unchecked:
                return
            self._unchecked.add(template)
        log.warning(
            "CDCS template %s: records cannot be checked here before they are sent (%s); "
            "CDCS checks them, but its 500 then cannot tell a refused record from a fault, "
            "and is retried as a fault",
            template,
            problem,
            extra={"DESTINATION": self.name},
        )

    def _create(
        self, title: str, template: str, workspace: str | None, context: ExportContext
    ) -> dict[str, Any]:
        """``POST rest/data/``, published in the same request when ``workspace`` is set."""
        unchecked = self._check(template, context, "the record")
        fields = {"template": template, "title": title}
        if workspace is not None:
            fields["workspace"] = workspace
        try:
            created: dict[str, Any] = self._http().json(
                "POST", "rest/data/", data=_xml_body(fields, context), raw=_XML
            )
        except PermanentError as exc:
            if exc.status_code == 500 and _NO_PUBLISH in str(exc):
                raise PermanentError(
                    "the CDCS user of NX_CDCS_TOKEN may not publish to the public workspace; "
                    "nothing was created. Give that user the publish right (CDCS permission "
                    "publish_data, as group 'default' has) or set "
                    f"NX_CDCS_ASSIGN_TO_PUBLIC_WORKSPACE=false: {exc}",
                    status_code=exc.status_code,
                ) from exc
            raise _write_failure(exc, template, "the record", unchecked) from exc
        created.pop("xml_content", None)  # CDCS sends the record back; we have it
        return created

    def _replace_xml(
        self, record: dict[str, Any], template: str, context: ExportContext
    ) -> dict[str, Any]:
        """``PATCH rest/data/<id>/`` with the new XML; CDCS validates it against the
        record's template and keeps its id, title, workspace and owner."""
        record_id = str(record["id"])
        what = f"the update of record {record_id}"
        unchecked = self._check(template, context, what)
        try:
            patched = self._http().json(
                "PATCH",
                f"rest/data/{record_id}/",
                data=_xml_body({}, context),
                raw=_XML,
            )
        except PermanentError as exc:
            # 403: ours but not writable (a published record without the publish right).
            raise _write_failure(exc, template, what, unchecked) from exc
        log.info(
            "CDCS record %s: XML replaced with the new version",
            record_id,
            extra={
                "SESSION_ID": record.get("title"),
                "DESTINATION": self.name,
                "RECORD_ID": record_id,
            },
        )
        if not isinstance(patched, dict):
            return record
        patched.pop("xml_content", None)
        return {**record, **patched}

    def _publish(self, record: dict[str, Any], workspace: str | None) -> None:
        """Assign the record to ``workspace`` unless it is there: one an interrupted attempt
        left private, or one made before records were created published."""
        record_id = str(record["id"])
        if workspace is None or str(record.get("workspace")) == workspace:
            return
        # A record left private would look exported but be invisible: fail instead.
        # No trailing slash: CDCS answers 404 to ``.../assign/<id>/``.
        path = f"rest/data/{record_id}/assign/{workspace}"
        self._step(path, f"record {record_id} is in CDCS but NOT published: ", refusals=_REFUSALS)
        record["workspace"] = workspace

    def _step(
        self, path: str, unfinished: str, *, refusals: tuple[str, ...] = (), denied: str = ""
    ) -> None:
        """``PATCH path``, a step after the record exists; every error it raises begins with
        ``unfinished`` (the record is there, the step is not). The retry finds the record and
        takes the step then: a 500 is retried unless it is one of the ``refusals``, and a
        401 or 403 says ``denied`` first."""
        try:
            self._http().request("PATCH", path)
        except TransientError as exc:
            raise TransientError(
                f"{unfinished}{exc}", status_code=exc.status_code, retry_after=exc.retry_after
            ) from exc
        except PermanentError as exc:
            status = exc.status_code
            if status == 500 and not any(r in str(exc) for r in refusals):
                raise TransientError(f"{unfinished}{exc}", status_code=500) from exc
            why = f"{denied}: " if denied and status in (401, 403) else ""
            raise PermanentError(f"{unfinished}{why}{exc}", status_code=status) from exc

    # -- NX_CDCS_USER_OWNED_RECORDS ------------------------------------------------------

    def _owner(self, context: ExportContext) -> _Owner:
        """The CDCS user the record is to belong to, looked up before anything is written.

        As NexusLIMS: a user that cannot be found leaves the record with the token's user,
        with a warning, and never blocks the export. (NexusLIMS also creates the account;
        a file in a drop folder is no authority to create accounts, so nxdrop does not.)
        """
        username = username_of(context.user)
        title = context.session_identifier
        if username is None:
            log.warning(
                "NX_CDCS_USER_OWNED_RECORDS: the record names no experimenter; its CDCS "
                "record stays with the token's user",
                extra={"SESSION_ID": title, "DESTINATION": self.name},
            )
            return _Owner(None, None)
        users = self._users()
        exact = [u for u in users if u.get("username") == username]
        if not exact:  # a username typed in another case elsewhere, if only one fits
            exact = [u for u in users if str(u.get("username", "")).lower() == username.lower()]
        if len(exact) != 1:
            log.warning(
                "NX_CDCS_USER_OWNED_RECORDS: %s CDCS user named %r (from experimenter %r); "
                "the record stays with the token's user",
                "no" if not exact else "more than one",
                username,
                context.user,
                extra={"SESSION_ID": title, "DESTINATION": self.name},
            )
            return _Owner(username, None)
        return _Owner(str(exact[0]["username"]), str(exact[0]["id"]))

    def _users(self) -> list[dict[str, Any]]:
        """Every CDCS user (``GET rest/user/``, admin-only), paged or not."""
        users: list[dict[str, Any]] = []
        for page in range(1, _MAX_PAGES + 1):
            found = self._admin_get("rest/user/", **({"page": str(page)} if page > 1 else {}))
            if isinstance(found, list):
                return found
            users += found.get("results", [])
            if not found.get("next"):
                break
        return users

    def _give(self, record: dict[str, Any], owner: _Owner) -> None:
        """Make ``owner`` the record's owner unless it is already (``change-owner``, no
        trailing slash: superuser only)."""
        assert owner.user_id is not None
        record_id = str(record["id"])
        if str(record.get("user_id")) == owner.user_id:
            return
        path = f"rest/data/{record_id}/change-owner/{owner.user_id}"
        given = f"record {record_id} is in CDCS but NOT given to user {owner.username!r}: "
        # A 500: the user was deleted meanwhile, say; the retry looks again.
        self._step(path, given, denied=_SUPERUSER)
        log.info(
            "CDCS record %s given to user %r",
            record_id,
            owner.username,
            extra={
                "SESSION_ID": record.get("title"),
                "DESTINATION": self.name,
                "RECORD_ID": record_id,
            },
        )
        record["user_id"] = owner.user_id


def username_of(experimenter: str | None) -> str | None:
    """The username in a NexusLIMS experimenter: ``Ned Land (ned)`` → ``ned``, as its NEMO
    harvester writes it; the whole text where there are no parentheses (NexusLIMS writes the
    username alone when it has no full name); ``None`` for none."""
    if experimenter is None or not experimenter.strip():
        return None
    match = _USERNAME_IN_PARENS.search(experimenter)
    return match.group(1) if match else experimenter.strip()


def _xml_body(fields: dict[str, str], context: ExportContext) -> StreamedBody:
    """``fields`` and the record as CDCS takes it, in JSON: ``xml_content`` is the file's
    exact bytes, never re-serialised, and never copied whole (escaped as they are sent)."""
    try:
        return json_body(fields, "xml_content", context.content)
    except ValueError as exc:
        raise PermanentError(f"the record is not UTF-8: {exc}") from None


def _title_patterns(titles: Iterable[str]) -> Iterator[str]:
    """Regular expressions ``^(a|b|…)$`` that match each of ``titles``, and perhaps more,
    each at most ``_PATTERN_BUDGET`` bytes in a URL."""
    chunk: list[str] = []
    size = 0
    for title in titles:
        loose = _NOT_PLAIN.sub(".", title)  # all of it unreserved in a URL: one byte each
        if chunk and size + len(loose) > _PATTERN_BUDGET:
            yield "^(" + "|".join(chunk) + ")$"
            chunk, size = [], 0
        chunk.append(loose)
        size += len(loose) + 3  # "|" is "%7C"
    if chunk:
        yield "^(" + "|".join(chunk) + ")$"


def _holds(xml: Any, content: bytes) -> bool:
    """Whether CDCS's ``xml_content`` (left undecoded) is exactly the record's bytes."""
    return isinstance(xml, RawJsonString) and xml.equals_utf8(content)


def _recency(record: dict[str, Any]) -> tuple[str, str, int]:
    """Sort key, newest content last: CDCS moves ``last_modification_date`` only when the
    content changes; ISO timestamps from one server compare as strings."""
    record_id = str(record.get("id", ""))
    return (
        str(record.get("last_modification_date") or ""),
        str(record.get("creation_date") or ""),
        int(record_id) if record_id.isdigit() else 0,
    )


def _server_fault(exc: PermanentError) -> DestinationError:
    """A 500 to a request that cannot be wrong (a read): CDCS's own fault, worth a retry;
    any other permanent error as it is."""
    if exc.status_code != 500:
        return exc
    return TransientError(f"CDCS server fault (HTTP 500), retried: {exc}", status_code=500)


def _write_failure(
    exc: PermanentError, template: str, what: str, unchecked: str | None
) -> DestinationError:
    """A failed create or XML update, worded for the operator.

    400: CDCS refused the request's fields. 500 for a record that passed the template here:
    a fault of CDCS's (a database outage), retried. A 500 that is an access refusal, or
    any other error, is permanent.
    """
    if exc.status_code == 400:
        return PermanentError(
            f"CDCS rejected {what} (template {template}): {exc}", status_code=exc.status_code
        )
    if exc.status_code == 500 and not any(r in str(exc) for r in _REFUSALS):
        checked = (
            f"which passes template {template}'s XSD here"
            if unchecked is None
            else f"which could not be checked against template {template} here ({unchecked})"
        )
        return TransientError(
            f"CDCS answered HTTP 500 to {what}, {checked}: taken for a fault of CDCS's and "
            f"retried: {exc}",
            status_code=500,
        )
    return exc
