"""The eLabFTW destination: one experiment per session, through eLabFTW's REST API v2.

What it makes: an experiment titled ``<record title> (<session identifier>)`` (just the
session identifier when the record has no title), with an HTML table of the session in its
body, tags ``NexusLIMS``/instrument/user, extra fields in a "NexusLIMS" group, the record
attached byte for byte, and a link to the CDCS record when CDCS ran first.

One session, one experiment: its ``Session`` extra field says whose it is, its ``SHA-256``
field which record it shows. New content for the session (``update``) rewrites that
experiment's title, body and fields and attaches the new XML beside the old one; the same
content again (``reconcile``) only adds what is new (the CDCS link). An experiment is ours
only if its ``Session`` field is this session exactly: anything else found by id or by
search is left alone.

No duplicates: every step looks before it acts. Before creating, ``export`` searches for
the record's SHA-256 and then for the session identifier (``GET experiments?q=``, which
searches title, body and elabid) and continues what it finds. An upload is recognised by
the hash eLabFTW keeps of each file, the CDCS link by the field and the link in the body,
new content by the SHA-256 field, which changes last. A retry after any failure, even after
a request whose answer was lost, therefore does nothing twice, and nothing has to be
carried from one attempt to the next.
"""

from __future__ import annotations

import json
import logging
import threading
from datetime import datetime
from html import escape
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from nxdrop.destinations.base import ExportContext, ExportDestination, ExportResult
from nxdrop.exceptions import DestinationError, PermanentError
from nxdrop.http import HttpClient, check_base_url, join_url, multipart_body

if TYPE_CHECKING:
    from nxdrop.settings import Settings

log = logging.getLogger(__name__)

# The experiment's document. Every name it shows is here, so that the coming change to
# NexusLIMS's documented shape is made in these lines and in _title, _body and _fields.
GROUP_ID, GROUP_NAME = 1, "NexusLIMS"
SESSION_FIELD, INSTRUMENT_FIELD, USER_FIELD = "Session", "Instrument", "User"
START_FIELD, END_FIELD = "Start", "End"
SHA_FIELD, CDCS_FIELD = "SHA-256", "CDCS record"
OUR_FIELDS = (
    SESSION_FIELD,
    INSTRUMENT_FIELD,
    USER_FIELD,
    START_FIELD,
    END_FIELD,
    SHA_FIELD,
    CDCS_FIELD,
)

_LIST_LIMIT = 1000  # categories/statuses: the server's default page is 15
_HASH_HITS = 5  # experiments whose text holds the SHA-256: ours, and anyone quoting it
# The session search is SQL LIKE: "_" in an identifier matches any character, and a
# longer identifier holds a shorter one, so neighbouring sessions are found too.
_SESSION_HITS = 100


class ELabFTWDestination(ExportDestination):
    """Exports each session as one eLabFTW experiment with the XML attached."""

    name = "elabftw"
    priority = 85

    def __init__(self) -> None:
        self.site: str | None = None
        self.category_setting: str | None = None
        self.status_setting: str | None = None
        self.team_setting = "current"
        self._client: HttpClient | None = None
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
            self._client = HttpClient.for_settings(
                join_url(url, "api/v2"),
                settings,
                {"Authorization": key.get_secret_value(), "Accept": "application/json"},
            )

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
        """Reach eLabFTW with the key (``GET users/me``) and resolve category and status."""
        if not self.enabled:
            return False, self.disabled_reason
        try:
            self._http.json("GET", "users/me")
            self._category_status()
        except DestinationError as exc:
            return False, str(exc)
        except Exception as exc:  # a check reports, it never raises
            return False, self._http.redactor.scrub(f"unexpected {type(exc).__name__}: {exc}")
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Make the session's experiment, or continue the one it already has.

        First the experiment an earlier attempt made for these exact bytes (found by their
        SHA-256), then this session's experiment made for an earlier version (found by the
        session identifier): either is brought up to date in place. Only when there is
        neither is an experiment created.
        """
        category, status = self._category_status()
        sha, session = context.sha256, context.session_identifier
        found = self._find_by_hash(sha, session) or self._find_by_session(session)
        if found is not None:
            return self._bring_up_to_date(found, context)
        cdcs = _cdcs_url(context)
        experiment_id = self._create(context, sha, cdcs, category, status)
        upload_id = self._upload(experiment_id, context, sha)
        return self._result(experiment_id, upload_id, cdcs)

    def update(self, context: ExportContext, previous: ExportResult) -> ExportResult:
        """New content for the session: rewrite the experiment ``previous`` made, in place.

        Title, body and extra fields then describe the new record (a CDCS link is kept, or
        added if CDCS has one now) and the new XML is attached beside the earlier one. An
        experiment that is gone or is not this session's is left alone: the record is
        exported instead.
        """
        found = self._ours(previous.record_id, context.session_identifier)
        if found is None:
            return self.export(context)
        return self._bring_up_to_date(found, context)

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """The same record again: check the experiment ``earlier`` made and add what is new.

        If it is still there, this session's and showing these bytes, the CDCS link is added
        when CDCS has one the experiment lacks, and the XML attached again if it was removed.
        Otherwise the record is exported (which continues the session's experiment, if any).
        """
        found = self._ours(earlier.record_id, context.session_identifier)
        if found is None or _value(found, SHA_FIELD) != context.sha256:
            return self.export(context)
        return self._bring_up_to_date(found, context)

    # -- finding our experiment --------------------------------------------------------

    @property
    def _http(self) -> HttpClient:
        if self._client is None:
            raise PermanentError("eLabFTW is not configured (NX_ELABFTW_URL, NX_ELABFTW_API_KEY)")
        return self._client

    def _read(self, experiment_id: int) -> dict[str, Any] | None:
        """The experiment, in full (with its uploads); ``None`` if it is not there for us."""
        try:
            experiment = self._http.json("GET", f"experiments/{experiment_id}")
        except PermanentError as exc:
            # 404: no such id. 403: deleted (eLabFTW keeps a deleted experiment but refuses
            # to show it) or no longer readable with this key. Not ours to change either way.
            if exc.status_code in (403, 404):
                return None
            raise
        if not isinstance(experiment, dict):
            raise PermanentError(f"GET experiments/{experiment_id}: not an experiment")
        return dict(experiment, id=experiment_id)

    def _ours(self, record_id: str | None, session: str) -> dict[str, Any] | None:
        """The experiment ``record_id`` if it is still there and is this session's."""
        if not record_id or not record_id.isdigit():
            return None
        experiment = self._read(int(record_id))
        if experiment is None:
            why = "is gone (deleted, or not readable with this API key)"
        elif _value(experiment, SESSION_FIELD) != session:
            why = f"belongs to session {_value(experiment, SESSION_FIELD)!r}"
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

    def _search(self, term: str, limit: int) -> list[dict[str, Any]]:
        hits = self._http.json("GET", "experiments", params={"q": term, "limit": limit})
        hits = hits if isinstance(hits, list) else []
        return [h for h in hits if isinstance(h, dict) and isinstance(h.get("id"), int)]

    def _find_by_hash(self, sha: str, session: str) -> dict[str, Any] | None:
        """This session's experiment for these exact bytes, if an earlier attempt made it."""
        for hit in self._search(sha, _HASH_HITS):
            if not (_may_hold(hit, SHA_FIELD, sha) and _may_hold(hit, SESSION_FIELD, session)):
                continue
            experiment = self._read(hit["id"])
            if (
                experiment is not None
                and _value(experiment, SHA_FIELD) == sha
                and _value(experiment, SESSION_FIELD) == session
            ):
                return experiment
        return None

    def _find_by_session(self, session: str) -> dict[str, Any] | None:
        """This session's experiment made for another version of the record; the newest if
        there are several (before nxdrop kept one per session, each version made one)."""
        hits = self._search(_quoted(session), _SESSION_HITS)
        hits = [h for h in hits if _may_hold(h, SESSION_FIELD, session)]
        for hit in sorted(hits, key=lambda h: int(h["id"]), reverse=True):
            experiment = self._read(hit["id"])
            if experiment is not None and _value(experiment, SESSION_FIELD) == session:
                return experiment
        return None

    # -- changing it ---------------------------------------------------------------------

    def _bring_up_to_date(self, experiment: dict[str, Any], context: ExportContext) -> ExportResult:
        """Make this session's ``experiment`` show the record; do only what is missing.

        The upload comes first and the SHA-256 field changes last, so the field never names
        bytes that are not attached, and a retry (whatever reply was lost) finds every step
        it has done: the upload by its hash, the fields and the link by their values.
        """
        experiment_id = int(experiment["id"])
        sha = context.sha256
        # CDCS's result now, else the link the experiment has: a CDCS failure this time
        # round does not take away a link that works.
        cdcs = _cdcs_url(context) or _value(experiment, CDCS_FIELD)
        try:
            upload_id = _attached(experiment, sha)
            if upload_id is None:
                upload_id = self._upload(experiment_id, context, sha)
            changes = _changes(experiment, context, sha, cdcs)
            if changes:
                self._http.request("PATCH", f"experiments/{experiment_id}", json=changes)
        except PermanentError as exc:
            if exc.status_code != 403:
                raise
            # Readable but not writable: locked (a timestamp locks it) by someone else, or
            # write access withdrawn. A second experiment for the session is no answer.
            raise PermanentError(
                f"eLabFTW experiment {experiment_id} of session {context.session_identifier} "
                f"cannot be changed with this API key (locked by someone else, or no write "
                f"access): {exc}",
                status_code=exc.status_code,
            ) from exc
        return self._result(experiment_id, upload_id, cdcs)

    def _create(
        self,
        context: ExportContext,
        sha: str,
        cdcs: str | None,
        category: int | None,
        status: int | None,
    ) -> int:
        tags = ["NexusLIMS", context.instrument_pid or "", context.user or ""]
        payload: dict[str, Any] = {
            "title": _title(context),
            "body": _body(context, sha, cdcs),
            "content_type": 1,  # HTML
            # Not in the spec's entity_editable, but the server's create reads it (and Prism
            # lets it through): one request, so an experiment never exists untagged.
            "tags": list(dict.fromkeys(t for t in tags if t)),
            "metadata": _with_fields({}, _fields(context, sha, cdcs)),
        }
        if category is not None:
            payload["category"] = category
        if status is not None:
            payload["status"] = status
        reply = self._http.request("POST", "experiments", json=payload)
        return self._id_from_location(reply.headers.get("Location"), "POST experiments")

    def _upload(self, experiment_id: int, context: ExportContext, sha: str) -> int | None:
        """Attach the record: its bytes are sent as they are, never copied into one body."""
        body = multipart_body(
            {"comment": f"NexusLIMS record {context.session_identifier} (sha256 {sha})"},
            "file",
            f"{context.session_identifier}.xml",
            context.content,
            "application/xml",
            # A fixed boundary: a retried upload sends the same bytes as the first.
            boundary=f"nxdrop{sha[:32]}",
        )
        reply = self._http.request("POST", f"experiments/{experiment_id}/uploads", data=body)
        location = reply.headers.get("Location")
        return self._id_from_location(location, "POST uploads") if location else None

    def _id_from_location(self, location: str | None, what: str) -> int:
        """The new id: the last path segment of ``Location`` (its host may not be ours)."""
        segment = urlsplit(location or "").path.rstrip("/").rpartition("/")[2]
        if not segment.isdigit():
            shown = self._http.redactor.cut(location or "", 200)
            raise PermanentError(f"{what}: no id in the Location header ({shown!r})")
        return int(segment)

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

    def _resolve(self, what: str, value: str | None, path: str, team: list[int]) -> int | None:
        if value is None or value.isdigit():
            return int(value) if value else None
        if not team:
            team.append(self._team_id())
        entries = self._http.json("GET", f"teams/{team[0]}/{path}", params={"limit": _LIST_LIMIT})
        entries = [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []
        titles = {str(e.get("title", "")).strip().casefold(): e for e in entries}
        entry = titles.get(value.casefold())
        if entry is None:
            available = ", ".join(repr(e.get("title")) for e in entries) or "none"
            raise PermanentError(
                f"NX_ELABFTW_EXPERIMENT_{what}={value!r}: no such experiment "
                f"{what.lower()} in team {team[0]}; available: {available}"
            )
        return int(entry["id"])

    def _team_id(self) -> int:
        """NX_ELABFTW_TEAM as an id; ``current`` is the key's team, from ``users/me``.

        The spec allows ``current`` only on ``teams/{id}`` itself (admins only), not on
        ``teams/{id}/experiments_categories``, so the id is looked up.
        """
        if self.team_setting.isdigit():
            return int(self.team_setting)
        if self.team_setting != "current":
            raise PermanentError(f"NX_ELABFTW_TEAM={self.team_setting!r}: a team id or 'current'")
        me = self._http.json("GET", "users/me")
        me = me if isinstance(me, dict) else {}
        team, teams = me.get("team"), me.get("teams") or []
        if not isinstance(team, int) and len(teams) == 1 and isinstance(teams[0], dict):
            team = teams[0].get("id")  # the spec's users_full lists teams; the server adds team
        if not isinstance(team, int):
            raise PermanentError("cannot tell the API key's team; set NX_ELABFTW_TEAM to its id")
        return team

    def _result(self, experiment_id: int, upload_id: int | None, cdcs: str | None) -> ExportResult:
        assert self.site is not None
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=str(experiment_id),
            record_url=join_url(self.site, f"experiments.php?mode=view&id={experiment_id}"),
            metadata={"upload_id": upload_id, "cdcs_url": cdcs},
        )


def _cdcs_url(context: ExportContext) -> str | None:
    cdcs = context.successful_result("cdcs")
    return cdcs.record_url if cdcs is not None and cdcs.record_url else None


def _quoted(term: str) -> str:
    """``term`` as one quoted term of eLabFTW's search grammar.

    Unquoted, a leading ``-`` or ``!`` negates, ``title:`` names a field, and a space,
    quote or parenthesis breaks the term (src/node/grammar/queryGrammar.pegjs).
    """
    return '"' + term.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _link(url: str) -> str:
    """An escaped ``<a>`` for an http(s) URL; any other scheme (``javascript:``) stays text."""
    text = escape(url, quote=True)
    return f'<a href="{text}">{text}</a>' if _is_http(url) else text


def _link_line(cdcs: str) -> str:
    """The line added to the body of an experiment made before CDCS had the record."""
    return f"<p>{escape(CDCS_FIELD)}: {_link(cdcs)}</p>"


def _title(context: ExportContext) -> str:
    record = context.record
    if record is not None and record.title:
        return f"{record.title} ({context.session_identifier})"
    return context.session_identifier


def _body(context: ExportContext, sha: str, cdcs: str | None) -> str:
    """The experiment's main text: the session as a table; every value HTML-escaped."""
    rows = [
        (SESSION_FIELD, escape(context.session_identifier)),
        (INSTRUMENT_FIELD, escape(context.instrument_pid or "")),
        (USER_FIELD, escape(context.user or "")),
        (START_FIELD, escape(context.dt_from.isoformat() if context.dt_from else "")),
        (END_FIELD, escape(context.dt_to.isoformat() if context.dt_to else "")),
        (SHA_FIELD, escape(sha)),
    ]
    if cdcs:
        rows.append((CDCS_FIELD, _link(cdcs)))
    cells = "".join(f"<tr><th>{escape(name)}</th><td>{value}</td></tr>" for name, value in rows)
    name = escape(f"{context.session_identifier}.xml")
    return (
        "<p>NexusLIMS experiment record, exported by nxdrop; the record is attached as "
        f"<code>{name}</code>.</p><table><tbody>{cells}</tbody></table>"
    )


def _fields(context: ExportContext, sha: str, cdcs: str | None) -> dict[str, dict[str, Any]]:
    """Our extra fields, in order; datetimes as the record's local wall time."""
    fields: dict[str, dict[str, Any]] = {SESSION_FIELD: _text(context.session_identifier)}
    if context.instrument_pid:
        fields[INSTRUMENT_FIELD] = _text(context.instrument_pid)
    if context.user:
        fields[USER_FIELD] = _text(context.user)
    for name, when in ((START_FIELD, context.dt_from), (END_FIELD, context.dt_to)):
        if when is not None:
            fields[name] = _datetime(when)
    fields[SHA_FIELD] = _text(sha)
    if cdcs:
        fields[CDCS_FIELD] = _cdcs_field(cdcs)
    for position, field in enumerate(fields.values()):
        field["position"] = position
    return fields


def _with_fields(
    metadata: dict[str, Any], fields: dict[str, dict[str, Any]], *, replace: bool = False
) -> dict[str, Any]:
    """``metadata`` with ``fields`` set in the NexusLIMS group (declared if it is not).

    Whatever else it holds stays: fields people added, eLabFTW's own settings. With
    ``replace`` our fields that ``fields`` lacks go (an instrument the new record has not).
    """
    old = metadata.get("extra_fields")
    extra = dict(old) if isinstance(old, dict) else {}
    if replace:
        extra = {k: v for k, v in extra.items() if k not in OUR_FIELDS}
    for name, field in fields.items():
        extra[name] = {**field, "group_id": GROUP_ID}
    settings = metadata.get("elabftw")
    settings = dict(settings) if isinstance(settings, dict) else {}
    groups = settings.get("extra_fields_groups")
    groups = list(groups) if isinstance(groups, list) else []
    if not any(isinstance(g, dict) and g.get("id") == GROUP_ID for g in groups):
        groups.append({"id": GROUP_ID, "name": GROUP_NAME})
    settings["extra_fields_groups"] = groups
    return {**metadata, "extra_fields": extra, "elabftw": settings}


def _changes(
    experiment: dict[str, Any], context: ExportContext, sha: str, cdcs: str | None
) -> dict[str, Any]:
    """The PATCH that makes ``experiment`` show this record; empty if it does already.

    The real server wants ``metadata`` as a JSON *string* on PATCH (the spec says object).
    """
    metadata = _metadata(experiment)
    stored = experiment.get("body")
    body = stored if isinstance(stored, str) else ""
    changes: dict[str, Any] = {}
    if _value(experiment, SHA_FIELD) == sha:
        # It shows these bytes already: add the CDCS link, each half only where it is
        # missing, and keep the rest (people may have written in the body since).
        if cdcs and _value(experiment, CDCS_FIELD) != cdcs:
            position = _field(experiment, CDCS_FIELD).get("position")
            if not isinstance(position, int):
                position = len(metadata.get("extra_fields") or {})
            field = {**_cdcs_field(cdcs), "position": position}
            changes["metadata"] = json.dumps(_with_fields(metadata, {CDCS_FIELD: field}))
        if cdcs and not _shows(body, cdcs):
            changes["body"] = body + _link_line(cdcs)
        return changes
    # Another version of the record: title, body and our fields describe this one (the
    # earlier body stays in eLabFTW's revisions). The server applies a PATCH key by key in
    # the order sent (AbstractEntity::patch), so metadata, with the SHA-256, goes last: a
    # PATCH cut short leaves the old hash, and the next attempt does it all again.
    title = _title(context)
    if experiment.get("title") != title:
        changes["title"] = title
    new_body = _body(context, sha, cdcs)
    if body != new_body:
        changes["body"] = new_body
    new_metadata = _with_fields(metadata, _fields(context, sha, cdcs), replace=True)
    if new_metadata != metadata:
        changes["metadata"] = json.dumps(new_metadata)
    return changes


def _text(value: str) -> dict[str, Any]:
    return {"type": "text", "value": value}


def _datetime(when: datetime) -> dict[str, Any]:
    # datetime-local has no zone: the record's own wall time; the full value in description.
    return {
        "type": "datetime-local",
        "value": when.strftime("%Y-%m-%dT%H:%M"),
        "description": when.isoformat(),
    }


def _cdcs_field(cdcs: str) -> dict[str, Any]:
    # eLabFTW shows a url field as a link: only for http(s).
    return {"type": "url" if _is_http(cdcs) else "text", "value": cdcs}


def _metadata(experiment: Any) -> dict[str, Any]:
    """An experiment's metadata as a dict: the server sends a JSON string and a decoded copy."""
    if not isinstance(experiment, dict):
        return {}
    for value in (experiment.get("metadata_decoded"), experiment.get("metadata")):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, dict):
            return value
    return {}


def _field(experiment: Any, name: str) -> dict[str, Any]:
    fields = _metadata(experiment).get("extra_fields")
    field = fields.get(name) if isinstance(fields, dict) else None
    return field if isinstance(field, dict) else {}


def _value(experiment: Any, name: str) -> str | None:
    """The value of one of our extra fields, if it has a text value."""
    value = _field(experiment, name).get("value")
    return value if isinstance(value, str) and value else None


def _may_hold(hit: dict[str, Any], name: str, value: str) -> bool:
    """False only when a search hit shows its metadata and the field has another value
    (the listing's metadata spares a GET per stranger; a listing without it says nothing)."""
    if "metadata" not in hit and "metadata_decoded" not in hit:
        return True
    return _value(hit, name) == value


class _Html(HTMLParser):
    """The link targets and the text of an HTML fragment, entities decoded."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.hrefs: set[str] = set()
        self.text: list[str] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs.update(v for k, v in attrs if tag == "a" and k == "href" and v is not None)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _shows(body: str, url: str) -> bool:
    """Whether ``body`` links to ``url`` or shows it (our links show their URL as text).

    Parsed, not compared with what was sent: eLabFTW's HTML purifier rewrites the body it
    stores (src/services/Filter.php: links get ``target="_blank" rel="noreferrer
    noopener"``, and it may normalise an href), but the text of a link stays as it was.
    """
    html = _Html(body)
    return url in html.hrefs or url in "".join(html.text)


def _attached(experiment: dict[str, Any], sha: str) -> int | None:
    """The id of an upload of these exact bytes (the server keeps each upload's sha256)."""
    for upload in experiment.get("uploads") or []:
        if isinstance(upload, dict) and upload.get("hash") == sha:
            return int(upload["id"])
    return None
