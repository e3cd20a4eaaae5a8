"""The CDCS destination: records into a NIST CDCS (NexusLIMS-CDCS) through its REST API."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from nxdrop.destinations.base import ExportContext, ExportResult
from nxdrop.exceptions import DestinationError, PermanentError, TransientError
from nxdrop.http import HttpClient, check_base_url, join_url

if TYPE_CHECKING:
    from nxdrop.settings import Settings

# CDCS pages lists by 10; a title matching more pages than this is not our doing.
_MAX_PAGES = 50


class CDCSDestination:
    """Creates one CDCS record per session, titled by its session identifier, and publishes it.

    Before creating, it looks for a record with the same title, template and exact XML, so an
    attempt interrupted after CDCS answered never leaves a duplicate behind.
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
            return False, f"unexpected {type(exc).__name__}: {exc}"
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Create (or find, if an earlier attempt made it) the record, then publish it."""
        template = self._template_id()
        workspace = self._workspace_id() if self.assign else None
        title = context.session_identifier
        try:
            xml = context.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PermanentError(f"the record is not UTF-8: {exc}") from None
        record = self._find(title, template, xml)
        if record is None:
            body = {"template": template, "title": title, "xml_content": xml}
            try:
                record = self._http().json("POST", "rest/data/", json=body)
            except PermanentError as exc:
                if exc.status_code not in (400, 500):
                    raise
                # CDCS answers 500 for XML that fails the template: the record is bad.
                raise PermanentError(
                    f"CDCS rejected the record (template {template}): {exc}",
                    status_code=exc.status_code,
                ) from exc
        return self._published(record, template, workspace, title)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """Reuse the record an earlier export made, if CDCS still has it; else export anew."""
        if not earlier.record_id:
            return self.export(context)
        try:
            record = self._http().json("GET", f"rest/data/{earlier.record_id}/")
        except PermanentError as exc:
            if exc.status_code == 404:
                return self.export(context)
            raise
        workspace = self._workspace_id() if self.assign else None
        template = str(record.get("template", earlier.metadata.get("template")))
        return self._published(record, template, workspace, context.session_identifier)

    # -- internals ---------------------------------------------------------------------

    def _http(self) -> HttpClient:
        if self._client is None:
            raise PermanentError("CDCS is not configured: set NX_CDCS_URL and NX_CDCS_TOKEN")
        return self._client

    def _get(self, path: str, **params: str) -> Any:
        try:
            return self._http().json("GET", path, params=params or None)
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

    def _find(self, title: str, template: str, xml: str) -> dict[str, Any] | None:
        """The record an earlier attempt created with exactly this content, if any."""
        # Page by number: ``next`` is built from the server's own idea of its URL, which
        # behind a reverse proxy with a sub-path may lack the sub-path.
        for page in range(1, _MAX_PAGES + 1):
            found = self._get("rest/data/", title=title, template=template, page=str(page))
            for record in found["results"]:
                if record.get("title") == title and record.get("xml_content") == xml:
                    return record  # type: ignore[no-any-return]
            if not found.get("next"):
                break
        return None

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
