"""A CDCS template's XSD, fetched once, and the check CDCS makes with it, made here first.

CDCS answers HTTP 500 both for a record that fails its template and for a fault of its own
(a database outage), so the answer alone cannot say whether a retry can help. The record
is therefore checked here, the way CDCS checks it (core-main-app 2.23,
``components/data/api.py`` ``check_xml_file_is_valid``: lxml, both documents parsed with
``remove_blank_text``, ``XMLSchema(xsd).assertValid(xml)``), before it is sent: a record
that fails is never sent, and a 500 for one that passes is CDCS's own fault.

``xs:include``, ``xs:import`` and ``xs:redefine`` of another CDCS template are followed.
CDCS stores them rewritten to ``<SERVER_URI>/rest/template/<id>/download/`` and lists
``<id>`` in the template's ``dependencies``; such a template is fetched from
``NX_CDCS_URL`` (``SERVER_URI`` may be a name only the server knows) and handed to lxml
by a resolver. Nothing else is ever fetched or read: no network, no local file, no DTD, no
entity. A template that names anything else, or whose XSD does not compile here, cannot
be checked here; :meth:`TemplateSchemas.check` then says why instead of judging.
"""

from __future__ import annotations

import io
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lxml import etree

from nxdrop.reader import TREE_MAX

# Parsed as CDCS parses (``remove_blank_text``), and as nxdrop parses everything: no entity
# expansion, no DTD, no network, no huge trees.
_SAFE: dict[str, bool] = {
    "resolve_entities": False,
    "load_dtd": False,
    "no_network": True,
    "huge_tree": False,
    "remove_blank_text": True,
}
_XS = "{http://www.w3.org/2001/XMLSchema}"
_REFERENCES = (f"{_XS}include", f"{_XS}import", f"{_XS}redefine")
# CDCS's ``core_main_app_rest_template_download`` URL, as its ``update_dependencies`` writes it.
_DOWNLOAD = re.compile(r"/rest/template/(\w+)/download/?$")
# More templates than this behind one template is not a schema but a loop or an attack.
MAX_PARTS = 64

#: Fetches a template by id: ``GET rest/template/<id>/``, decoded.
Fetch = Callable[[str], Mapping[str, Any]]


class TemplateViolation(Exception):
    """The record fails the template's XSD: CDCS would refuse it. The message is the
    schema's own words, as CDCS would give them (``Element 'x': …, line 12``)."""


@dataclass(frozen=True)
class TemplateSchema:
    """What one template needs to be checked here: its XSD and every template it includes
    (by the ``schemaLocation`` that names it), or why it cannot be checked here."""

    template_id: str
    main: bytes = b""
    parts: Mapping[str, bytes] = field(default_factory=dict)
    problem: str | None = None  # why records cannot be checked here; None when they can


class TemplateSchemas:
    """The XSD of each template, fetched once (templates never change: a new version of a
    template is a new template id) and compiled once per thread (libxml2 keeps validation
    state in a compiled schema)."""

    def __init__(self, fetch: Fetch) -> None:
        self._fetch = fetch
        self._lock = threading.Lock()
        self._loaded: dict[str, TemplateSchema] = {}
        self._local = threading.local()

    def get(self, template_id: str) -> TemplateSchema:
        """The template's schema, fetched on first use; a fetch that fails is not kept, so
        the next call tries again. Fetch errors propagate as they are."""
        with self._lock:  # one fetch, however many workers want it at once
            found = self._loaded.get(template_id)
            if found is None:
                found = self._loaded[template_id] = _load(template_id, self._fetch)
            return found

    def check(
        self, template_id: str, content: bytes, valid_against: bytes | None = None
    ) -> str | None:
        """Check the record ``content`` against the template as CDCS would.

        Returns ``None`` when it passes, or why it could not be checked here; raises
        :class:`TemplateViolation` when it fails. ``valid_against`` is an XSD the record is
        known to pass, parsed as CDCS parses it (:attr:`nxdrop.records.Record.valid_against`):
        when the template is that very XSD, whole in itself, the verdict is known and the
        record is not validated again.
        """
        loaded = self.get(template_id)
        if loaded.problem is not None:
            return loaded.problem
        if valid_against is not None and not loaded.parts and loaded.main == valid_against:
            return None
        _validate(self._compiled(loaded), content, self._parser())
        return None

    def _compiled(self, loaded: TemplateSchema) -> etree.XMLSchema:
        schemas: dict[str, etree.XMLSchema] = self._local.__dict__.setdefault("schemas", {})
        schema = schemas.get(loaded.template_id)
        if schema is None:
            schema = schemas[loaded.template_id] = _compile(loaded.main, loaded.parts)
        return schema

    def _parser(self) -> etree.XMLParser:
        parser: etree.XMLParser | None = self._local.__dict__.get("parser")
        if parser is None:  # lxml parsers are not to be shared between threads
            parser = self._local.parser = etree.XMLParser(**_SAFE)
        return parser


def _load(template_id: str, fetch: Fetch) -> TemplateSchema:
    """Fetch the template and every template it includes or imports; compile it once to
    find out whether it can be used here."""
    template = fetch(template_id)
    main, deps, problem = _xsd_of(template_id, template)
    if problem is not None:
        return TemplateSchema(template_id, problem=problem)
    parts: dict[str, bytes] = {}
    pending = [(template_id, main, deps)]
    while pending:
        owner, xsd, owner_deps = pending.pop()
        try:
            locations = _locations(xsd)
        except etree.XMLSyntaxError as exc:
            return TemplateSchema(
                template_id, problem=f"the XSD of template {owner} is not well-formed: {exc}"
            )
        for location in locations:
            if location in parts:
                continue
            included = _template_named(location, owner_deps)
            if included is None:
                return TemplateSchema(
                    template_id,
                    problem=(
                        f"template {owner} includes or imports {location!r}, which is not a "
                        "template of this CDCS (one of its dependencies); nxdrop fetches "
                        "nothing else"
                    ),
                )
            if len(parts) >= MAX_PARTS:
                return TemplateSchema(
                    template_id, problem=f"it includes more than {MAX_PARTS} templates"
                )
            xsd_part, part_deps, part_problem = _xsd_of(included, fetch(included))
            if part_problem is not None:
                return TemplateSchema(template_id, problem=part_problem)
            parts[location] = xsd_part
            pending.append((included, xsd_part, part_deps))
    try:
        _compile(main, parts)
    except (etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
        return TemplateSchema(template_id, problem=f"its XSD does not compile here: {exc}")
    return TemplateSchema(template_id, main, parts)


def _xsd_of(template_id: str, template: Mapping[str, Any]) -> tuple[bytes, set[str], str | None]:
    """The XSD of a fetched template and the ids it depends on, or why it has none."""
    kind = template.get("format") or "XSD"  # older CDCS versions have only XSD templates
    content = template.get("content")
    if kind != "XSD" or not isinstance(content, str):
        return b"", set(), f"template {template_id} is not an XSD (format {kind!r})"
    deps = {
        str(d.get("id") if isinstance(d, Mapping) else d)
        for d in template.get("dependencies") or ()
    }
    return content.encode("utf-8"), deps, None


def _locations(xsd: bytes) -> list[str]:
    """The ``schemaLocation`` of every include, import and redefine of an XSD."""
    root = etree.fromstring(xsd, etree.XMLParser(**_SAFE))
    found: list[str] = []
    for element in root.iter(*_REFERENCES):
        location = element.get("schemaLocation")
        if location and location not in found:
            found.append(location)
    return found


def _template_named(location: str, deps: set[str]) -> str | None:
    """The template id that a ``schemaLocation`` names, if it is one of ``deps``: CDCS
    rewrote it to its download URL and listed the template as a dependency."""
    match = _DOWNLOAD.search(urlsplit(location).path)
    if match is None or match.group(1) not in deps:
        return None
    return match.group(1)


class _Parts(etree.Resolver):  # type: ignore[misc]  # lxml has no type stubs here
    """Hands lxml the included templates by their ``schemaLocation``; anything else is an
    empty document, so lxml neither reads a local file nor goes to the network for it."""

    def __init__(self, parts: Mapping[str, bytes]) -> None:
        super().__init__()
        self.parts = parts

    def resolve(self, url: str | None, pubid: str | None, context: object) -> Any:
        return self.resolve_string(self.parts.get(url or "", b""), context)


def _compile(main: bytes, parts: Mapping[str, bytes]) -> etree.XMLSchema:
    parser = etree.XMLParser(**_SAFE)
    parser.resolvers.add(_Parts(parts))  # lxml resolves a schema's includes with these
    return etree.XMLSchema(etree.fromstring(main, parser))


def _validate(schema: etree.XMLSchema, content: bytes, parser: etree.XMLParser) -> None:
    """Raise :class:`TemplateViolation` unless ``content`` is well-formed and valid.

    A record of up to :data:`~nxdrop.reader.TREE_MAX` bytes is parsed into a tree (as CDCS
    does); a larger one is streamed twice, each element dropped once it is done, so memory
    stays about the record's own size: once for the syntax (lxml's validating stream
    parser takes some broken files for valid ones), once against the schema.
    """
    if len(content) <= TREE_MAX:
        try:
            root = etree.fromstring(content, parser)
        except etree.XMLSyntaxError as exc:
            raise TemplateViolation(f"not well-formed XML: {exc}") from None
        try:
            schema.assertValid(root)
        except etree.DocumentInvalid as exc:
            raise TemplateViolation(str(exc)) from None
        return
    try:
        _drain(_stream(content, None))
    except etree.XMLSyntaxError as exc:
        raise TemplateViolation(f"not well-formed XML: {exc}") from None
    events = _stream(content, schema)
    try:
        _drain(events)
    except etree.XMLSyntaxError as exc:
        # The first error is the cause; later ones often follow from it.
        errors = [e for e in events.error_log if e.domain_name.startswith("SCHEMA")]
        first = errors[0] if errors else None
        words = f"{first.message}, line {first.line}" if first is not None else exc.msg
        raise TemplateViolation(words) from None


def _stream(content: bytes, schema: etree.XMLSchema | None) -> etree.iterparse:
    return etree.iterparse(
        io.BytesIO(content),
        events=("end",),
        remove_comments=True,
        remove_pis=True,
        schema=schema,
        **_SAFE,
    )


def _drain(events: etree.iterparse) -> None:
    """Run the parse to its end, freeing each finished element and the finished siblings
    before it (never the root: the parse still adds to it)."""
    for _, element in events:
        parent = element.getparent()
        if parent is None:
            continue
        element.clear(keep_tail=False)
        while element.getprevious() is not None:
            del parent[0]
