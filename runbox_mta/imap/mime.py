"""Message structure for IMAP: one pass over the raw bytes at delivery.

`parse_structure(data)` returns a `MessageStructure`: a tree of `BodyPart`s
with byte offsets into `data` (header start, header end = body start, body
end) and the parsed MIME fields, plus the ENVELOPE of every message (the
top-level one and each encapsulated message/rfc822). It is computed once
when mail is stored and kept as JSON (`to_json` / `from_json`); FETCH then
renders BODY, BODYSTRUCTURE and ENVELOPE and cuts sections by offset
(`fetch`) without parsing the message again.

The tree follows Dovecot's: the root part is the message itself (its header
and body); a multipart has its body parts as children; a message/rfc822 part
has exactly one child, the encapsulated message, whose header starts where
the part's body starts.

Work is linear in the message size and nothing is copied but header field
values: every byte is scanned once, either as part of a header (which ends
at its blank line or at a boundary line) or in a body, where candidate
boundary lines are found with `bytes.find` over "\\n--" and looked up in a
dict; lines are counted with a cursor that only moves forward. Nesting
beyond MAX_DEPTH entities and parts beyond MAX_PARTS are not parsed: such
an entity stays an opaque application/octet-stream body, so a hostile
message cannot cost more than a bounded tree.

Decisions (Dovecot is the reference, tests in tests/test_imap_mime.py):

- Types, subtypes, parameter names and values are returned as written;
  absent ones default to "text" "plain" (RFC 2045 §5.2), or "message"
  "rfc822" inside multipart/digest (RFC 2046 §5.1.5). A Content-Type that
  does not parse, or a multipart without a boundary, is text/plain too.
- Content-Type is honoured without MIME-Version, as Dovecot and mail
  clients do; for every Content-* field the first occurrence counts, and
  so does the first of each envelope field.
- A boundary line is "--" boundary, optionally "--", then optional
  whitespace (RFC 2046 §5.1.1 transport padding). Dovecot accepts any line
  that starts with a boundary; an exact match cannot let boundary "b" end
  a part of the nested multipart with boundary "b2". An outer boundary
  ends every unclosed inner multipart. A multipart whose boundary never
  occurs has no parts (BODYSTRUCTURE shows an empty text/plain, as Dovecot
  does). The line end before a boundary line belongs to it (RFC 2046).
- ENVELOPE values are stored as IMAP sends them: Sender and Reply-To
  already default to From, subjects and display names have their
  whitespace runs collapsed (Dovecot), addresses follow `encoding`.
- Line counts are the number of LF bytes in the body, Dovecot's count.
- Sizes and offsets are of the stored bytes, so a message stored with bare
  LF line ends reports the sizes of what FETCH will send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from runbox_mta.imap.encoding import (
    Params,
    for_humans,
    header_text,
    parse_addresses,
    parse_mime_value,
    strip_comments,
)

MAX_DEPTH = 100  # nested entities (multipart children, encapsulated messages)
MAX_PARTS = 10_000  # entities in one message
JSON_VERSION = 1
# Where to_json puts the message's own ENVELOPE, so a store can read just that part.
ENVELOPE_JSON_PATH = ("root", "envelope")


# -- the structure --------------------------------------------------------


@dataclass(frozen=True)
class Address:
    """One element of an envelope address list (RFC 9051 §7.5.2).

    A group start is (None, None, group name, None), a group end all None.
    """

    name: str | None
    route: str | None
    mailbox: str | None
    host: str | None


@dataclass(frozen=True)
class Envelope:
    """The ENVELOPE fields, exactly as IMAP sends them (None is NIL)."""

    date: str | None = None
    subject: str | None = None
    from_: tuple[Address, ...] = ()
    sender: tuple[Address, ...] = ()
    reply_to: tuple[Address, ...] = ()
    to: tuple[Address, ...] = ()
    cc: tuple[Address, ...] = ()
    bcc: tuple[Address, ...] = ()
    in_reply_to: str | None = None
    message_id: str | None = None

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> Envelope:
        """The envelope from its part of MessageStructure.to_json (at ENVELOPE_JSON_PATH)."""
        if not isinstance(value, dict):
            raise ValueError("invalid envelope")
        try:
            return _envelope_from_json(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"invalid envelope: {error}") from None


@dataclass(frozen=True)
class Disposition:
    value: str
    params: Params = ()


@dataclass(frozen=True)
class BodyPart:
    type: str
    subtype: str
    header_start: int
    header_end: int  # also where the body starts
    body_end: int
    lines: int = 0  # LF bytes in the body
    params: Params = ()
    id: str | None = None
    description: str | None = None
    encoding: str | None = None  # Content-Transfer-Encoding as written; None means 7bit
    md5: str | None = None
    disposition: Disposition | None = None
    language: tuple[str, ...] = ()
    location: str | None = None
    parts: tuple[BodyPart, ...] = ()  # multipart children, or the one encapsulated message
    envelope: Envelope | None = None  # set on messages: the root and encapsulated ones

    @property
    def size(self) -> int:
        return self.body_end - self.header_end

    @property
    def is_multipart(self) -> bool:
        return self.type.lower() == "multipart"

    @property
    def is_message(self) -> bool:
        """message/rfc822: the body is a message, `parts[0]`."""
        return self.type.lower() == "message" and self.subtype.lower() == "rfc822"

    @property
    def is_text(self) -> bool:
        return self.type.lower() == "text"


@dataclass(frozen=True)
class MessageStructure:
    size: int
    root: BodyPart

    @property
    def envelope(self) -> Envelope:
        return self.root.envelope or Envelope()

    def to_json(self) -> dict[str, Any]:
        """Plain dicts, lists, strings and ints; `from_json` gives back an equal structure."""
        return {"v": JSON_VERSION, "size": self.size, "root": _part_to_json(self.root)}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> MessageStructure:
        if not isinstance(value, dict) or value.get("v") != JSON_VERSION:
            raise ValueError("unsupported message structure format")
        try:
            return cls(value["size"], _part_from_json(value["root"]))
        except (KeyError, TypeError, ValueError, IndexError) as error:
            raise ValueError(f"invalid message structure: {error}") from None


# -- parsing --------------------------------------------------------------


def parse_structure(data: bytes) -> MessageStructure:
    """The structure of one RFC 5322 message; never raises, whatever the bytes."""
    parser = _Parser(data)
    root, _ = parser.entity(0, _NO_BOUNDARIES, 0, _TEXT_PLAIN, message=True)
    return MessageStructure(len(data), root)


_TEXT_PLAIN = ("text", "plain")
_MESSAGE_RFC822 = ("message", "rfc822")
_OPAQUE = ("application", "octet-stream")

# In a header, the lines that can end it: a blank line or one that may be a boundary.
_HEADER_STOP = re.compile(rb"\n(?=\r?\n|--)")
_CONTENT_FIELDS = ("type", "transfer-encoding", "id", "description", "md5", "disposition", "language", "location")
_ENVELOPE_FIELDS = ("date", "subject", "from", "sender", "reply-to", "to", "cc", "bcc", "in-reply-to", "message-id")
# The header fields the structure needs: a name at a line start, the colon (RFC 5322
# §3.6.8 allows whitespace before it in obsolete syntax), the value with its continuations.
_FIELD = re.compile(
    rb"^(content-(?:" + b"|".join(name.encode() for name in _CONTENT_FIELDS) + rb")|"
    + b"|".join(name.encode() for name in _ENVELOPE_FIELDS) + rb")[ \t]*:(.*(?:\n[ \t].*)*)",
    re.I | re.M,
)
_TOKEN = r"[!#$%&'*+\-.^_`{|}~0-9A-Za-z]+"  # RFC 2045 §5.1 token (ASCII minus tspecials)
_TYPE = re.compile(rf"({_TOKEN})\s*/\s*({_TOKEN})")
_BOUNDARY_LINE_LIMIT = 1024  # longer lines are never boundary lines (RFC 2046: boundaries are 1-70 chars)


@dataclass(frozen=True)
class _Hit:
    """A boundary line: where it starts and ends, whose boundary it is, whether it closes."""

    start: int
    end: int  # after its line end
    level: int
    close: bool


@dataclass(frozen=True)
class _Boundaries:
    """The boundaries of the enclosing open multiparts; `level` is the innermost's."""

    levels: dict[bytes, int] = field(default_factory=dict)
    level: int = 0

    def inside(self, boundary: bytes) -> _Boundaries:
        level = self.level + 1
        return _Boundaries({**self.levels, boundary: level}, level)


_NO_BOUNDARIES = _Boundaries()


class _Lines:
    """LF bytes before an offset. The parse only moves forward, so each byte is counted once."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._offset = 0
        self._count = 0

    def before(self, offset: int) -> int:
        if offset >= self._offset:
            self._count += self._data.count(b"\n", self._offset, offset)
            self._offset = offset
            return self._count
        return self._count - self._data.count(b"\n", offset, self._offset)


@dataclass(frozen=True)
class _Header:
    """What one entity's header says about it."""

    fields: dict[str, bytes]  # lower-case name -> raw value of its first occurrence
    end: int  # end of the header, the blank line included
    cut: _Hit | None  # a boundary line that ended the header before any blank line


class _Parser:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.lines = _Lines(data)
        self.parts = 0

    def entity(
        self, start: int, bounds: _Boundaries, depth: int, default: tuple[str, str], message: bool
    ) -> tuple[BodyPart, _Hit | None]:
        """The entity (message or body part) at `start`, and the boundary line after it."""
        self.parts += 1
        header = self.header(start, bounds)
        content = _content(header.fields, default)
        first_line = self.lines.before(header.end)
        composite = depth < MAX_DEPTH and self.parts < MAX_PARTS
        children: tuple[BodyPart, ...] = ()
        if content.boundary and composite:
            children, body_end, hit = self.multipart(header, content, bounds, depth)
        elif _is(content.kind, _MESSAGE_RFC822) and composite:
            child, body_end, hit = self.encapsulated(header, bounds, depth)
            children = (child,)
        else:
            if content.boundary or _is(content.kind, _MESSAGE_RFC822):  # too deep or too many parts
                content = _Content(_OPAQUE, {**content.fields, "params": ()}, None)
            hit = header.cut or self.find(header.end, bounds)
            body_end = self.end_before(hit, header.end)
        lines = self.lines.before(body_end) - first_line
        envelope = _envelope(header.fields) if message else None
        part = BodyPart(*content.kind, start, header.end, body_end, lines, parts=children, envelope=envelope,
                        **content.fields)
        return part, hit

    def multipart(
        self, header: _Header, content: _Content, bounds: _Boundaries, depth: int
    ) -> tuple[tuple[BodyPart, ...], int, _Hit | None]:
        """RFC 2046 §5.1.1: preamble, body parts, close delimiter, epilogue."""
        if header.cut or content.boundary is None:
            return (), header.end, header.cut
        inner = bounds.inside(content.boundary)
        # RFC 2046 §5.1.5: in a digest, a part without Content-Type is message/rfc822.
        default = _MESSAGE_RFC822 if content.kind[1].lower() == "digest" else _TEXT_PLAIN
        children = []
        # The body never ends inside its last part, even when the line end before the
        # boundary that ends it is the end of a delimiter line. After a close delimiter
        # its line end goes to an outer boundary right after it, as in Dovecot.
        floor = header.end
        hit: _Hit | None = self.find(header.end, inner)
        while hit is not None and hit.level == inner.level and not hit.close:
            if self.parts >= MAX_PARTS:
                hit = self.skip_parts(hit, inner)
                break
            child, hit = self.entity(hit.end, inner, depth + 1, default, message=False)
            children.append(child)
            floor = child.body_end
        if hit is not None and hit.level == inner.level:  # closed: the epilogue runs to an outer boundary
            hit = self.find(hit.end, bounds)
        return tuple(children), self.end_before(hit, floor), hit

    def encapsulated(
        self, header: _Header, bounds: _Boundaries, depth: int
    ) -> tuple[BodyPart, int, _Hit | None]:
        """A message/rfc822 body: a message whose header starts the body."""
        if header.cut:
            self.parts += 1
            empty = BodyPart(*_TEXT_PLAIN, header.end, header.end, header.end, envelope=Envelope())
            return empty, header.end, header.cut
        child, hit = self.entity(header.end, bounds, depth + 1, _TEXT_PLAIN, message=True)
        return child, child.body_end, hit

    def skip_parts(self, hit: _Hit | None, inner: _Boundaries) -> _Hit | None:
        """Past the body parts beyond MAX_PARTS: they stay in the body, unparsed."""
        while hit is not None and hit.level == inner.level and not hit.close:
            hit = self.find(hit.end, inner)
        return hit

    def header(self, start: int, bounds: _Boundaries) -> _Header:
        """The header at `start`: to its blank line, or to a boundary line that cuts it short.

        Only the header's own lines are looked at, so every byte of the message is
        scanned once however deeply its entities nest.
        """
        data = self.data
        stops = _HEADER_STOP.finditer(data, start)
        line = start
        while line >= 0:
            if data.startswith(b"\n", line) or data.startswith(b"\r\n", line):
                return _Header(self.fields(start, line), data.index(b"\n", line) + 1, None)
            hit = self.match(line, bounds) if data.startswith(b"--", line) else None
            if hit is not None:
                end = self.end_before(hit, start)
                return _Header(self.fields(start, end), end, hit)
            stop = next(stops, None)
            line = -1 if stop is None else stop.end()
        return _Header(self.fields(start, len(data)), len(data), None)

    def fields(self, start: int, end: int) -> dict[str, bytes]:
        """The fields the structure needs from a header, first occurrence of each."""
        fields: dict[str, bytes] = {}
        for match in _FIELD.finditer(self.data, start, end):
            fields.setdefault(match.group(1).lower().decode("ascii"), match.group(2))
        return fields

    def find(self, start: int, bounds: _Boundaries) -> _Hit | None:
        """The first boundary line of `bounds` at or after `start` (a line start)."""
        if not bounds.levels:
            return None
        line = start if self.data.startswith(b"--", start) else self.next_dashes(start)
        while line >= 0:
            hit = self.match(line, bounds)
            if hit is not None:
                return hit
            line = self.next_dashes(line)
        return None

    def next_dashes(self, position: int) -> int:
        """The next line start after `position` that begins with "--", or -1."""
        newline = self.data.find(b"\n--", position)
        return -1 if newline < 0 else newline + 1

    def match(self, line: int, bounds: _Boundaries) -> _Hit | None:
        """The boundary line at `line` (which starts with "--"), if it is one of `bounds`."""
        if not bounds.levels:
            return None
        data = self.data
        limit = line + _BOUNDARY_LINE_LIMIT
        newline = data.find(b"\n", line, limit)
        if newline < 0 and limit < len(data):
            return None
        end = len(data) if newline < 0 else newline + 1
        text = data[line + 2:end].rstrip(b" \t\r\n")
        if text in bounds.levels:
            return _Hit(line, end, bounds.levels[text], close=False)
        if text.endswith(b"--") and text[:-2] in bounds.levels:
            return _Hit(line, end, bounds.levels[text[:-2]], close=True)
        return None

    def end_before(self, hit: _Hit | None, floor: int) -> int:
        """Where content ends before a boundary line: its preceding line end belongs to it."""
        if hit is None:
            return len(self.data)
        end = hit.start
        if end > floor and self.data[end - 1] == 0x0A:
            end -= 1
            if end > floor and self.data[end - 1] == 0x0D:
                end -= 1
        return end


# -- header field values --------------------------------------------------


@dataclass(frozen=True)
class _Content:
    kind: tuple[str, str]  # type and subtype as written
    fields: dict[str, Any]  # BodyPart keyword arguments from the other Content-* fields
    boundary: bytes | None  # set only for a multipart that can be split


def _content(fields: dict[str, bytes], default: tuple[str, str]) -> _Content:
    kind, boundary = default, None
    params: Params = ()
    if "content-type" in fields:
        kind, params, boundary = _content_type(header_text(fields["content-type"]))
    extra: dict[str, Any] = {
        "params": params,
        "id": _text(fields, "content-id"),
        "description": _text(fields, "content-description"),
        "encoding": _transfer_encoding(fields),
        "md5": _text(fields, "content-md5"),
        "disposition": _disposition(fields),
        "language": _language(fields),
        "location": _text(fields, "content-location"),
    }
    return _Content(kind, extra, boundary)


def _content_type(value: str) -> tuple[tuple[str, str], Params, bytes | None]:
    head, params = parse_mime_value(value)
    match = _TYPE.match(head)
    if match is None:  # RFC 2045 §5.2: an invalid Content-Type means text/plain; charset=us-ascii
        return _TEXT_PLAIN, (), None
    kind = (match.group(1), match.group(2))
    if kind[0].lower() != "multipart":
        return kind, params, None
    boundary = next((value for name, value in params if name.lower() == "boundary"), "").rstrip(" \t")
    if not boundary:  # RFC 2046 §5.1.1: the boundary parameter is required
        return _TEXT_PLAIN, (), None
    return kind, params, boundary.encode("utf-8")


def _is(kind: tuple[str, str], expected: tuple[str, str]) -> bool:
    return (kind[0].lower(), kind[1].lower()) == expected


def _text(fields: dict[str, bytes], name: str) -> str | None:
    return header_text(fields[name]) if name in fields else None


def _transfer_encoding(fields: dict[str, bytes]) -> str | None:
    """A single token, or None (7bit) as Dovecot does for anything else."""
    value = strip_comments(_text(fields, "content-transfer-encoding") or "")
    return value if re.fullmatch(_TOKEN, value) else None


def _disposition(fields: dict[str, bytes]) -> Disposition | None:
    if "content-disposition" not in fields:
        return None
    head, params = parse_mime_value(header_text(fields["content-disposition"]))
    return Disposition(head, params) if re.fullmatch(_TOKEN, head) else None


def _language(fields: dict[str, bytes]) -> tuple[str, ...]:
    """RFC 3282: a comma-separated list of language tags."""
    tags = strip_comments(_text(fields, "content-language") or "").split(",")
    return tuple(tag.split()[0] for tag in tags if tag.strip())


def _addresses(value: str) -> tuple[Address, ...]:
    return tuple(Address(*address) for address in parse_addresses(value))


# Delivery parses every message's address fields, and the same From and To come
# back again and again (a twentieth of the MX's CPU): short ones are remembered
# (the results are immutable).
MAX_REMEMBERED_FIELD = 500
_remembered_addresses = lru_cache(maxsize=4096)(_addresses)


def _envelope(fields: dict[str, bytes]) -> Envelope:
    def text(name: str) -> str | None:
        return _text(fields, name)

    def addresses(name: str) -> tuple[Address, ...]:
        value = text(name)
        if not value:
            return ()
        return _remembered_addresses(value) if len(value) <= MAX_REMEMBERED_FIELD else _addresses(value)

    subject = text("subject")
    from_ = addresses("from")
    return Envelope(
        date=text("date"),
        subject=for_humans(subject) if subject is not None else None,
        from_=from_,
        # RFC 9051 §7.5.2: absent or empty Sender and Reply-To are set to From.
        sender=addresses("sender") or from_,
        reply_to=addresses("reply-to") or from_,
        to=addresses("to"),
        cc=addresses("cc"),
        bcc=addresses("bcc"),
        in_reply_to=text("in-reply-to"),
        message_id=text("message-id"),
    )



# -- JSON -----------------------------------------------------------------

_OPTIONAL_TEXT = ("id", "description", "encoding", "md5", "location")
_ADDRESS_LISTS = ("from_", "sender", "reply_to", "to", "cc", "bcc")
_ENVELOPE_TEXT = ("date", "subject", "in_reply_to", "message_id")


def _part_to_json(part: BodyPart) -> dict[str, Any]:
    value: dict[str, Any] = {
        "type": part.type,
        "subtype": part.subtype,
        "offsets": [part.header_start, part.header_end, part.body_end],
        "lines": part.lines,
    }
    if part.params:
        value["params"] = [list(pair) for pair in part.params]
    value.update({name: getattr(part, name) for name in _OPTIONAL_TEXT if getattr(part, name) is not None})
    if part.disposition is not None:
        value["disposition"] = [part.disposition.value, [list(pair) for pair in part.disposition.params]]
    if part.language:
        value["language"] = list(part.language)
    if part.parts:
        value["parts"] = [_part_to_json(child) for child in part.parts]
    if part.envelope is not None:
        value["envelope"] = _envelope_to_json(part.envelope)
    return value


def _part_from_json(value: dict[str, Any]) -> BodyPart:
    header_start, header_end, body_end = value["offsets"]
    disposition = value.get("disposition")
    envelope = value.get("envelope")
    return BodyPart(
        value["type"], value["subtype"], header_start, header_end, body_end, value["lines"],
        params=_pairs(value.get("params", [])),
        disposition=Disposition(disposition[0], _pairs(disposition[1])) if disposition else None,
        language=tuple(value.get("language", [])),
        parts=tuple(_part_from_json(child) for child in value.get("parts", [])),
        envelope=_envelope_from_json(envelope) if envelope is not None else None,
        **{name: value.get(name) for name in _OPTIONAL_TEXT},
    )


def _pairs(value: list[list[str]]) -> Params:
    return tuple((name, text) for name, text in value)


def _envelope_to_json(envelope: Envelope) -> dict[str, Any]:
    value: dict[str, Any] = {
        name: getattr(envelope, name) for name in _ENVELOPE_TEXT if getattr(envelope, name) is not None
    }
    for name in _ADDRESS_LISTS:
        addresses = getattr(envelope, name)
        if addresses:
            value[name] = [[a.name, a.route, a.mailbox, a.host] for a in addresses]
    return value


def _envelope_from_json(value: dict[str, Any]) -> Envelope:
    def addresses(name: str) -> tuple[Address, ...]:
        return tuple(Address(*address) for address in value.get(name, []))

    return Envelope(
        date=value.get("date"),
        subject=value.get("subject"),
        from_=addresses("from_"),
        sender=addresses("sender"),
        reply_to=addresses("reply_to"),
        to=addresses("to"),
        cc=addresses("cc"),
        bcc=addresses("bcc"),
        in_reply_to=value.get("in_reply_to"),
        message_id=value.get("message_id"),
    )
