"""The CDCS destination: records into a NIST CDCS (NexusLIMS-CDCS) through its REST API.

One session, one record: a session's record is the token user's own record titled with the
session identifier (under the configured template). New content for the session replaces
that record's XML in place (``PATCH rest/data/<id>/``), so its id, and every link to it, stay
valid. A record id from the log is trusted only after CDCS confirms the record is still
there, is titled with this session and is among the token user's own records: anybody
else's record is never patched, published or taken for ours.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, NamedTuple

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import DestinationError, PermanentError, TransientError
from nxdrop.http import (
    HttpClient,
    RawJsonString,
    StreamedBody,
    check_base_url,
    join_url,
    json_body,
)

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

# CDCS pages lists by 10; a title matching more pages than this is not our doing.
_MAX_PAGES = 50
# Answers that hold records leave their XML undecoded: compared with the record's bytes a
# piece at a time, it never costs a record-sized str (or two, or four).
_XML = ("xml_content",)


class _Listed(NamedTuple):
    """One of the token user's records of a session, as CDCS lists it, without its XML."""

    record: dict[str, Any]
    same_xml: bool  # whether its XML is exactly the record's bytes


class CDCSDestination(ExportDestination):
    """One CDCS record per session, titled by its session identifier, kept up to date and
    published.

    Before creating, it looks among the token user's records of this title and template: one
    with exactly this XML (an interrupted attempt made it) is reused, else the most recent
    one is updated in place, so not even a fresh database leads to a second record.
    """

    name = "cdcs"
    priority = 100

    def __init__(self) -> None:
        self.template_setting: str | None = None
        self.assign = True
        self._client: HttpClient | None = None
        self._lock = threading.Lock()
        self._template: str | None = None
        self._workspace: str | None = None

    def configure(self, settings: Settings) -> None:
        """Take the ``NX_CDCS_*`` settings; the server is not contacted here."""
        url, token = settings.cdcs_url, settings.cdcs_token
        if url:
            check_base_url(url, "NX_CDCS_URL")
        self.template_setting = settings.cdcs_template or None
        self.assign = settings.cdcs_assign_to_public_workspace
        if url and token is not None and token.get_secret_value():
            self._client = HttpClient.for_settings(
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
        """Reach CDCS with the token: find the template and, if publishing, the workspace."""
        if not self.enabled:
            return False, self.disabled_reason
        try:
            self._template_id()
            if self.assign:
                self._workspace_id()
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
        return self._settle(context, stored_id=None)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """Replace the XML of the session's record ``previous`` made; same id, same URL.

        A record that is gone, unreadable to this token or titled otherwise is not ours: it
        is never touched, and the session's record is found or made as :meth:`export` does.
        """
        return self._follow(context, previous)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same bytes again: check that ``earlier``'s record is still ours and current.

        Ours and unchanged: published if need be and reused. Ours but with other XML
        (edited on the server): updated. Not ours (gone, another user's, another title, as
        after the server was reinstalled): never touched; :meth:`export` instead.
        """
        return self._follow(context, earlier)

    # -- internals ---------------------------------------------------------------------

    def _http(self) -> HttpClient:
        if self._client is None:
            raise PermanentError("CDCS is not configured: set NX_CDCS_URL and NX_CDCS_TOKEN")
        return self._client

    def _get(self, path: str, **params: str) -> Any:
        try:
            return self._http().json("GET", path, params=params or None, raw=_XML)
        except PermanentError as exc:
            if exc.status_code in (401, 403):
                raise PermanentError(
                    f"CDCS refused NX_CDCS_TOKEN: {exc}", status_code=exc.status_code
                ) from exc
            raise

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
        return self._settle(context, stored_id=stored_id)

    def _looks_ours(self, record_id: str, title: str) -> bool:
        """Whether ``GET rest/data/<id>/`` shows this session's record (ownership is
        checked by :meth:`_settle` against the token user's own records)."""
        why: str | None = None
        try:
            stored = self._http().json("GET", f"rest/data/{record_id}/", raw=_XML)
        except PermanentError as exc:
            # 403: someone else's private record (or a bad token, which the listing in
            # ``_settle`` reports as such). 404: deleted, or a reinstalled server.
            if exc.status_code not in (403, 404):
                raise
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

    def _settle(self, context: ExportContext, stored_id: str | None) -> ExportResult:
        """Reuse, update or create the session's one record; publish it; its result.

        ``stored_id`` is preferred among the token user's records of this title and
        template (links to it stay valid), then one with exactly this XML, then the most
        recent one.
        """
        template = self._template_id()
        workspace = self._workspace_id() if self.assign else None
        title = context.session_identifier
        own = self._own_records(title, template, context.content)
        found = next((r for r in own if stored_id and str(r.record.get("id")) == stored_id), None)
        if stored_id and found is None:
            log.warning(
                "CDCS record %s is not among this token's records titled %r (template %s): "
                "left untouched",
                stored_id,
                title,
                template,
                extra={"SESSION_ID": title, "DESTINATION": self.name, "RECORD_ID": stored_id},
            )
        if found is None:
            found = next((r for r in own if r.same_xml), None)
        if found is None and own:
            found = max(own, key=lambda r: _recency(r.record))
        if found is None:
            record = self._create(title, template, context)
        elif not found.same_xml:
            record = self._replace_xml(found.record, template, context)
        else:
            record = found.record
        return self._published(record, template, workspace, title)

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

    def _create(self, title: str, template: str, context: ExportContext) -> dict[str, Any]:
        try:
            created: dict[str, Any] = self._http().json(
                "POST",
                "rest/data/",
                data=_xml_body({"template": template, "title": title}, context),
                raw=_XML,
            )
        except PermanentError as exc:
            if exc.status_code not in (400, 500):
                raise
            raise _rejected(exc, template) from exc
        created.pop("xml_content", None)  # CDCS sends the record back; we have it
        return created

    def _replace_xml(
        self, record: dict[str, Any], template: str, context: ExportContext
    ) -> dict[str, Any]:
        """``PATCH rest/data/<id>/`` with the new XML; CDCS validates it against the
        record's template and keeps its id, title and workspace."""
        record_id = str(record["id"])
        try:
            patched = self._http().json(
                "PATCH",
                f"rest/data/{record_id}/",
                data=_xml_body({}, context),
                raw=_XML,
            )
        except PermanentError as exc:
            if exc.status_code not in (400, 500):
                raise  # 403: ours but not writable (a published record without the right)
            raise _rejected(exc, template, record_id) from exc
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

    def _published(
        self, record: dict[str, Any], template: str, workspace: str | None, title: str
    ) -> ExportResult:
        record_id = str(record["id"])
        if workspace is not None and str(record.get("workspace")) != workspace:
            # A record left private would look exported but be invisible: fail instead.
            # No trailing slash: CDCS answers 404 to ``.../assign/<id>/``.
            path = f"rest/data/{record_id}/assign/{workspace}"
            unpublished = f"record {record_id} is in CDCS but NOT published: "
            try:
                self._http().request("PATCH", path)
            except TransientError as exc:
                # The retry finds this record by its content and publishes it then.
                raise TransientError(
                    f"{unpublished}{exc}", status_code=exc.status_code, retry_after=exc.retry_after
                ) from exc
            except PermanentError as exc:
                raise PermanentError(f"{unpublished}{exc}", status_code=exc.status_code) from exc
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=record_id,
            record_url=join_url(self._http().base_url, f"data?id={record_id}"),
            metadata={"template": template, "workspace": workspace, "title": title},
        )


def _xml_body(fields: dict[str, str], context: ExportContext) -> StreamedBody:
    """``fields`` and the record as CDCS takes it, in JSON: ``xml_content`` is the file's
    exact bytes, never re-serialised, and never copied whole (escaped as they are sent)."""
    try:
        return json_body(fields, "xml_content", context.content)
    except ValueError as exc:
        raise PermanentError(f"the record is not UTF-8: {exc}") from None


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


def _rejected(exc: PermanentError, template: str, record_id: str | None = None) -> PermanentError:
    """A 400 or 500 to a create or an XML update, worded for the operator: CDCS answers
    500 (or 400) for XML that fails the template, so the record is bad, not the server."""
    what = f"update of record {record_id}" if record_id else "record"
    return PermanentError(
        f"CDCS rejected the {what} (template {template}): {exc}", status_code=exc.status_code
    )
