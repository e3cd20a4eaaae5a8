"""The eLabFTW experiment NexusLIMS documents, as pure functions of a session.

The shape is NexusLIMS's (its exporter ``nexusLIMS/exporters/destinations/elabftw.py`` and
its docs, "What gets exported"): the title ``NexusLIMS Experiment - <session>``; an HTML
body with ``<h1>NexusLIMS Microscopy Session</h1>``, ``<h2>Session Details</h2>`` and a list
of Session ID, Instrument, User, Start and End, then ``<h2>Related Records</h2>`` with a
"View in CDCS" link when CDCS holds the record; the tags ``NexusLIMS``, the instrument and
the user; and ``extra_fields`` named, typed, placed and grouped as NexusLIMS does ("Session
ID", "Instrument", "Start Time", "End Time", "User" in the group "Session Information",
"CDCS Record" in the group "Related Records"). nxdrop adds one field beside them, the
record's "SHA-256", by which it recognises its own experiment.

NexusLIMS ends its body with a "Files" section; nxdrop does not, so that a CDCS link added
later (appended, never rewritten: a scientist may have written in the body meanwhile)
gives the same document as one made with the link. Every value in the body is HTML-escaped
(NexusLIMS's is not) and only an http(s) URL becomes a link.

Nothing here talks to a server: these functions build what is sent and read what came
back, so the destination's client stays thin and every rule is testable on its own.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from html import escape
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urlsplit

TITLE_PREFIX = "NexusLIMS Experiment - "
TAG = "NexusLIMS"

SESSION_ID = "Session ID"
INSTRUMENT = "Instrument"
START_TIME = "Start Time"
END_TIME = "End Time"
USER = "User"
CDCS_RECORD = "CDCS Record"
SHA_256 = "SHA-256"  # nxdrop's addition

SESSION_GROUP = "Session Information"
RELATED_GROUP = "Related Records"

# The experiment nxdrop made before it followed NexusLIMS: title "<record title>
# (<session>)", a table, and these fields in one group. Such an experiment of this session
# is still ours (an existing installation must not duplicate it); new content moves it to
# the documented shape.
OLD_SESSION = "Session"
OLD_START = "Start"
OLD_END = "End"
OLD_CDCS = "CDCS record"
OLD_GROUP = "NexusLIMS"

OUR_FIELDS = frozenset({SESSION_ID, INSTRUMENT, START_TIME, END_TIME, USER, CDCS_RECORD, SHA_256})
OLD_FIELDS = frozenset({OLD_SESSION, OLD_START, OLD_END, OLD_CDCS})

HTML, MARKDOWN = 1, 2  # eLabFTW's content_type values

# NexusLIMS's ids for a new experiment's groups; an existing one's are found by name.
_NEW_GROUP_IDS = {SESSION_GROUP: 1, RELATED_GROUP: 2}


@dataclass(frozen=True)
class Facts:
    """What the experiment says about one record of a session."""

    session: str
    instrument: str | None
    user: str | None
    start: datetime | None
    end: datetime | None
    sha256: str
    cdcs_url: str | None = None


# -- the document ------------------------------------------------------------------------


def title(facts: Facts) -> str:
    """``NexusLIMS Experiment - <session>``: plain text, eLabFTW escapes it when shown."""
    return TITLE_PREFIX + facts.session


def body(facts: Facts) -> str:
    """The HTML body; with a CDCS link it is exactly :func:`related_section` appended."""
    items = [(SESSION_ID, facts.session)]
    items += [(INSTRUMENT, facts.instrument)] if facts.instrument else []
    items += [(USER, facts.user)] if facts.user else []
    items += [("Start", facts.start.isoformat())] if facts.start else []
    items += [("End", facts.end.isoformat())] if facts.end else []
    lines = [
        "<h1>NexusLIMS Microscopy Session</h1>",
        "<h2>Session Details</h2>",
        "<ul>",
        *(f"<li><strong>{escape(name)}</strong>: {escape(value)}</li>" for name, value in items),
        "</ul>",
    ]
    return "\n".join(lines) + (related_section(facts.cdcs_url) if facts.cdcs_url else "")


def related_section(cdcs_url: str) -> str:
    """The "Related Records" part of the body, as appended to an experiment made without it."""
    if is_http(cdcs_url):
        url = escape(cdcs_url, quote=True)
        item = f'<li><a href="{url}">View in CDCS</a></li>'
    else:  # a javascript: or other URL stays text
        item = f"<li>View in CDCS: {escape(cdcs_url)}</li>"
    return "\n" + "\n".join(["<h2>Related Records</h2>", "<ul>", item, "</ul>"])


def tags(facts: Facts) -> list[str]:
    """``NexusLIMS``, the instrument and the user, each once (eLabFTW ignores case)."""
    wanted = [TAG, facts.instrument or "", facts.user or ""]
    seen: set[str] = set()
    out = []
    for tag in wanted:
        if tag.strip() and tag.casefold() not in seen:
            seen.add(tag.casefold())
            out.append(tag)
    return out


def extra_fields(
    facts: Facts, session_group: int | None, related_group: int | None
) -> dict[str, dict[str, Any]]:
    """The extra fields, in NexusLIMS's order, types, descriptions and positions.

    Date-times are ``datetime-local`` (no zone): the record's own wall time, to the minute,
    as NexusLIMS writes them. nxdrop's SHA-256 follows NexusLIMS's fields.
    """
    group = session_group
    fields = {SESSION_ID: _field("text", facts.session, "NexusLIMS session identifier", 1, group)}
    if facts.instrument:
        fields[INSTRUMENT] = _field(
            "text", facts.instrument, "Instrument persistent identifier", 2, group
        )
    if facts.start:
        fields[START_TIME] = _field(
            "datetime-local", _minute(facts.start), "Session start time", 3, group
        )
    if facts.end:
        fields[END_TIME] = _field(
            "datetime-local", _minute(facts.end), "Session end time", 4, group
        )
    if facts.user:
        fields[USER] = _field("text", facts.user, "User who performed the session", 5, group)
    fields[SHA_256] = _field(
        "text", facts.sha256, "SHA-256 of the attached NexusLIMS XML record", 6, group
    )
    if facts.cdcs_url:
        fields[CDCS_RECORD] = cdcs_field(facts.cdcs_url, related_group)
    return fields


def cdcs_field(url: str, group: int | None) -> dict[str, Any]:
    """NexusLIMS's "CDCS Record" field; a url field (shown as a link) only for http(s)."""
    return _field("url" if is_http(url) else "text", url, "Link to CDCS record", 10, group)


def new_metadata(facts: Facts) -> dict[str, Any]:
    """The ``metadata`` of a new experiment: NexusLIMS's fields, groups and settings."""
    return rewritten_metadata({}, facts)


def rewritten_metadata(metadata: Mapping[str, Any], facts: Facts) -> dict[str, Any]:
    """``metadata`` with our fields describing ``facts``; whatever else it holds stays.

    Fields people added and eLabFTW's own settings are kept; our fields (of either shape)
    that ``facts`` lacks go; the groups are found by name (the old "NexusLIMS" group, ours,
    is renamed) or declared.
    """
    result = copy.deepcopy(dict(metadata))
    old = result.get("extra_fields")
    kept = {
        k: v
        for k, v in (old.items() if isinstance(old, dict) else ())
        if k not in OUR_FIELDS and k not in OLD_FIELDS
    }
    settings = result.get("elabftw")
    settings = dict(settings) if isinstance(settings, dict) else {}
    groups = [dict(g) for g in settings.get("extra_fields_groups") or [] if isinstance(g, dict)]
    session_group = _declare(groups, SESSION_GROUP, legacy=OLD_GROUP)
    related_group = _declare(groups, RELATED_GROUP) if facts.cdcs_url else None
    settings.setdefault("display_main_text", True)
    settings["extra_fields_groups"] = groups
    result["extra_fields"] = {**kept, **extra_fields(facts, session_group, related_group)}
    result["elabftw"] = settings
    return result


# -- what an experiment holds --------------------------------------------------------------


def metadata_of(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """An experiment's metadata as a dict: the server sends a JSON string and a decoded copy."""
    for value in (experiment.get("metadata_decoded"), experiment.get("metadata")):
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                continue
        if isinstance(value, dict):
            return value
    return {}


def fields_of(experiment: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The experiment's extra fields that are well-formed (a dict each)."""
    fields = metadata_of(experiment).get("extra_fields")
    if not isinstance(fields, dict):
        return {}
    return {k: v for k, v in fields.items() if isinstance(v, dict)}


def value_of(experiment: Mapping[str, Any], *names: str) -> str | None:
    """The text value of the first of ``names`` that the experiment has."""
    fields = fields_of(experiment)
    for name in names:
        value = fields.get(name, {}).get("value")
        if isinstance(value, str) and value:
            return value
    return None


def session_of(experiment: Mapping[str, Any]) -> str | None:
    """The session the experiment says it shows (NexusLIMS's field, or nxdrop's old one)."""
    return value_of(experiment, SESSION_ID, OLD_SESSION)


def sha_of(experiment: Mapping[str, Any]) -> str | None:
    """The SHA-256 of the record the experiment says it shows."""
    return value_of(experiment, SHA_256)


def cdcs_of(experiment: Mapping[str, Any]) -> str | None:
    """The CDCS record the experiment links to (NexusLIMS's field, or nxdrop's old one)."""
    return value_of(experiment, CDCS_RECORD, OLD_CDCS)


def may_be_ours(hit: Mapping[str, Any], session: str, sha: str | None) -> bool:
    """False only when a search hit shows metadata that rules it out (the listing's copy
    spares a GET per stranger; a listing without metadata rules nothing out)."""
    if hit.get("metadata") is None and hit.get("metadata_decoded") is None:
        return True
    return session_of(hit) == session and (sha is None or sha_of(hit) == sha)


def tags_of(experiment: Mapping[str, Any]) -> list[str]:
    """The experiment's tags: eLabFTW sends them joined by ``|``."""
    found = experiment.get("tags")
    if isinstance(found, str):
        return [t for t in found.split("|") if t]
    if isinstance(found, list):
        return [t if isinstance(t, str) else str(t.get("tag", "")) for t in found]
    return []


def missing_tags(experiment: Mapping[str, Any], wanted: Iterable[str]) -> list[str]:
    """The tags of ``wanted`` the experiment lacks (eLabFTW's tags ignore case)."""
    have = {t.casefold() for t in tags_of(experiment)}
    return [t for t in wanted if t.casefold() not in have]


def attached(experiment: Mapping[str, Any], sha: str) -> int | None:
    """The id of an upload of these exact bytes (the server keeps each upload's sha256)."""
    for upload in experiment.get("uploads") or []:
        if isinstance(upload, dict) and upload.get("hash") == sha and "id" in upload:
            return int(upload["id"])
    return None


def shows_link(html: str, url: str) -> bool:
    """Whether the body links to ``url`` (or shows it, as a non-http URL is shown).

    Parsed, not compared with what was sent: eLabFTW's HTML purifier rewrites the body it
    stores (src/services/Filter.php: links get ``target="_blank" rel="noreferrer
    noopener"``), but an href and the text stay what they were.
    """
    parsed = _Html(html)
    return url in parsed.hrefs or url in "".join(parsed.text)


# -- bringing an experiment up to date ---------------------------------------------------


def changes(
    experiment: Mapping[str, Any],
    facts: Facts,
    *,
    merge: bool,
    fix_content_type: bool = False,
) -> dict[str, Any]:
    """The PATCH that makes ``experiment`` show ``facts``; empty if it does already.

    Same bytes (its SHA-256 is ``facts.sha256``): only the CDCS link is added where it is
    missing, the body's part appended (``bodyappend``) and the field merged in
    (``metadatamerge``, with ``merge``) so nothing a person wrote meanwhile is lost.
    Without ``merge`` the metadata is written whole: what was just read, changed.

    New content: title, body and our fields describe the new record (the earlier body stays
    in eLabFTW's revisions); fields people added stay. The server applies a PATCH key by key
    in the order sent (src/models/AbstractEntity.php ``patch``, Action::Update), so the
    metadata, with the SHA-256, goes last: a PATCH cut short leaves the old hash and the
    next attempt does it all again. ``metadata`` values are JSON strings: the real server
    casts every PATCH value to a string (the spec says object).
    """
    patch: dict[str, Any] = {}
    metadata = metadata_of(experiment)
    stored = experiment.get("body")
    current_body = stored if isinstance(stored, str) else ""
    if sha_of(experiment) == facts.sha256:
        if fix_content_type and experiment.get("content_type") == MARKDOWN:
            patch["content_type"] = HTML
        cdcs = facts.cdcs_url
        if cdcs and not shows_link(current_body, cdcs):
            patch["bodyappend"] = related_section(cdcs)
        if cdcs and cdcs_of(experiment) != cdcs:
            patch.update(_link_field(metadata, cdcs, merge=merge))
        return patch
    if experiment.get("title") != title(facts):
        patch["title"] = title(facts)
    if experiment.get("content_type", HTML) != HTML:
        patch["content_type"] = HTML  # the body is HTML
    if current_body != body(facts):
        patch["body"] = body(facts)
    patch.update(_fields_patch(metadata, facts, merge=merge))
    return patch


def _link_field(metadata: Mapping[str, Any], cdcs: str, *, merge: bool) -> dict[str, str]:
    existing = metadata.get("extra_fields")
    existing = existing if isinstance(existing, dict) else {}
    if merge:
        # metadatamerge keeps an existing field's schema and sets its value; a new field is
        # added whole. It merges extra_fields only (src/Elabftw/MetadataHelpers.php
        # mergeMetadata): a group cannot be declared through it, so the link joins the
        # "Related Records" group if the experiment has one, else the session's group.
        group = (
            _group_id(metadata, RELATED_GROUP)
            or _group_id(metadata, SESSION_GROUP)
            or _group_id(metadata, OLD_GROUP)
        )
        field = {"value": cdcs} if CDCS_RECORD in existing else cdcs_field(cdcs, group)
        return {"metadatamerge": _json({"extra_fields": {CDCS_RECORD: field}})}
    whole = copy.deepcopy(dict(metadata))
    settings = whole.get("elabftw")
    settings = dict(settings) if isinstance(settings, dict) else {}
    groups = [dict(g) for g in settings.get("extra_fields_groups") or [] if isinstance(g, dict)]
    related = _declare(groups, RELATED_GROUP)
    settings["extra_fields_groups"] = groups
    fields = dict(existing)
    fields[CDCS_RECORD] = cdcs_field(cdcs, related)
    whole["extra_fields"] = fields
    whole["elabftw"] = settings
    return {"metadata": _json(whole)}


def _fields_patch(metadata: Mapping[str, Any], facts: Facts, *, merge: bool) -> dict[str, str]:
    existing = metadata.get("extra_fields")
    existing = existing if isinstance(existing, dict) else {}
    session_group = _group_id(metadata, SESSION_GROUP)
    related_group = _group_id(metadata, RELATED_GROUP)
    wanted = extra_fields(facts, session_group, related_group)
    stale = [k for k in existing if (k in OUR_FIELDS or k in OLD_FIELDS) and k not in wanted]
    groups_there = session_group is not None and (related_group is not None or not facts.cdcs_url)
    if merge and not stale and groups_there:
        # Only what differs, an existing field by its value alone (its schema is kept).
        delta = {}
        for name, field in wanted.items():
            old = existing.get(name)
            if not isinstance(old, dict):
                delta[name] = field
            elif old.get("value") != field["value"]:
                delta[name] = {"value": field["value"]}
        return {"metadatamerge": _json({"extra_fields": delta})} if delta else {}
    # A field to remove, or a group to declare: only a whole write can.
    whole = rewritten_metadata(metadata, facts)
    return {"metadata": _json(whole)} if whole != metadata else {}


# -- helpers -----------------------------------------------------------------------------


def is_http(url: str) -> bool:
    """Whether ``url`` may become a link: http(s) with a host, never ``javascript:``."""
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _field(
    kind: str, value: str, description: str, position: int, group: int | None
) -> dict[str, Any]:
    made: dict[str, Any] = {
        "type": kind,
        "value": value,
        "description": description,
        "position": position,
    }
    if group is not None:
        made["group_id"] = group
    return made


def _minute(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M")


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _group_id(metadata: Mapping[str, Any], name: str) -> int | None:
    settings = metadata.get("elabftw")
    groups = settings.get("extra_fields_groups") if isinstance(settings, dict) else None
    for group in groups if isinstance(groups, list) else []:
        if (
            isinstance(group, dict)
            and group.get("name") == name
            and isinstance(group.get("id"), int)
        ):
            return int(group["id"])
    return None


def _declare(groups: list[dict[str, Any]], name: str, *, legacy: str | None = None) -> int:
    """The id of the group ``name`` in ``groups``, declared (or ``legacy`` renamed) if need be."""
    for group in groups:
        if group.get("name") == name and isinstance(group.get("id"), int):
            return int(group["id"])
    for group in groups:
        if legacy is not None and group.get("name") == legacy and isinstance(group.get("id"), int):
            group["name"] = name
            return int(group["id"])
    taken = {g.get("id") for g in groups}
    new_id = _NEW_GROUP_IDS.get(name, 1)
    while new_id in taken:
        new_id += 1
    groups.append({"id": new_id, "name": name})
    return new_id


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
