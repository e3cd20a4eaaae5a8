"""The eLabFTW destination: one experiment per record, through eLabFTW's REST API v2.

What it makes: an experiment titled ``<record title> (<session identifier>)`` (just the
session identifier when the record has no title), with an HTML table of the session in its
body, tags ``NexusLIMS``/instrument/user, extra fields in a "NexusLIMS" group, the record
attached byte for byte, and a link to the CDCS record when CDCS ran first.

No duplicates: the body and the ``SHA-256`` extra field carry the record's hash, and every
export first searches for it (``GET experiments?q=<sha256>``, which searches title, body and
elabid). A retry after any failure, even after a create whose answer was lost, finds the
experiment made before and only does what is missing (the upload, the CDCS link); nothing
has to be carried from one attempt to the next.
"""

from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from datetime import datetime
from html import escape
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from urllib3.filepost import encode_multipart_formdata

from nxdrop.destinations.base import ExportContext, ExportResult
from nxdrop.exceptions import DestinationError, PermanentError
from nxdrop.http import HttpClient, check_base_url, join_url

if TYPE_CHECKING:
    from collections.abc import Iterator

    from nxdrop.settings import Settings

GROUP_ID = 1
SHA_FIELD, CDCS_FIELD = "SHA-256", "CDCS record"
_LIST_LIMIT = 1000  # categories/statuses: the server's default page is 15


class ELabFTWDestination:
    """Exports each record as one eLabFTW experiment with the XML attached."""

    name = "elabftw"
    priority = 85

    def __init__(self) -> None:
        self.site: str | None = None
        self.category_setting: str | None = None
        self.status_setting: str | None = None
        self.team_setting = "current"
        self._key: str | None = None
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
            self._key = key.get_secret_value()
            self._client = HttpClient.for_settings(
                join_url(url, "api/v2"),
                settings,
                {"Authorization": self._key, "Accept": "application/json"},
            )

    @property
    def enabled(self) -> bool:
        """On when both ``NX_ELABFTW_URL`` and ``NX_ELABFTW_API_KEY`` are set."""
        return self._client is not None

    @property
    def disabled_reason(self) -> str | None:
        """Why it is off, for ``nxdrop destinations``."""
        return None if self.enabled else "NX_ELABFTW_URL and NX_ELABFTW_API_KEY must both be set"

    def validate_config(self) -> tuple[bool, str | None]:
        """Reach eLabFTW with the key (``GET users/me``) and resolve category and status."""
        if not self.enabled:
            return False, self.disabled_reason
        try:
            with self._scrubbed():
                self._http.json("GET", "users/me")
                self._category_status()
        except DestinationError as exc:
            return False, str(exc)
        except Exception as exc:  # a check reports, it never raises
            return False, self._scrub(f"unexpected {type(exc).__name__}: {exc}")
        return True, None

    def export(self, context: ExportContext) -> ExportResult:
        """Create (or find, if an earlier attempt made it) the experiment; attach the record."""
        with self._scrubbed():
            category, status = self._category_status()
            sha, cdcs = _sha256(context), _cdcs_url(context)
            found = self._find(sha)
            if found is None:
                experiment_id = self._create(context, sha, cdcs, category, status)
                upload_id = self._upload(experiment_id, context, sha)
            else:  # an earlier attempt made it: do only what is missing
                experiment_id = found["id"]
                if cdcs and not _field(found, CDCS_FIELD):
                    self._add_link(experiment_id, found, cdcs)
                upload_id = _attached(found, sha)
                if upload_id is None:
                    upload_id = self._upload(experiment_id, context, sha)
            return self._result(experiment_id, {"upload_id": upload_id, "cdcs_url": cdcs})

    def reconcile(self, context: ExportContext, earlier: ExportResult) -> ExportResult:
        """Add the CDCS link to the experiment made earlier, if it lacks one that now exists."""
        cdcs = _cdcs_url(context)
        if not cdcs or earlier.metadata.get("cdcs_url") or not earlier.record_id:
            return earlier
        with self._scrubbed():
            experiment_id = int(earlier.record_id)
            experiment = self._http.json("GET", f"experiments/{experiment_id}")
            self._add_link(experiment_id, experiment, cdcs)
        return self._result(experiment_id, {**earlier.metadata, "cdcs_url": cdcs})

    # -- requests ----------------------------------------------------------------------

    @property
    def _http(self) -> HttpClient:
        if self._client is None:
            raise PermanentError("eLabFTW is not configured (NX_ELABFTW_URL, NX_ELABFTW_API_KEY)")
        return self._client

    def _find(self, sha: str) -> dict[str, Any] | None:
        """The experiment an earlier attempt made for these bytes, if any (full, with uploads)."""
        hits = self._http.json("GET", "experiments", params={"q": sha, "limit": 5})
        for hit in hits if isinstance(hits, list) else []:
            if not isinstance(hit, dict) or not isinstance(hit.get("id"), int):
                continue
            experiment = self._http.json("GET", f"experiments/{hit['id']}")
            if _field(experiment, SHA_FIELD).get("value") == sha:
                return dict(experiment, id=hit["id"])
        return None

    def _create(
        self,
        context: ExportContext,
        sha: str,
        cdcs: str | None,
        category: int | None,
        status: int | None,
    ) -> int:
        record = context.record
        title = context.session_identifier
        if record is not None and record.title:
            title = f"{record.title} ({context.session_identifier})"
        tags = ["NexusLIMS", context.instrument_pid or "", context.user or ""]
        payload: dict[str, Any] = {
            "title": title,
            "body": _body(context, sha, cdcs),
            "content_type": 1,  # HTML
            # Not in the spec's entity_editable, but the server's create reads it (and Prism
            # lets it through): one request, so an experiment never exists untagged.
            "tags": list(dict.fromkeys(t for t in tags if t)),
            "metadata": _metadata_for(context, sha, cdcs),
        }
        if category is not None:
            payload["category"] = category
        if status is not None:
            payload["status"] = status
        response = self._http.request("POST", "experiments", json=payload)
        return _id_from_location(response.headers.get("Location"), "POST experiments")

    def _upload(self, experiment_id: int, context: ExportContext, sha: str) -> int | None:
        name = f"{context.session_identifier}.xml"
        fields: dict[str, Any] = {
            "file": (name, context.content, "application/xml"),
            "comment": f"NexusLIMS record {context.session_identifier} (sha256 {sha})",
        }
        # A fixed boundary: a retried upload sends the same bytes as the first.
        body, content_type = encode_multipart_formdata(fields, boundary=f"nxdrop{sha[:32]}")
        response = self._http.request(
            "POST",
            f"experiments/{experiment_id}/uploads",
            data=body,
            headers={"Content-Type": content_type},
        )
        location = response.headers.get("Location")
        return _id_from_location(location, "POST uploads") if location else None

    def _add_link(self, experiment_id: int, experiment: dict[str, Any], cdcs: str) -> None:
        """Append the CDCS link to the body and add it to the extra fields, keeping the rest.

        The real server wants ``metadata`` as a JSON *string* on PATCH (the spec says object).
        """
        metadata = _metadata(experiment)
        fields = metadata.setdefault("extra_fields", {})
        fields[CDCS_FIELD] = {**_cdcs_field(cdcs), "group_id": GROUP_ID, "position": len(fields)}
        body = (experiment.get("body") or "") + f"<p>CDCS record: {_link(cdcs)}</p>"
        self._http.request(
            "PATCH",
            f"experiments/{experiment_id}",
            json={"body": body, "metadata": json.dumps(metadata)},
        )

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

    def _result(self, experiment_id: int, metadata: dict[str, Any]) -> ExportResult:
        assert self.site is not None
        return ExportResult(
            success=True,
            destination_name=self.name,
            record_id=str(experiment_id),
            record_url=join_url(self.site, f"experiments.php?mode=view&id={experiment_id}"),
            metadata=metadata,
        )

    # -- the key never leaves in a message (a proxy may echo headers back) -------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        try:
            yield
        except DestinationError as exc:
            exc.args = tuple(self._scrub(str(a)) for a in exc.args)
            raise


def _sha256(context: ExportContext) -> str:
    return context.record.sha256 if context.record else hashlib.sha256(context.content).hexdigest()


def _cdcs_url(context: ExportContext) -> str | None:
    cdcs = context.successful_result("cdcs")
    return cdcs.record_url if cdcs is not None and cdcs.record_url else None


def _is_http(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _link(url: str) -> str:
    """An escaped ``<a>`` for an http(s) URL; any other scheme (``javascript:``) stays text."""
    text = escape(url, quote=True)
    return f'<a href="{text}">{text}</a>' if _is_http(url) else text


def _body(context: ExportContext, sha: str, cdcs: str | None) -> str:
    """The experiment's main text: the session as a table; every value HTML-escaped."""
    rows = [
        ("Session", escape(context.session_identifier)),
        ("Instrument", escape(context.instrument_pid or "")),
        ("User", escape(context.user or "")),
        ("Start", escape(context.dt_from.isoformat() if context.dt_from else "")),
        ("End", escape(context.dt_to.isoformat() if context.dt_to else "")),
        (SHA_FIELD, escape(sha)),
    ]
    if cdcs:
        rows.append((CDCS_FIELD, _link(cdcs)))
    cells = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in rows)
    name = escape(f"{context.session_identifier}.xml")
    return (
        "<p>NexusLIMS experiment record, exported by nxdrop; the record is attached as "
        f"<code>{name}</code>.</p><table><tbody>{cells}</tbody></table>"
    )


def _metadata_for(context: ExportContext, sha: str, cdcs: str | None) -> dict[str, Any]:
    """Extra fields in one "NexusLIMS" group; datetimes as the record's local wall time."""
    fields: dict[str, dict[str, Any]] = {"Session": _text(context.session_identifier)}
    if context.instrument_pid:
        fields["Instrument"] = _text(context.instrument_pid)
    if context.user:
        fields["User"] = _text(context.user)
    for name, when in (("Start", context.dt_from), ("End", context.dt_to)):
        if when is not None:
            fields[name] = _datetime(when)
    fields[SHA_FIELD] = _text(sha)
    if cdcs:
        fields[CDCS_FIELD] = _cdcs_field(cdcs)
    for position, field in enumerate(fields.values()):
        field.update(group_id=GROUP_ID, position=position)
    return {
        "extra_fields": fields,
        "elabftw": {"extra_fields_groups": [{"id": GROUP_ID, "name": "NexusLIMS"}]},
    }


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


def _attached(experiment: dict[str, Any], sha: str) -> int | None:
    """The id of an upload of these exact bytes (the server keeps each upload's sha256)."""
    for upload in experiment.get("uploads") or []:
        if isinstance(upload, dict) and upload.get("hash") == sha:
            return int(upload["id"])
    return None


def _id_from_location(location: str | None, what: str) -> int:
    """The new id: the last path segment of ``Location`` (its host may not be ours)."""
    segment = urlsplit(location or "").path.rstrip("/").rpartition("/")[2]
    if not segment.isdigit():
        raise PermanentError(f"{what}: no id in the Location header ({location!r})")
    return int(segment)
