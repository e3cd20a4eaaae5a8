"""Request and answer bodies that hold a whole record without copying it.

A record goes out as a :class:`StreamedBody`: in pieces, with a known ``Content-Length``,
JSON-escaped a piece at a time (:class:`JsonString`) where an API wants the XML inside JSON.
It comes back, in an answer, as a :class:`RawJsonString`: the escaped bytes as they came,
compared with the record a piece at a time. A large record's value thus never exists
decoded, escaped or joined besides the record's own bytes; in an answer, one under 1 MiB
(:data:`DECODE_WHOLE_BELOW`) is decoded whole by json's C code, which is faster.
"""

from __future__ import annotations

import codecs
import json
import re
import secrets
from collections.abc import Collection, Iterator, Mapping
from typing import Any

CHUNK = 256 * 1024  # read and send in pieces of this size
# Below this size a record in an answer is decoded whole, by json's C code (several times
# faster than the piecewise code here for a 91 KB record). A worker then holds at most a few
# times this much; above it, a record-sized value is never decoded whole.
DECODE_WHOLE_BELOW = 1024 * 1024


class JsonString:
    """UTF-8 text as the inside of a JSON string, escaped piece by piece as it is sent.

    The bytes are what ``json.dumps(text, ensure_ascii=False)`` makes between its quotes,
    without a decoded or escaped copy of the whole text: a record's bytes are escaped a
    piece at a time while they go out (``"``, ``\\`` and control characters are the only
    bytes JSON escapes, and none of them is ever part of a multi-byte UTF-8 sequence).
    Raises ``ValueError`` for bytes that are not UTF-8.
    """

    def __init__(self, utf8: bytes) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")()
        view = memoryview(utf8)
        shorts = others = 0
        for start in range(0, len(view), CHUNK):  # a piece at a time: no text copy
            piece = view[start : start + CHUNK]
            decoder.decode(piece)
            # The bytes JSON escapes, picked out by a table lookup a byte, then counted: a
            # count per byte value over the whole piece would cost several times more.
            escaped = bytes(piece).translate(None, _ALL_BUT_ESCAPED)
            short = sum(escaped.count(char) for char, _ in _SHORT_ESCAPES)
            shorts, others = shorts + short, others + len(escaped) - short
        decoder.decode(b"", final=True)
        self.utf8 = utf8
        self._length = len(utf8) + shorts + 5 * others  # \x is two bytes, \u00XX six
        self._controls = others > 0

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        view = memoryview(self.utf8)
        for start in range(0, len(view), CHUNK):
            piece = bytes(view[start : start + CHUNK])
            for char, escaped in _SHORT_ESCAPES:  # an absent byte costs one memchr
                piece = piece.replace(char, escaped)
            if self._controls:
                piece = _OTHER_CONTROLS.sub(_unicode_escape, piece)
            yield piece


# What JSON escapes with a letter; the backslash first, so no escape is escaped again.
_SHORT_ESCAPES = (
    (b"\\", b"\\\\"),
    (b'"', b'\\"'),
    (b"\n", b"\\n"),
    (b"\r", b"\\r"),
    (b"\t", b"\\t"),
    (b"\b", b"\\b"),
    (b"\f", b"\\f"),
)
# The control bytes JSON escapes as \u00XX (the rest have a letter, above).
_OTHER_CONTROL_BYTES = bytes([*range(0x08), 0x0B, *range(0x0E, 0x20)])
_OTHER_CONTROLS = re.compile(b"[" + re.escape(_OTHER_CONTROL_BYTES) + b"]")
_ESCAPED_BYTES = b"".join(char for char, _ in _SHORT_ESCAPES) + _OTHER_CONTROL_BYTES
_ALL_BUT_ESCAPED = bytes(b for b in range(256) if b not in _ESCAPED_BYTES)


def _unicode_escape(match: re.Match[bytes]) -> bytes:
    return b"\\u%04x" % match.group()[0]


class StreamedBody:
    """A request body sent piece by piece with a known ``Content-Length``.

    The parts are kept as they are (a record's bytes are never copied into one joined body)
    and every iteration yields the same bytes, so a request sent again is identical. ``str``
    parts must be ASCII (their length is their length in bytes).
    """

    def __init__(self, *parts: bytes | str | JsonString, content_type: str | None = None) -> None:
        for part in parts:
            if isinstance(part, str) and not part.isascii():
                raise ValueError("a str part of a StreamedBody must be ASCII")
        self.parts = parts
        self.content_type = content_type
        self._length = sum(len(part) for part in parts)

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes | memoryview]:
        # Small pieces go out together: a small body is one write, as it would be whole.
        pending = bytearray()
        for piece in self._pieces():
            if len(pending) + len(piece) > CHUNK and pending:
                yield bytes(pending)
                pending.clear()
            if len(piece) >= CHUNK:
                yield piece
            else:
                pending += piece
        if pending:
            yield bytes(pending)

    def _pieces(self) -> Iterator[bytes | memoryview]:
        for part in self.parts:
            if isinstance(part, JsonString):
                yield from part
            elif isinstance(part, str):
                for start in range(0, len(part), CHUNK):
                    yield part[start : start + CHUNK].encode("ascii")
            else:
                view = memoryview(part)
                for start in range(0, len(view), CHUNK):
                    yield view[start : start + CHUNK]


def json_body(fields: Mapping[str, Any], key: str, utf8: bytes) -> StreamedBody:
    """``json.dumps({**fields, key: utf8.decode()}, ensure_ascii=False).encode()`` as a
    :class:`StreamedBody`, in which ``utf8`` is never decoded or copied whole.

    Raises ``ValueError`` if ``utf8`` is not UTF-8.
    """
    if key in fields:
        raise ValueError(f"{key!r} is both a field and the text's key")
    head = json.dumps(dict(fields), ensure_ascii=False).encode("utf-8")
    prefix = head[:-1] + (b", " if fields else b"") + json.dumps(key).encode() + b': "'
    return StreamedBody(prefix, JsonString(utf8), b'"}', content_type="application/json")


class RawJsonString:
    """A JSON string left undecoded: the escaped bytes between its quotes, as they came.

    :meth:`equals_utf8` compares it with UTF-8 bytes a piece at a time, so a record-sized
    value is never held decoded.
    """

    def __init__(self, escaped: memoryview) -> None:
        self.escaped = escaped

    def text(self) -> str:
        """The value, decoded whole."""
        return "".join(self._pieces())

    def equals_utf8(self, utf8: bytes) -> bool:
        """Whether the value is exactly the text that ``utf8`` encodes."""
        view, at = memoryview(utf8), 0
        for text in self._pieces():
            piece = text.encode("utf-8", "surrogatepass")
            if view[at : at + len(piece)] != piece:
                return False
            at += len(piece)
        return at == len(view)

    def _pieces(self) -> Iterator[str]:
        raw, start = self.escaped, 0
        while start < len(raw):
            end = _piece_end(raw, start)
            value = json.loads(b'"' + bytes(raw[start:end]) + b'"')
            assert isinstance(value, str)
            yield value
            start = end


class DecodedJsonString(RawJsonString):
    """A string of a small answer, decoded already (:data:`DECODE_WHOLE_BELOW`), with the
    interface of :class:`RawJsonString`."""

    def __init__(self, text: str) -> None:
        self._text = text

    def text(self) -> str:
        return self._text

    def equals_utf8(self, utf8: bytes) -> bool:
        return self._text.encode("utf-8", "surrogatepass") == utf8


def _piece_end(raw: memoryview, start: int) -> int:
    """Where a piece of an escaped JSON string that starts at ``start`` may end.

    Right after a ``<``, ``>`` or space: bytes that no escape sequence (``\\u00b5``,
    ``\\"``) contains and that are not part of a multi-byte character, so the cut splits
    neither. Without one in sight (a long run of escapes), the rest is taken whole.
    """
    end = start + CHUNK
    if end >= len(raw):
        return len(raw)
    window = bytes(raw[max(start, end - CHUNK // 4) : end])
    cut = max(window.rfind(b"<"), window.rfind(b">"), window.rfind(b" "))
    return end - len(window) + cut + 1 if cut >= 0 else len(raw)


# A JSON string token; between tokens a JSON text has no quote at all. Possessive: with
# backtracking, ``re`` would keep state for every escape of a record-sized string.
_JSON_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.S)


def loads_keeping_raw(content: bytes | bytearray, raw: Collection[str] = ()) -> Any:
    """``json.loads(content)``, but the string values of members named in ``raw`` become
    :class:`RawJsonString` views of ``content`` instead of being decoded (in an answer
    smaller than :data:`DECODE_WHOLE_BELOW`, a :class:`DecodedJsonString`)."""
    if not raw:
        return json.loads(content.decode("utf-8"))
    if len(content) < DECODE_WHOLE_BELOW:
        return json.loads(content.decode("utf-8"), object_hook=lambda obj: _raw(obj, raw))
    keys = {json.dumps(key).encode() for key in raw}
    longest = max(len(key) for key in keys)
    marker = f"\u0000nxdrop-raw-{secrets.token_hex(8)}"
    view = memoryview(content)
    skeleton, last = bytearray(), 0
    values: list[RawJsonString] = []
    key_end = -1  # where a wanted key token ended, while its value is awaited
    for match in _JSON_STRING.finditer(content):
        begin, end = match.span()
        if key_end >= 0 and bytes(content[key_end:begin]).strip() == b":":
            skeleton += content[last:begin]
            skeleton += b"{%s: %d}" % (json.dumps(marker).encode(), len(values))
            values.append(RawJsonString(view[begin + 1 : end - 1]))
            last, key_end = end, -1
            continue
        key_end = end if end - begin <= longest and bytes(content[begin:end]) in keys else -1
    skeleton += content[last:]

    def restore(obj: dict[str, Any]) -> Any:
        return values[obj[marker]] if len(obj) == 1 and marker in obj else obj

    return json.loads(skeleton.decode("utf-8"), object_hook=restore)


def _raw(obj: dict[str, Any], raw: Collection[str]) -> dict[str, Any]:
    for key in raw:
        value = obj.get(key)
        if isinstance(value, str):
            obj[key] = DecodedJsonString(value)
    return obj


def multipart_body(
    fields: Mapping[str, str],
    name: str,
    filename: str,
    content: bytes,
    content_type: str,
    *,
    boundary: str,
) -> StreamedBody:
    """A ``multipart/form-data`` body with one file part whose bytes are sent as they are.

    The same bytes as urllib3's ``encode_multipart_formdata`` with the file first and then
    ``fields``; with a fixed ``boundary`` a retried upload sends the same bytes as the first.
    """
    marker = b"\x00nxdrop-file-content\x00"
    parts: dict[str, Any] = {name: (filename, marker, content_type), **fields}
    from urllib3 import encode_multipart_formdata  # only where a file is uploaded

    encoded, form_type = encode_multipart_formdata(parts, boundary=boundary)
    head, found, tail = encoded.partition(marker)
    assert found and marker not in tail, "the placeholder must occur exactly once"
    return StreamedBody(head, content, tail, content_type=form_type)
