"""Reading a record: the file's bytes, parsed once, safely, into what destinations need."""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from lxml import etree

from nxdrop.exceptions import ConfigError, RecordError
from nxdrop.fsops import base_stem

Signature = tuple[int, int, int]  # size, mtime in ns, inode: "the same file, unchanged"


def _safe_parser() -> etree.XMLParser:
    # No entity expansion, no DTD, no network: a record is data, never instructions.
    return etree.XMLParser(
        resolve_entities=False,
        load_dtd=False,
        dtd_validation=False,
        no_network=True,
        huge_tree=False,
        remove_comments=False,
    )


@dataclass(frozen=True)
class Record:
    """One experiment record, read from the drop folder.

    ``content`` is the file's exact bytes (CRLF and all): destinations send these. ``path``
    is where the bytes were read (the working folder), ``name`` the file's name in the drop
    folder, and ``signature`` the file's size, mtime and inode when it was read.
    """

    path: Path
    name: str
    signature: Signature
    content: bytes
    sha256: str
    session_identifier: str
    title: str | None
    instrument_pid: str | None
    user: str | None
    dt_from: datetime | None
    dt_to: datetime | None

    def changed(self) -> bool:
        """Whether the file at :attr:`path` is no longer what was read (rewritten in place)."""
        return signature_of(self.path) != self.signature

    @property
    def text(self) -> str:
        """The record as text, for APIs that take XML in a JSON string."""
        return self.content.decode("utf-8")


def session_identifier_of(name: str) -> str:
    """NexusLIMS names records ``<date>_<instrument>_<id>.xml``; the name is the session.

    A ``.<n>`` before ``.xml`` is the copy number that a name clash in ``uploaded/`` or
    ``failed/`` added, so a retried ``failed/x.1.xml`` is still session ``x``.
    """
    return base_stem(name)


def signature_of(path: Path) -> Signature | None:
    """Size, mtime and inode of ``path`` (a link itself, never followed); ``None`` if gone."""
    try:
        st = path.lstat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


class RecordReader:
    """Reads and checks records; built once from the settings (the XSD is parsed once)."""

    def __init__(self, max_bytes: int, schema_path: Path | None = None) -> None:
        self.max_bytes = max_bytes
        self._schema: etree.XMLSchema | None = None
        # libxml2 schema validation keeps per-object error state: one thread at a time.
        self._schema_lock = threading.Lock()
        if schema_path is not None:
            try:
                schema_doc = etree.parse(str(schema_path), _safe_parser())
                self._schema = etree.XMLSchema(schema_doc)
            except (OSError, etree.XMLSyntaxError, etree.XMLSchemaParseError) as exc:
                raise ConfigError(f"NX_SCHEMA_PATH={schema_path}: not a usable XSD: {exc}") from exc

    def read(self, path: Path, name: str | None = None) -> Record:
        """Read ``path`` and return the record, or raise :class:`RecordError` saying why.

        ``name`` is the file's name in the drop folder (default: ``path``'s own); the
        session identifier comes from it.
        """
        name = name or path.name
        content, signature = self._read_bytes(path)
        root = self._parse(path, content)
        if self._schema is not None:
            with self._schema_lock:
                valid = self._schema.validate(root.getroottree())
                log = self._schema.error_log
            if not valid:
                first = log[0] if len(log) else None
                where = f" (line {first.line})" if first else ""
                message = first.message if first else "invalid"
                raise RecordError(f"fails the schema{where}: {message}")
        summary = _child(root, "summary")
        instrument = _child(summary, "instrument") if summary is not None else None
        return Record(
            path=path,
            name=name,
            signature=signature,
            content=content,
            sha256=hashlib.sha256(content).hexdigest(),
            session_identifier=session_identifier_of(name),
            title=_text(_child(root, "title")),
            instrument_pid=instrument.get("pid") if instrument is not None else None,
            user=_text(_child(summary, "experimenter")),
            dt_from=_date(path, summary, "reservationStart"),
            dt_to=_date(path, summary, "reservationEnd"),
        )

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
            content = fh.read(self.max_bytes + 1)
        signature = (info.st_size, info.st_mtime_ns, info.st_ino)
        if len(content) > self.max_bytes:
            raise RecordError(f"grew past NX_MAX_RECORD_BYTES={self.max_bytes}")
        if not content.strip():
            raise RecordError("the file is empty")
        return content, signature

    def _parse(self, path: Path, content: bytes) -> etree._Element:
        try:
            root = etree.fromstring(content, _safe_parser())
        except etree.XMLSyntaxError as exc:
            raise RecordError(f"not well-formed XML: {exc}") from exc
        docinfo = root.getroottree().docinfo
        if docinfo.doctype or docinfo.internalDTD is not None:
            raise RecordError("carries a DOCTYPE; NexusLIMS records have none and it is refused")
        if etree.QName(root).localname != "Experiment":
            raise RecordError(
                f"root element is <{etree.QName(root).localname}>, not a NexusLIMS <Experiment>"
            )
        return root


def _child(parent: etree._Element | None, localname: str) -> etree._Element | None:
    if parent is None:
        return None
    for child in parent:
        if isinstance(child.tag, str) and etree.QName(child).localname == localname:
            return child
    return None


def _text(element: etree._Element | None) -> str | None:
    if element is None or element.text is None:
        return None
    return element.text.strip() or None


def _date(path: Path, summary: etree._Element | None, localname: str) -> datetime | None:
    value = _text(_child(summary, localname))
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        raise RecordError(f"summary/{localname} {value!r} is not a date") from None
