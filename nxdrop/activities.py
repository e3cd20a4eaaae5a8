"""A record's acquisition activities, as NexusLIMS's ``AcquisitionActivity`` shows them.

NexusLIMS hands its destinations the activities it built the record from
(``context.activities``). nxdrop has only the record, so it reads them back from the
record's ``<acquisitionActivity>`` elements, in the reader's one parse of the file, and
gives them the attribute names a NexusLIMS destination reads: ``start``, ``end``, ``mode``,
``files``, ``previews``, ``setup_params``, ``unique_meta``, ``meta``, ``unique_params`` and
``warnings``. Beside them, ``datasets`` keeps each ``<dataset>`` as the record has it (its
name, location, type, role, …), with ``seqno`` and ``sample_id``.

Memory: a record of 49 MiB may hold tens of thousands of datasets, and its activities live
as long as its export. Each dataset is therefore kept packed — its values in one string,
their names in a tuple shared by every dataset of the same shape — and the NexusLIMS
attributes (plain lists and dicts) are built the first time a destination reads them. The
packed form costs about a third of the XML it came from; dicts of strings would cost more
than the XML itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from typing import TYPE_CHECKING
from urllib.parse import unquote

if TYPE_CHECKING:  # elements come from nxdrop.reader, which loads lxml at the first record
    from lxml import etree

# The separator of a packed dataset's values: NUL cannot occur in an XML 1.0 document (not
# even as a character reference), so no value can contain it.
_SEP = "\x00"

# The kind of each packed value, its key's first character. A metadatum's key is its kind
# followed by its name, so a dataset's keys say both what and which.
_NAME, _LOCATION, _FORMAT, _DESCRIPTION, _PREVIEW, _TYPE, _ROLE = "nlfdptr"
_META = "m"  # a <meta> (of a dataset) or <param> (of a setup)
_FLAGGED = "w"  # the same, marked warning="true": its value may be unreliable
_FIELDS = {
    "name": _NAME,
    "location": _LOCATION,
    "format": _FORMAT,
    "description": _DESCRIPTION,
    "preview": _PREVIEW,
}

# The metadata NexusLIMS's extractors name the microscope's mode with, best first.
MODE_PARAMETERS = ("Imaging Mode", "Operation Mode")
# The metadatum NexusLIMS's extractors give each file's acquisition time in.
CREATION_TIME = "Creation Time"


class Metadata:
    """Named values — a ``<setup>``'s ``<param>`` elements, a ``<dataset>``'s ``<meta>`` —
    packed: the values in one string, their keys in a tuple that many share (see above)."""

    __slots__ = ("_keys", "_text")

    def __init__(self, keys: tuple[str, ...], text: str) -> None:
        self._keys = keys
        self._text = text

    def _pairs(self) -> Iterator[tuple[str, str]]:
        return zip(self._keys, self._text.split(_SEP), strict=False)

    def _first(self, kind: str) -> str | None:
        if kind not in self._keys:
            return None
        return next(value for key, value in self._pairs() if key == kind)

    def _all(self, kind: str) -> list[str]:
        return [value for key, value in self._pairs() if key == kind]

    @property
    def meta(self) -> dict[str, str]:
        """The metadata, name → value (a value with a unit reads ``"300 kV"``)."""
        return {key[1:]: value for key, value in self._pairs() if key[0] in "mw"}

    @property
    def warnings(self) -> list[str]:
        """The names of the metadata marked ``warning="true"``: values that may be wrong."""
        return [key[1:] for key in self._keys if key[0] == _FLAGGED]


class Dataset(Metadata):
    """One ``<dataset>`` of an activity: one file, or one signal of a multi-signal file.

    Every attribute is the record's text (whitespace around it dropped), ``None`` where the
    record has no such element.
    """

    __slots__ = ()

    @property
    def name(self) -> str | None:
        """``<name>``: the file's name, ``"x.dm3 (1 of 2)"`` for a signal of a multi-signal file."""
        return self._first(_NAME)

    @property
    def location(self) -> str | None:
        """``<location>``, as written (NexusLIMS URL-quotes it): the file's path on the
        instrument data share, from its root."""
        return self._first(_LOCATION)

    @property
    def type(self) -> str | None:
        """``@type``: ``Image``, ``Spectrum``, ``SpectrumImage``, ``Diffraction``, …"""
        return self._first(_TYPE)

    @property
    def role(self) -> str | None:
        """``@role``: ``Experimental``, ``Calibration``, …"""
        return self._first(_ROLE)

    @property
    def format(self) -> str | None:
        """``<format>``: a MIME type or a format's name."""
        return self._first(_FORMAT)

    @property
    def description(self) -> str | None:
        """The ``<description>`` paragraphs, one per line."""
        paragraphs = self._all(_DESCRIPTION)
        return "\n".join(paragraphs) if paragraphs else None

    @property
    def preview(self) -> str | None:
        """The first ``<preview>``, as written: the thumbnail's path under NexusLIMS's data
        folder (or a URL)."""
        return self._first(_PREVIEW)

    def __repr__(self) -> str:
        return f"Dataset(name={self.name!r}, location={self.location!r}, type={self.type!r})"


@dataclass(frozen=True, eq=False)
class AcquisitionActivity:
    """One ``<acquisitionActivity>`` of a record, with NexusLIMS's attribute names.

    The lists ``files``, ``previews``, ``meta``, ``unique_meta`` and ``warnings`` run in
    parallel, one item per dataset, as in NexusLIMS (a multi-signal file is there once per
    signal). They are built when first read and then kept; treat them as read-only, since
    every destination of the record sees the same activity.
    """

    seqno: int | None
    """``@seqno``: the activity's place in the session."""
    start: datetime | None
    """``<startTime>``; ``None`` if the record has none or it is not a date."""
    end: datetime | None
    """Not in the record: NexusLIMS's end is the last file's time, so this is the latest
    ``Creation Time`` among the datasets, or ``start`` where none is later."""
    mode: str
    """The microscope's mode (``IMAGING``, ``DIFFRACTION``, …): the setup's ``Imaging
    Mode`` (else ``Operation Mode``), or the datasets' where they all agree (an activity of
    one dataset has no setup); ``""`` when the record does not say, NexusLIMS's default."""
    sample_id: str | None
    """``<sampleID>``: the ``id`` of the record's ``<sample>`` this activity used."""
    datasets: tuple[Dataset, ...]
    """The ``<dataset>`` elements, in the record's order."""
    setup: Metadata = field(repr=False)
    """``<setup>``: the parameters every dataset shares (as a dict: ``setup_params``)."""

    @cached_property
    def files(self) -> list[str]:
        """Each dataset's file: its ``<location>`` URL-unquoted (``""`` if it has none)."""
        return [unquote(d.location or "") for d in self.datasets]

    @cached_property
    def previews(self) -> list[str | None]:
        """Each dataset's thumbnail path, URL-unquoted; ``None`` where it has none."""
        return [unquote(p) if (p := d.preview) else None for d in self.datasets]

    @cached_property
    def setup_params(self) -> dict[str, str]:
        """``<setup>``'s parameters: the metadata every dataset of the activity shares."""
        return self.setup.meta

    @cached_property
    def unique_meta(self) -> list[dict[str, str]]:
        """Each dataset's own metadata (its ``<meta>`` elements)."""
        return [d.meta for d in self.datasets]

    @cached_property
    def meta(self) -> list[dict[str, str]]:
        """Each dataset's whole metadata: the setup's, then its own."""
        return [{**self.setup_params, **own} for own in self.unique_meta]

    @cached_property
    def unique_params(self) -> set[str]:
        """The name of every metadatum of the activity, setup and datasets."""
        return set(self.setup_params).union(*self.unique_meta)

    @cached_property
    def warnings(self) -> list[list[str]]:
        """Each dataset's metadata marked as possibly unreliable (the setup's among them)."""
        shared = self.setup.warnings
        return [shared + d.warnings for d in self.datasets]

    def __repr__(self) -> str:
        start = self.start.isoformat() if self.start else None
        return (
            f"AcquisitionActivity(seqno={self.seqno}, start={start}, mode={self.mode!r}, "
            f"{len(self.datasets)} datasets)"
        )


class ActivityCollector:
    """Builds the :class:`AcquisitionActivity` objects of one parse of a record.

    The reader feeds it each direct child of an ``<acquisitionActivity>`` as soon as that
    child is complete (:meth:`child`), then the activity element itself (:meth:`end`); a
    streaming parse can then drop each child at once, so at most one dataset's elements are
    held. Keys, shapes, types and roles are interned across the record: thousands of
    datasets share a handful of them.
    """

    def __init__(self, *, annotated: bool = True) -> None:
        # Whether a <meta> or <param> may carry a ``unit`` or ``warning``: two more look-ups
        # for each, which a record that has neither word anywhere (see :func:`annotated`)
        # is spared.
        self.annotated = annotated
        self.activities: list[AcquisitionActivity] = []
        self._strings: dict[str, str] = {}
        self._shapes: dict[tuple[str, ...], tuple[str, ...]] = {}
        self._kinds: dict[object, str] = {}  # a child's tag -> its packed kind
        self._meta_keys: dict[str, str] = {}  # a metadatum's name -> its key
        self._begin()

    def _begin(self) -> None:
        self._start: str | None = None
        self._sample_id: str | None = None
        self._setup: Metadata | None = None
        self._setup_mode: str | None = None
        self._datasets: list[Dataset] = []
        self._dataset_modes: set[str] = set()
        self._latest: datetime | None = None  # the latest Creation Time seen

    def whole(self, element: etree._Element) -> None:
        """Collect a complete ``<acquisitionActivity>`` element (a parsed tree's)."""
        for child in element:
            self.child(child)
        self.end(element)

    def child(self, element: etree._Element) -> None:
        """Take in one complete direct child of the current ``<acquisitionActivity>``."""
        local = _local(element)
        if local == "dataset":
            keys, values, mode = self._pack(element)
            self._datasets.append(Dataset(keys, values))
            if mode is not None:
                self._dataset_modes.add(mode)
        elif local == "setup" and self._setup is None:
            keys, values, self._setup_mode = self._pack(element)
            self._setup = Metadata(keys, values)
        elif local == "startTime" and self._start is None:
            self._start = _stripped(element)
        elif local == "sampleID" and self._sample_id is None:
            self._sample_id = _stripped(element) or None

    def end(self, element: etree._Element) -> None:
        """The ``<acquisitionActivity>`` is complete: add it to :attr:`activities`."""
        mode = self._setup_mode
        if mode is None:
            modes = self._dataset_modes
            mode = next(iter(modes)) if len(modes) == 1 else ""
        start = _datetime(self._start)
        self.activities.append(
            AcquisitionActivity(
                seqno=_integer(element.get("seqno")),
                start=start,
                end=_later(start, self._latest),
                mode=mode,
                sample_id=self._sample_id,
                datasets=tuple(self._datasets),
                setup=self._setup or _NO_SETUP,
            )
        )
        self._begin()

    def _pack(self, element: etree._Element) -> tuple[tuple[str, ...], str, str | None]:
        """The keys and joined values of a ``<dataset>`` or ``<setup>``, and its mode.

        The loop runs once per ``<meta>`` of the record, so it is kept tight: a child with a
        ``name`` is a ``<meta>`` or ``<param>`` (no other child of these has one), and only
        the others' tags are looked at; each name's key is looked up, not built again.
        """
        keys: list[str] = []
        values: list[str] = []
        for code, attribute in ((_TYPE, "type"), (_ROLE, "role")):
            label = element.get(attribute)
            if label is not None:
                keys.append(code)
                values.append(self._strings.setdefault(label, label))
        kinds, meta_keys, annotated = self._kinds, self._meta_keys, self.annotated
        mode: tuple[int, str] | None = None  # (rank in MODE_PARAMETERS, value)
        for child in element:
            name = child.get("name")
            if name is None:
                tag = child.tag
                kind = kinds.get(tag)
                if kind is None:
                    kind = kinds[tag] = _kind_of(tag)
                if kind == _META:  # a <meta> without a name
                    name = ""
                elif kind:
                    text = child.text
                    keys.append(kind)
                    values.append(text.strip() if text else "")
                    continue
                else:
                    continue  # <curation>, a comment, anything unknown
            text = child.text
            value = text.strip() if text else ""
            if annotated:
                unit = child.get("unit")
                if unit:
                    value = f"{value} {unit}"
                if child.get("warning") in ("true", "1"):
                    key = _FLAGGED + name
                    keys.append(self._strings.setdefault(key, key))
                    values.append(value)
                    continue
            key = meta_keys.get(name)
            if key is None:
                key = meta_keys[name] = _META + name
            keys.append(key)
            values.append(value)
            if name in _NOTED:
                if name == CREATION_TIME:
                    self._latest = _later(self._latest, _datetime(value))
                else:
                    rank = MODE_PARAMETERS.index(name)
                    if mode is None or rank < mode[0]:
                        mode = (rank, value)
        shape = tuple(keys)
        return (
            self._shapes.setdefault(shape, shape),
            _SEP.join(values),
            None if mode is None else mode[1],
        )


def annotated(content: bytes) -> bool:
    """Whether a record's bytes may hold a ``unit`` or ``warning`` attribute (one C scan)."""
    return b"unit" in content or b"warning" in content


def _kind_of(tag: object) -> str:
    """The packed kind of a child of a ``<dataset>`` or ``<setup>`` with this tag; ``""``
    for what is not kept (``curation``, comments, anything unknown)."""
    local = tag.rpartition("}")[2] if isinstance(tag, str) else ""
    return _META if local in ("meta", "param") else _FIELDS.get(local, "")


# The metadata whose values make an activity's mode and end.
_NOTED = frozenset((*MODE_PARAMETERS, CREATION_TIME))
_NO_SETUP = Metadata((), "")


def _local(element: etree._Element) -> str:
    tag = element.tag
    return tag.rpartition("}")[2] if isinstance(tag, str) else ""  # comments have no name


def _stripped(element: etree._Element) -> str:
    text = element.text
    return text.strip() if text else ""


def _integer(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _datetime(value: str | None) -> datetime | None:
    # Lenient, unlike the summary's dates: a record is not refused for an activity's time
    # (the schema, when on, has judged it already).
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _later(one: datetime | None, other: datetime | None) -> datetime | None:
    """The later of two times; either one where the other is missing or not comparable (a
    naive time beside an aware one)."""
    if one is None or other is None:
        return other if one is None else one
    try:
        return max(one, other)
    except TypeError:
        return one
