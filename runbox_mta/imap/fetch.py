"""FETCH data items that come from the message itself (RFC 9051 §6.4.5, §7.5.2;
RFC 3516 BINARY): ENVELOPE, BODY, BODYSTRUCTURE, RFC822*, BODY[section]<partial>,
BINARY[part]<partial> and BINARY.SIZE.

Everything renders from the raw bytes and the `MessageStructure` computed
at delivery; nothing here parses MIME again. The session asks
`render_fetch_item(data, structure, attribute)` for each such attribute
and gets the bytes of one item, label included ("BODY[1] {5}\\r\\nhello").
`needs_data(attribute)` says whether the message bytes are needed at all
(ENVELOPE, BODYSTRUCTURE and RFC822.SIZE come from the structure alone),
`sets_seen(attribute)` whether fetching it sets \\Seen (RFC 9051 §6.4.5).

Decisions (Dovecot is the reference):

- A section that does not exist (part 9 of a two-part message, 1.HEADER
  of a part that is not message/rfc822) is the empty string, not an error
  and not NIL, as in Dovecot and UW-IMAP (Mark Crispin on imap-protocol,
  2011: meaningless fetches return ""). Empty content is sent as "".
- n.MIME is the part's own MIME header; for a message/rfc822 part that is
  the header in the enclosing multipart, not the encapsulated message's.
- HEADER, HEADER.FIELDS[.NOT] and MIME end with the header's blank line;
  RFC 3501 §6.4.5: "except in the case of a message which has no body and
  no blank line", so none is made up when the stored header has none.
- BODY[...] content never carries NUL, which literals forbid (RFC 9051
  §4.3): NUL is sent as 0x80, as Dovecot does. BINARY content with NUL is
  sent as literal8 (RFC 3516 §4.3).
- Strings are quoted when they are short 7-bit text with few quoted
  specials, otherwise literals (8-bit text is always a literal, which both
  IMAP4rev1 and UTF8=ACCEPT clients read).
- Response labels repeat the section in upper case and, for a partial
  fetch, the origin octet, as Dovecot does (for BINARY too).
- BINARY of a multipart or message/rfc822 part returns its body as is:
  composite bodies cannot be transfer-encoded (RFC 2045 §6.4). BINARY[]
  of a single-part message is its header followed by the decoded body.
"""

from __future__ import annotations

import re

from runbox_mta.imap.commands import FetchAttribute, FetchBinarySize, FetchBody, FetchItem, Section
from runbox_mta.imap.encoding import UnknownTransferEncoding, decode_transfer
from runbox_mta.imap.mime import Address, BodyPart, Envelope, MessageStructure

UnknownCte = UnknownTransferEncoding  # the session replies NO [UNKNOWN-CTE] (RFC 3516 §4.2)

__all__ = [
    "UnknownCte",
    "binary_content",
    "find_part",
    "needs_data",
    "render_bodystructure",
    "render_envelope",
    "render_fetch_item",
    "section_content",
    "sets_seen",
]


# -- IMAP strings ---------------------------------------------------------

_QUOTED_SPECIALS_MAX = 4  # beyond this a literal is shorter (Dovecot's rule)
_QUOTED_LENGTH_MAX = 1024  # keeps response lines short for clients with small line buffers
_NIL = b"NIL"


def _nstring(value: str | None) -> bytes:
    """RFC 9051 §4.3 string or NIL."""
    if value is None:
        return _NIL
    raw = value.encode("utf-8")
    specials = raw.count(b'"') + raw.count(b"\\")
    if raw.isascii() and specials <= _QUOTED_SPECIALS_MAX and len(raw) <= _QUOTED_LENGTH_MAX \
            and b"\r" not in raw and b"\n" not in raw:
        return b'"' + raw.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return _literal(raw)


def _literal(raw: bytes, binary: bool = False) -> bytes:
    """A literal, or literal8 (RFC 3516 §4.3); the empty string is sent quoted."""
    if not raw:
        return b'""'
    return (b"~{%d}\r\n" if binary else b"{%d}\r\n") % len(raw) + raw


def _list(items: list[bytes], separator: bytes = b" ") -> bytes:
    return b"(" + separator.join(items) + b")" if items else _NIL


# -- ENVELOPE -------------------------------------------------------------


def render_envelope(structure: MessageStructure) -> bytes:
    """The message's ENVELOPE, parenthesised (RFC 9051 §7.5.2)."""
    return render_envelope_fields(structure.envelope)


def render_envelope_fields(envelope: Envelope) -> bytes:
    """An ENVELOPE, parenthesised: the message's, or a message/rfc822 part's."""
    fields = [
        _nstring(envelope.date),
        _nstring(envelope.subject),
        *(_addresses(addresses) for addresses in (
            envelope.from_, envelope.sender, envelope.reply_to, envelope.to, envelope.cc, envelope.bcc,
        )),
        _nstring(envelope.in_reply_to),
        _nstring(envelope.message_id),
    ]
    return b"(" + b" ".join(fields) + b")"


def _addresses(addresses: tuple[Address, ...]) -> bytes:
    items = [
        b"(" + b" ".join(_nstring(value) for value in (a.name, a.route, a.mailbox, a.host)) + b")"
        for a in addresses
    ]
    return _list(items, b"")


# -- BODY and BODYSTRUCTURE -----------------------------------------------

# RFC 9051 §7.5.2 requires at least one part in a multipart; Dovecot shows a
# multipart without parts as one empty text/plain part, and so do we.
_EMPTY_BODY = b'("text" "plain" ("charset" "us-ascii") NIL NIL "7bit" 0 0'
_DEFAULT_CHARSET = ("charset", "us-ascii")  # RFC 2045 §5.2


def render_bodystructure(structure: MessageStructure, extended: bool) -> bytes:
    """BODYSTRUCTURE (extended) or BODY (not), parenthesised (RFC 9051 §7.5.2)."""
    return _body(structure.root, extended)


def _body(part: BodyPart, extended: bool) -> bytes:
    if part.is_multipart:
        return _multipart(part, extended)
    params = part.params
    if part.is_text and not any(name.lower() == "charset" for name, _ in params):
        params = (*params, _DEFAULT_CHARSET)
    fields = [
        _nstring(part.type), _nstring(part.subtype), _params(params),
        _nstring(part.id), _nstring(part.description), _nstring(part.encoding or "7bit"),
        b"%d" % part.size,
    ]
    if part.is_message:
        message = part.parts[0]
        envelope = render_envelope_fields(message.envelope or Envelope())
        fields += [envelope, _body(message, extended), b"%d" % part.lines]
    elif part.is_text:
        fields.append(b"%d" % part.lines)
    if extended:  # body-ext-1part: md5, disposition, language, location
        fields += [_nstring(part.md5), *_extension(part)]
    return b"(" + b" ".join(fields) + b")"


def _multipart(part: BodyPart, extended: bool) -> bytes:
    children = b"".join(_body(child, extended) for child in part.parts)
    if not children:
        children = _EMPTY_BODY + (b" NIL NIL NIL NIL)" if extended else b")")
    fields = [children, _nstring(part.subtype)]
    if extended:  # body-ext-mpart: parameters, disposition, language, location
        fields += [_params(part.params), *_extension(part)]
    return b"(" + b" ".join(fields) + b")"


def _params(params: tuple[tuple[str, str], ...]) -> bytes:
    return _list([_nstring(name) + b" " + _nstring(value) for name, value in params])


def _extension(part: BodyPart) -> list[bytes]:
    disposition = _NIL
    if part.disposition is not None:
        disposition = b"(" + _nstring(part.disposition.value) + b" " + _params(part.disposition.params) + b")"
    return [disposition, _list([_nstring(tag) for tag in part.language]), _nstring(part.location)]


# -- sections -------------------------------------------------------------


def find_part(structure: MessageStructure, numbers: tuple[int, ...]) -> BodyPart | None:
    """The part a section-part names (RFC 9051 §6.4.5), or None.

    A multipart's part n is its n-th child. A message (the root or one
    encapsulated in message/rfc822) that is not multipart has only part 1,
    its body. Numbers after a message/rfc822 part go into its message.
    """
    part, in_message = structure.root, True
    for position, number in enumerate(numbers):
        if part.is_multipart:
            if number > len(part.parts):
                return None
            part = part.parts[number - 1]
        elif not (in_message and number == 1):
            return None
        in_message = False
        if part.is_message and position + 1 < len(numbers):
            part, in_message = part.parts[0], True
    return part


def section_content(data: bytes, structure: MessageStructure, section: Section) -> bytes:
    """The bytes of BODY[section], before any partial range; b"" if it does not exist."""
    if not section.part:
        return _message_section(data, structure.root, section) if section.text else data
    part = find_part(structure, section.part)
    if part is None:
        return b""
    if section.text is None:
        return data[part.header_end:part.body_end]
    if section.text == "MIME":
        return _header_section(data[part.header_start:part.header_end], section)
    if not part.is_message:  # HEADER and TEXT exist only for messages
        return b""
    return _message_section(data, part.parts[0], section)


def _message_section(data: bytes, message: BodyPart, section: Section) -> bytes:
    if section.text == "TEXT":
        return data[message.header_end:message.body_end]
    return _header_section(data[message.header_start:message.header_end], section)


def _header_section(header: bytes, section: Section) -> bytes:
    if section.text not in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        return header
    fields, blank = _split_header(header)
    # RFC 9051 §6.4.5: matching is case-insensitive; the blank line is kept.
    wanted = {name.lower().encode("ascii") for name in section.fields}
    keep = section.text == "HEADER.FIELDS"
    return b"".join(raw for name, raw in _header_fields(fields) if (name in wanted) == keep) + blank


def _split_header(header: bytes) -> tuple[bytes, bytes]:
    """The header's fields and its closing blank line (b"" when it has none)."""
    if header in (b"\n", b"\r\n"):
        return b"", header
    for blank in (b"\r\n", b"\n"):
        if header.endswith(b"\n" + blank):
            return header[: -len(blank)], blank
    return header, b""


_HEADER_LINE = re.compile(rb"[^\n]*\n|[^\n]+")
_FIELD_NAME = re.compile(rb"([^:\s]+)[ \t]*:")


def _header_fields(fields: bytes) -> list[tuple[bytes, bytes]]:
    """Each field with its continuation lines, as (lower-case name, raw bytes); b"" names a line without one."""
    result: list[tuple[bytes, bytes]] = []
    for line in _HEADER_LINE.findall(fields):
        if line[:1] in (b" ", b"\t") and result:
            name, raw = result[-1]
            result[-1] = (name, raw + line)
            continue
        match = _FIELD_NAME.match(line)
        result.append((match.group(1).lower() if match else b"", line))
    return result


def binary_content(data: bytes, structure: MessageStructure, numbers: tuple[int, ...]) -> bytes:
    """BINARY[part] (RFC 3516 §4.2): the part's body with its transfer encoding undone.

    Raises UnknownCte for an encoding that cannot be undone.
    """
    if not numbers:
        root = structure.root
        if root.is_multipart or root.is_message:
            return data
        return data[:root.header_end] + decode_transfer(data[root.header_end:root.body_end], root.encoding)
    part = find_part(structure, numbers)
    if part is None:
        return b""
    body = data[part.header_end:part.body_end]
    if part.is_multipart or part.is_message:
        return body
    return decode_transfer(body, part.encoding)


# -- FETCH items ----------------------------------------------------------

_STRUCTURE_ONLY = frozenset({FetchItem.ENVELOPE, FetchItem.BODY, FetchItem.BODYSTRUCTURE, FetchItem.RFC822_SIZE})
_SETS_SEEN = frozenset({FetchItem.RFC822, FetchItem.RFC822_TEXT})
_RFC822_SECTIONS = {
    FetchItem.RFC822: Section(),
    FetchItem.RFC822_HEADER: Section(text="HEADER"),
    FetchItem.RFC822_TEXT: Section(text="TEXT"),
}


def needs_data(attribute: FetchAttribute) -> bool:
    """Whether rendering `attribute` needs the message bytes, not just its structure."""
    return attribute not in _STRUCTURE_ONLY


def needs_structure(attribute: FetchAttribute) -> bool:
    """Whether rendering `attribute` needs the message's structure: all but its whole bytes."""
    if isinstance(attribute, FetchBody):
        return attribute.binary or bool(attribute.section.part) or attribute.section.text is not None
    return attribute is not FetchItem.RFC822


def sets_seen(attribute: FetchAttribute) -> bool:
    """RFC 9051 §6.4.5: BODY[...], BINARY[...], RFC822 and RFC822.TEXT set \\Seen; .PEEK does not."""
    if isinstance(attribute, FetchBody):
        return not attribute.peek
    return attribute in _SETS_SEEN


def render_fetch_item(data: bytes | None, structure: MessageStructure | None, attribute: FetchAttribute) -> bytes:
    """One FETCH response item for a message-content attribute, e.g. b'RFC822.SIZE 42'.

    `data` may be None when `needs_data(attribute)` is false, `structure` when
    `needs_structure(attribute)` is. FLAGS, UID, INTERNALDATE and MODSEQ are
    the session's: they raise ValueError here.
    Raises UnknownCte for BINARY of a part in an unknown transfer encoding.
    """
    if data is None and needs_data(attribute):
        raise ValueError(f"{attribute} needs the message data")
    if structure is None and needs_structure(attribute):
        raise ValueError(f"{attribute} needs the message structure")
    if isinstance(attribute, FetchBody):
        return _fetch_body(data or b"", structure, attribute)
    if attribute is FetchItem.RFC822:
        return b"RFC822 " + _literal(_without_nul(data or b""))
    assert structure is not None  # needs_structure(attribute)
    if isinstance(attribute, FetchBinarySize):
        size = len(binary_content(data or b"", structure, attribute.part))
        return b"BINARY.SIZE[%s] %d" % (_part_numbers(attribute.part), size)
    if attribute is FetchItem.ENVELOPE:
        return b"ENVELOPE " + render_envelope(structure)
    if attribute in (FetchItem.BODY, FetchItem.BODYSTRUCTURE):
        return _name(attribute) + b" " + render_bodystructure(structure, attribute is FetchItem.BODYSTRUCTURE)
    if attribute is FetchItem.RFC822_SIZE:
        return b"RFC822.SIZE %d" % structure.size
    if attribute in _RFC822_SECTIONS:
        content = section_content(data or b"", structure, _RFC822_SECTIONS[attribute])
        return _name(attribute) + b" " + _literal(_without_nul(content))
    raise ValueError(f"{attribute} is not message content")


def _name(item: FetchItem) -> bytes:
    return f"{item.value}".encode("ascii")


def _fetch_body(data: bytes, structure: MessageStructure | None, item: FetchBody) -> bytes:
    if structure is None:  # the whole message (needs_structure)
        content = _without_nul(data)
    elif item.binary:
        content = binary_content(data, structure, item.section.part)
    else:
        content = _without_nul(section_content(data, structure, item.section))
    label = b"%s[%s]" % (b"BINARY" if item.binary else b"BODY", _section_spec(item.section))
    if item.partial is not None:
        origin, length = item.partial
        content = content[origin:origin + length]
        label += b"<%d>" % origin
    return label + b" " + _literal(content, binary=item.binary and b"\0" in content)


def _without_nul(content: bytes) -> bytes:
    return content.replace(b"\0", b"\x80") if b"\0" in content else content


def _part_numbers(numbers: tuple[int, ...]) -> bytes:
    return ".".join(str(number) for number in numbers).encode("ascii")


_ATOM = re.compile(r'[^(){ %*"\\\]\x00-\x1f\x7f-\uffff]+')  # RFC 9051 §9 ATOM-CHAR


def _section_spec(section: Section) -> bytes:
    """The section as a response label repeats it (RFC 9051 §7.5.2), upper case like Dovecot."""
    spec = ".".join(filter(None, (_part_numbers(section.part).decode(), section.text or "")))
    if section.text in ("HEADER.FIELDS", "HEADER.FIELDS.NOT"):
        names = [name if _ATOM.fullmatch(name) else _nstring(name).decode() for name in map(str.upper, section.fields)]
        spec += " (" + " ".join(names) + ")"
    return spec.encode("ascii")
