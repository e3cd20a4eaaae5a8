"""Reading a record: the file's bytes, read once and parsed once, safely, into what
destinations need (its summary, its acquisition activities).

lxml comes with this module: the pipeline imports it at the first record, so that a start
with nothing to read (``run --once`` on an empty folder, ``status``) does not load it.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lxml import etree

from nxdrop.activities import AcquisitionActivity, ActivityCollector, annotated
from nxdrop.exceptions import ConfigError, RecordError
from nxdrop.records import Record, Signature, session_identifier_of

TREE_MAX = 4 * 1024 * 1024  # bytes: larger records are streamed, smaller parsed into a tree


# No entity expansion, no DTD, no network, no huge trees: a record is data, never
# instructions. Every parse of a record or a schema uses these.
_SAFE: dict[str, bool] = {
    "resolve_entities": False,
    "load_dtd": False,
    "no_network": True,
    "huge_tree": False,
}


def _safe_parser() -> etree.XMLParser:
    return etree.XMLParser(dtd_validation=False, remove_comments=False, **_SAFE)


def _cdcs_parser() -> etree.XMLParser:
    """The tree parser of CDCS (core-main-app's ``check_xml_file_is_valid``: lxml with
    ``remove_blank_text``, comments and processing instructions kept), safe as every parse
    here: a record parsed with it is the tree CDCS validates (:attr:`Record.valid_against`)."""
    return etree.XMLParser(remove_blank_text=True, **_SAFE)


def _record_parser() -> etree.XMLParser:
    """The tree parser of records: as the stream (:func:`_stream`), it keeps no comments and
    no processing instructions, so that a value split by one (``2<!-- -->.5``) reads the
    same both ways: whole, as XML means it."""
    return etree.XMLParser(dtd_validation=False, remove_comments=True, remove_pis=True, **_SAFE)


class RecordReader:
    """Reads and checks records; built once from the settings (the XSD is read once).

    The file is read once and parsed once: into a tree up to ``tree_max`` bytes, streamed
    above, each element dropped once it is done. Reading a large record costs the file's
    bytes (which the destinations send), however many elements it has; its activities, in
    their packed form (about a third of their XML), are parsed from those bytes again only
    when a destination asks for them. By default the schema is the NexusLIMS one shipped in
    the package (the settings' ``schema_path``).
    """

    def __init__(
        self, max_bytes: int, schema_path: Path | None = None, *, tree_max: int = TREE_MAX
    ) -> None:
        self.max_bytes = max_bytes
        self.tree_max = tree_max
        self.schema_path = schema_path
        self._xsd: bytes | None = None
        # A compiled schema per thread: libxml2 keeps validation state in it, and a
        # lock around every parse would let one large record hold up every worker.
        self._local = threading.local()
        if schema_path is not None:
            try:
                self._xsd = schema_path.read_bytes()
                self._local.schema = self._compile()
            except (OSError, etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
                raise ConfigError(f"NX_SCHEMA_PATH={schema_path}: not a usable XSD: {exc}") from exc

    def read(self, path: Path, name: str | None = None) -> Record:
        """Read ``path`` and return the record, or raise :class:`RecordError` saying why.

        ``name`` is the file's name in the drop folder (default: ``path``'s own); the
        session identifier comes from it.
        """
        name = name or path.name
        content, signature = self._read_bytes(path)
        found = self._parse(content)
        return Record(
            path=path,
            name=name,
            signature=signature,
            content=content,
            sha256=hashlib.sha256(content).hexdigest(),
            session_identifier=session_identifier_of(name),
            title=found.title,
            instrument_pid=found.instrument_pid,
            user=found.summary.get("experimenter"),
            dt_from=_date(found, "reservationStart"),
            dt_to=_date(found, "reservationEnd"),
            metadata=found.metadata(),
            load_activities=_Once(lambda: self._activities(content)),
            valid_against=found.valid_against,
        )

    def _activities(self, content: bytes) -> tuple[AcquisitionActivity, ...]:
        """The activities of ``content``, a record :meth:`read` has accepted: parsed again,
        the same way (a tree or a stream), collecting only them."""
        found = _Found(ActivityCollector(annotated=annotated(content)))
        if len(content) <= self.tree_max:
            for child in etree.fromstring(content, self._tree_parser()):
                if _local(child) == "acquisitionActivity":
                    found.activities.whole(child)
        else:
            _collect(_stream(content, None), found)
        return tuple(found.activities.activities)

    @property
    def _schema_name(self) -> str:
        return self.schema_path.name if self.schema_path is not None else "schema"

    def _schema(self) -> etree.XMLSchema | None:
        if self._xsd is None:
            return None
        schema: etree.XMLSchema | None = getattr(self._local, "schema", None)
        if schema is None:
            schema = self._local.schema = self._compile()
        return schema

    def _compile(self) -> etree.XMLSchema:
        assert self._xsd is not None
        # base_url: an xs:include or xs:import next to the XSD is found where it lies.
        doc = etree.fromstring(self._xsd, _safe_parser(), base_url=str(self.schema_path))
        return etree.XMLSchema(doc)

    def _read_bytes(self, path: Path) -> tuple[bytes, Signature]:
        # O_NOFOLLOW: a symbolic link is never a record, and what it points to is never read.
        # O_NONBLOCK: a FIFO named like a record must not hang a worker.
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if path.is_symlink():
                raise RecordError("a symbolic link; links are never followed") from None
            raise RecordError(f"cannot open: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise RecordError("not a regular file")
            if info.st_size > self.max_bytes:
                raise RecordError(
                    f"{info.st_size} bytes, larger than NX_MAX_RECORD_BYTES={self.max_bytes}"
                )
            # Asked for the size it has (one byte more shows that it grew): a read asked for
            # NX_MAX_RECORD_BYTES would allocate that much first.
            content = fh.read(info.st_size + 1)
            if len(content) > info.st_size:
                content += fh.read(self.max_bytes + 1 - len(content))
        signature = (info.st_size, info.st_mtime_ns, info.st_ino)
        if len(content) > self.max_bytes:
            raise RecordError(f"grew past NX_MAX_RECORD_BYTES={self.max_bytes}")
        if not content or content.isspace():  # not strip(): that would copy the record
            raise RecordError("the file is empty")
        return content, signature

    def _parse(self, content: bytes) -> _Found:
        """Check ``content`` and collect what destinations need: well-formed, no DOCTYPE, an
        ``<Experiment>``, then the schema. A record of up to :data:`TREE_MAX` bytes (every
        NexusLIMS record there is) is parsed into a tree once, the fastest way; a larger one
        is streamed, so that its memory stays about its own size."""
        if len(content) <= self.tree_max:
            return self._parse_tree(content)
        return self._parse_stream(content)

    def _tree_parser(self, kind: Callable[[], etree.XMLParser] = _record_parser) -> etree.XMLParser:
        """This thread's parser made by ``kind`` (lxml parsers are not to be shared between
        threads)."""
        parsers: dict[object, etree.XMLParser] = self._local.__dict__.setdefault("parsers", {})
        parser = parsers.get(kind)
        if parser is None:
            parser = parsers[kind] = kind()
        return parser

    def _parse_tree(self, content: bytes) -> _Found:
        """Parse as CDCS parses, so that the schema's verdict is CDCS's too (CDCS need not
        be asked again); a record with a comment or processing instruction inside its root
        is parsed again without them, as the stream reads it (see :func:`_record_parser`)."""
        as_cdcs = True
        try:
            root = etree.fromstring(content, self._tree_parser(_cdcs_parser))
            if next(root.iter(etree.Comment, etree.ProcessingInstruction), None) is not None:
                as_cdcs = False
                root = etree.fromstring(content, self._tree_parser())
        except etree.XMLSyntaxError as exc:
            raise RecordError(_syntax_problem(content) or f"not well-formed XML: {exc}") from None
        _check_root(root)
        found = _Found(_LATER, complete=True)
        summary = None
        for child in root:
            local = _local(child)
            if local == "summary":
                if summary is None:
                    summary = child
                    found.summary_ref = child.get("ref")
            elif local in _HEAD_FIELDS and local not in found.head:
                found.head[local] = _text(child)
        for item in summary if summary is not None else ():
            local = _local(item)
            if local in _SUMMARY_FIELDS and local not in found.summary:
                found.summary[local] = _text(item)
                if local == "instrument":
                    found.instrument_pid = item.get("pid")
        schema = self._schema()
        if schema is not None and not schema.validate(root):
            errors = [e for e in schema.error_log if e.domain_name.startswith("SCHEMA")]
            message = errors[0].message if errors else "invalid"
            raise RecordError(f"fails the schema ({self._schema_name}): {message}")
        if schema is not None and as_cdcs:
            found.valid_against = self._xsd
        return found

    def _parse_stream(self, content: bytes) -> _Found:
        """Two streaming passes, neither of which keeps a tree (each element is dropped once it
        is done), so memory stays flat: the first collects what destinations need, the second
        validates. Not one pass validating
        while it parses: lxml's validating parser takes a file cut short (a half-written
        record), junk after the root, or a broken namespace declaration for a valid record,
        so the pass without a schema judges the syntax, and the schema judges only what is
        well-formed.
        """
        found = _Found(_LATER)
        stream = _stream(content, None)
        try:
            _collect(stream, found)
        except etree.XMLSyntaxError as exc:
            raise RecordError(_syntax_problem(content) or f"not well-formed XML: {exc}") from None
        if not found.complete:  # the parser raises first; never publish it if it did not
            raise RecordError("not well-formed XML: the file ends inside its root element")
        schema = self._schema()
        if schema is not None:
            check = _stream(content, schema, ("end",))
            try:
                _drain(check)
            except etree.XMLSyntaxError as exc:
                # The first error is the cause; later ones often follow from it.
                errors = [e for e in check.error_log if e.domain_name.startswith("SCHEMA")]
                message = errors[0].message if errors else exc.msg
                raise RecordError(f"fails the schema ({self._schema_name}): {message}") from None
        return found


def _stream(
    content: bytes, schema: etree.XMLSchema | None, events: tuple[str, ...] = ("start", "end")
) -> etree.iterparse:
    """Parse events of ``content``: no entities, no DTD, no network; comments and processing
    instructions are not kept (nothing reads them; the record's bytes go out unchanged)."""
    return etree.iterparse(
        io.BytesIO(content),
        events=events,
        remove_comments=True,
        remove_pis=True,
        schema=schema,
        **_SAFE,
    )


class _Later(ActivityCollector):
    """Collects nothing: the activities are read when first asked for (:class:`_Once`)."""

    def whole(self, element: etree._Element) -> None:
        pass

    def child(self, element: etree._Element) -> None:
        pass

    def end(self, element: etree._Element) -> None:
        pass


_LATER = _Later()


class _Once:
    """Calls ``load`` the first time it is called, from whichever thread, and then returns
    what it returned: a record's activities are read once, and every destination gets the
    same ones."""

    def __init__(self, load: Callable[[], tuple[AcquisitionActivity, ...]]) -> None:
        self._load: Callable[[], tuple[AcquisitionActivity, ...]] | None = load
        self._lock = threading.Lock()
        self._value: tuple[AcquisitionActivity, ...] = ()

    def __call__(self) -> tuple[AcquisitionActivity, ...]:
        with self._lock:
            if self._load is not None:
                self._value, self._load = self._load(), None
            return self._value


@dataclass
class _Found:
    """What a record's parse collects: the root's first ``title`` and ``id``, the texts of
    the first ``summary``'s children (its ``instrument``'s ``pid``, its own ``ref``), and the
    acquisition activities."""

    activities: ActivityCollector
    head: dict[str, str | None] = field(default_factory=dict)
    instrument_pid: str | None = None
    summary: dict[str, str | None] = field(default_factory=dict)
    summary_ref: str | None = None
    complete: bool = False  # the root element was closed
    valid_against: bytes | None = None  # the XSD it passed, parsed as CDCS parses (Record's)

    @property
    def title(self) -> str | None:
        return self.head.get("title")

    def metadata(self) -> dict[str, str]:
        """The record's :data:`~nxdrop.records.METADATA_KEYS` that it has."""
        values = {
            "title": self.title,
            "id": self.head.get("id"),
            "instrument_name": self.summary.get("instrument"),
            "motivation": self.summary.get("motivation"),
            "reservation_url": self.summary_ref,
        }
        return {key: value for key, value in values.items() if value}


# The children of the root, and of ``summary``, that a record's context needs.
_HEAD_FIELDS = frozenset({"title", "id"})
_SUMMARY_FIELDS = frozenset(
    {"experimenter", "instrument", "reservationStart", "reservationEnd", "motivation"}
)


def _collect(events: etree.iterparse, found: _Found) -> None:
    """Walk the parse ``events``, filling ``found`` and dropping each finished element.

    An ``<acquisitionActivity>``'s direct children (``setup``, each ``dataset``) are handed
    to the collector whole and dropped then, so their own elements wait for them: what is
    held at once is one dataset, never the activity or the record.
    """
    depth = 0
    in_summary = in_activity = False  # inside the root's first <summary>, an activity
    summary_seen = False
    activities = found.activities
    for event, element in events:
        if event == "start":
            depth += 1
            if depth == 1:
                _check_root(element)
            elif depth == 2:
                local = _local(element)
                if local == "acquisitionActivity":
                    in_activity = True
                elif local == "summary" and not summary_seen:
                    in_summary = summary_seen = True
                    found.summary_ref = element.get("ref")
            continue
        if depth == 2:
            local = _local(element)
            if in_activity:  # it is the activity that ends
                activities.end(element)
                in_activity = False
            elif local == "summary":
                in_summary = False
            elif local in _HEAD_FIELDS and local not in found.head:
                found.head[local] = _text(element)
        elif depth == 3:
            if in_activity:
                activities.child(element)
            elif in_summary:
                local = _local(element)
                if local in _SUMMARY_FIELDS and local not in found.summary:
                    found.summary[local] = _text(element)
                    if local == "instrument":
                        found.instrument_pid = element.get("pid")
        elif in_activity:
            depth -= 1
            continue  # part of a dataset or setup: dropped with it
        depth -= 1
        if depth:
            _drop(element)
        else:
            found.complete = True


def _drain(events: etree.iterparse) -> None:
    """Run the parse ``events`` to the end, dropping each finished element."""
    for _, element in events:
        if element.getparent() is not None:
            _drop(element)


def _drop(element: etree._Element) -> None:
    """Free a finished element and the finished siblings before it (not the root: the parse
    still adds to it)."""
    element.clear(keep_tail=False)
    parent = element.getparent()
    while parent is not None and element.getprevious() is not None:
        del parent[0]


def _check_root(root: etree._Element) -> None:
    docinfo = root.getroottree().docinfo
    if docinfo.doctype or docinfo.internalDTD is not None:
        raise RecordError(_DOCTYPE)
    if _local(root) != "Experiment":
        raise RecordError(f"root element is <{_local(root)}>, not a NexusLIMS <Experiment>")


_DOCTYPE = "carries a DOCTYPE; NexusLIMS records have none and it is refused"


def _local(element: etree._Element) -> str:
    tag = element.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""


class _DoctypeSeen:
    """A parser target that builds nothing and notes whether a DOCTYPE came by.

    It has no ``start``, ``end`` or ``data``: libxml2 parses without calling into Python.
    """

    def __init__(self) -> None:
        self.seen = False

    def doctype(self, *_: object) -> None:
        self.seen = True

    def close(self) -> None:
        return None


def _syntax_problem(content: bytes) -> str | None:
    """Why ``content`` is refused, in libxml2's most precise words, or ``None`` if this pass
    finds nothing (it does not check namespaces).

    The stream's parser (libxml2's push parser) words some errors vaguely (``Start tag
    expected`` at line 1 for an undefined entity), so a refused file is parsed once more,
    in C alone, building nothing, for the message.
    """
    target = _DoctypeSeen()
    parser = etree.XMLParser(
        target=target,
        resolve_entities=False,
        load_dtd=False,
        no_network=True,
        huge_tree=False,
    )
    try:
        etree.fromstring(content, parser)
    except etree.XMLSyntaxError as exc:
        return _DOCTYPE if target.seen else f"not well-formed XML: {exc}"
    return _DOCTYPE if target.seen else None


def _text(element: etree._Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return element.text.strip() or None


def _date(found: _Found, localname: str) -> datetime | None:
    value = found.summary.get(localname)
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(f"summary/{localname} {value!r} is not a date") from None
