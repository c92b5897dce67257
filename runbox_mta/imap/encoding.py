"""The lexical layer under `mime` and `fetch`: header field text, MIME
parameters, address lists and content transfer encodings.

Everything here is pure and total: any input yields a value, never an
exception (except `decode_transfer` on an encoding it does not know, which
IMAP reports as NO [UNKNOWN-CTE]). Real mail breaks every rule, and one
broken header must not make a message unreadable.

Decisions:

- Header bytes are UTF-8 when they decode as such (RFC 6532), otherwise
  Latin-1, the usual legacy 8-bit charset. Either way the result is valid
  Unicode, so it fits a JSON column and an IMAP4rev2 string; NUL becomes
  U+FFFD because no IMAP string may carry it (RFC 9051 §4.3).
- Encoded words (RFC 2047) stay encoded: IMAP returns header text as the
  message has it and clients decode (Dovecot does the same).
- RFC 2231 parameters are merged as Dovecot merges them: continuations are
  joined and an extended value keeps its charset'language'%XX form under
  the name with a trailing "*" (e.g. "filename*" "utf-8''na%C3%AFve.txt"),
  which is what MIME libraries in clients decode.
"""

from __future__ import annotations

import binascii
import re
from typing import NamedTuple

# RFC 5322 §2.2.3: unfolding removes each CRLF that is followed by WSP.
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
_WHITESPACE = re.compile(r"[ \t\r\n]+")


def header_text(raw: bytes) -> str:
    """A header field body as text: unfolded, trimmed, decoded, without NUL."""
    value = _FOLD.sub(b"", raw).strip(b" \t\r\n")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        text = value.decode("latin-1")
    return text.replace("\0", "\ufffd").replace("\r", " ").replace("\n", " ")


def for_humans(text: str) -> str:
    """Whitespace runs collapsed to one space, as Dovecot shows subjects and names."""
    return _WHITESPACE.sub(" ", text).strip()


# -- comments and MIME parameters (RFC 2045 §5.1, RFC 2231) ----------------

_INNER_COMMENT = re.compile(r"\((?:[^()\\]|\\.)*\)", re.S)
_MAX_COMMENT_NESTING = 10  # deeper nesting is left as text rather than cost quadratic time
# One ";"-separated segment; a quoted string may hide ";" (an unterminated one runs to the end).
_SEGMENT = re.compile(r'(?:"(?:[^"\\]|\\.)*"?|[^;"])+', re.S)
_QUOTED_VALUE = re.compile(r'"((?:[^"\\]|\\.)*)"?', re.S)
_ESCAPED = re.compile(r"\\(.)", re.S)
_PARAM_NAME = re.compile(r'[^\s()<>@,;:\\"/\[\]?=]+')
_CONTINUATION = re.compile(r"(?P<base>[^*]+)\*(?:(?P<number>[0-9]{1,4})(?P<extended>\*)?)?")

Params = tuple[tuple[str, str], ...]


def strip_comments(text: str) -> str:
    """Text without RFC 5322 comments (for values that cannot contain quoted strings)."""
    for _ in range(_MAX_COMMENT_NESTING):
        stripped = _INNER_COMMENT.sub(" ", text)
        if stripped == text:
            break
        text = stripped
    return text.strip()


def parse_mime_value(text: str) -> tuple[str, Params]:
    """Content-Type or Content-Disposition: the leading value and its parameters.

    Lenient: a parameter without "=" or with an invalid name is skipped, an
    unquoted value runs to the next ";" (senders put spaces and "=" there).
    """
    segments = _SEGMENT.findall(text)
    if not segments:
        return "", ()
    plain: list[tuple[str, str]] = []
    for segment in segments[1:]:
        name, equals, value = segment.partition("=")
        name = name.strip()
        if equals and _PARAM_NAME.fullmatch(name):
            plain.append((name, _param_value(value.strip())))
    return strip_comments(segments[0]), _merge_rfc2231(plain)


def _param_value(value: str) -> str:
    if value.startswith('"'):
        match = _QUOTED_VALUE.match(value)
        assert match is not None  # the pattern matches any string that starts with a quote
        return _ESCAPED.sub(r"\1", match.group(1))
    return value


class _Section(NamedTuple):  # one piece of an RFC 2231 parameter: name*number[*]
    base: str
    number: int
    extended: bool
    value: str


def _merge_rfc2231(params: list[tuple[str, str]]) -> Params:
    """RFC 2231 §3-4: join name*0, name*1... into one parameter; plain ones keep their order."""
    plain: list[tuple[str, str]] = []
    sections: dict[str, list[_Section]] = {}
    for name, value in params:
        match = _CONTINUATION.fullmatch(name)
        if match is None:
            plain.append((name, value))
            continue
        number, extended = match["number"], match["extended"] is not None or match["number"] is None
        section = _Section(match["base"], int(number or 0), extended, value)
        sections.setdefault(section.base.lower(), []).append(section)
    merged = [pair for key in sorted(sections) for pair in _join_sections(sorted(sections[key], key=_number))]
    return tuple(plain + merged)


def _number(section: _Section) -> int:
    return section.number


def _join_sections(sections: list[_Section]) -> list[tuple[str, str]]:
    if [section.number for section in sections] != list(range(len(sections))):
        # Missing or repeated numbers: not a usable continuation, keep the pieces as sent.
        return [(f"{s.base}*{s.number}{'*' if s.extended else ''}", s.value) for s in sections]
    if not any(section.extended for section in sections):
        return [(sections[0].base, "".join(section.value for section in sections))]
    # The joined value is in extended form, so plain pieces must have "%" escaped, and
    # an unextended first piece gets the empty charset'language' prefix (RFC 2231 §4.1).
    value = "" if sections[0].extended else "''"
    value += "".join(s.value if s.extended else s.value.replace("%", "%25") for s in sections)
    return [(sections[0].base + "*", value)]


# -- address lists (RFC 5322 §3.4) -----------------------------------------


class Token(NamedTuple):
    kind: str  # "atom", "quoted", "literal", "comment" or "special"
    text: str  # quoted strings and comments without delimiters and escapes
    space: bool  # whitespace or a comment came before it


_TOKEN = re.compile(
    r"""(?P<space>[ \t\r\n]+)
      | (?P<quoted>"(?:[^"\\]|\\.?)*"?)
      | (?P<literal>\[(?:[^\]\\]|\\.)*\]?)
      | (?P<atom>[^()<>\[\]:;@\\,."\s]+)
      | (?P<special>.)""",
    re.X | re.S,
)

# RFC 3501 §7.4.2: a NIL host name marks a group, so a plain address cannot have
# one; like Dovecot, a missing part becomes a placeholder the user can see.
MISSING_MAILBOX = "MISSING_MAILBOX"
MISSING_DOMAIN = "MISSING_DOMAIN"

AddressTuple = tuple[str | None, str | None, str | None, str | None]  # name, route, mailbox, host
GROUP_END: AddressTuple = (None, None, None, None)


def tokenize(text: str) -> list[Token]:
    """RFC 5322 §3.2 lexical tokens; comments nest, unterminated quotes run to the end."""
    tokens: list[Token] = []
    position, space = 0, False
    while position < len(text):
        if text[position] == "(":
            comment, position = _comment(text, position)
            tokens.append(Token("comment", comment, space))
            space = True
            continue
        match = _TOKEN.match(text, position)
        assert match is not None  # the last alternative matches any character
        position = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind == "space":
            space = True
            continue
        value = match.group()
        if kind == "quoted":
            value = _ESCAPED.sub(r"\1", value[1:-1] if len(value) > 1 and value.endswith('"') else value[1:])
        tokens.append(Token(kind, value, space))
        space = False
    return tokens


def _comment(text: str, start: int) -> tuple[str, int]:
    """The text of the comment opening at `start`, nested ones included, and where it ends."""
    depth, position, chars = 1, start + 1, []
    while position < len(text):
        char = text[position]
        position += 1
        if char == "\\" and position < len(text):
            char = text[position]
            position += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                break
        chars.append(char)
    return "".join(chars), position


def parse_addresses(text: str) -> tuple[AddressTuple, ...]:
    """An address list as IMAP envelope addresses, groups as start/end markers.

    Never fails: text that is no address still yields one, with the parts
    that could not be found set to MISSING_MAILBOX / MISSING_DOMAIN.
    """
    result: list[AddressTuple] = []
    current: list[Token] = []
    in_angle = in_group = False
    for token in tokenize(text):
        char = token.text if token.kind == "special" else ""
        if char == "<":
            in_angle = True
        elif char == ">":
            in_angle = False
        elif char == "," and not in_angle:
            _flush(current, result)
            continue
        elif char == ":" and not in_angle and not in_group and _is_phrase(current):
            result.append((None, None, _phrase(current) or "", None))
            current, in_group = [], True
            continue
        elif char == ";" and not in_angle and in_group:
            _flush(current, result)
            result.append(GROUP_END)
            in_group = False
            continue
        current.append(token)
    _flush(current, result)
    if in_group:  # an unterminated group still needs its end marker
        result.append(GROUP_END)
    return tuple(result)


def _is_phrase(tokens: list[Token]) -> bool:
    return all(token.kind != "special" or token.text == "." for token in tokens)


def _flush(tokens: list[Token], result: list[AddressTuple]) -> None:
    if any(token.kind != "comment" for token in tokens):
        result.append(_mailbox(tokens))
    tokens.clear()


def _mailbox(tokens: list[Token]) -> AddressTuple:
    specials = [token.text if token.kind == "special" else "" for token in tokens]
    if "<" not in specials:
        comments = [token.text for token in tokens if token.kind == "comment"]
        name = for_humans(comments[-1]) if comments else None  # "user@host (Real Name)"
        mailbox, host = _addr_spec([token for token in tokens if token.kind != "comment"])
        return name or None, None, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN
    start = specials.index("<")
    end = specials.index(">", start) if ">" in specials[start:] else len(tokens)
    inner = [token for token in tokens[start + 1:end] if token.kind != "comment"]
    route = None
    if inner and inner[0].text == "@" and inner[0].kind == "special":
        colon = next((i for i, token in enumerate(inner) if token.kind == "special" and token.text == ":"), None)
        if colon is not None:
            route = "".join(token.text for token in inner[:colon])
            inner = inner[colon + 1:]
    mailbox, host = _addr_spec(inner)
    return _phrase(tokens[:start]), route, mailbox or MISSING_MAILBOX, host or MISSING_DOMAIN


def _addr_spec(tokens: list[Token]) -> tuple[str, str]:
    at = next((i for i, token in enumerate(tokens) if token.kind == "special" and token.text == "@"), None)
    if at is None:
        return _words(tokens), ""
    return _words(tokens[:at]), "".join(token.text for token in tokens[at + 1:])


def _words(tokens: list[Token]) -> str:
    """A local part or domain: dot-separated words, spaces around dots dropped (RFC 5322 §4.4)."""
    text = ""
    previous_dot = True
    for token in tokens:
        if token.kind == "comment":
            continue
        dot = token.kind == "special" and token.text == "."
        if token.space and not dot and not previous_dot:
            text += " "
        text += token.text
        previous_dot = dot
    return text


def _phrase(tokens: list[Token]) -> str | None:
    """A display name: words joined by one space where the sender had any (RFC 5322 §3.2.5)."""
    text = ""
    for token in tokens:
        if token.kind != "comment":
            text += (" " if token.space and text else "") + token.text
    return for_humans(text) or None


# -- content transfer encodings (RFC 2045 §6) ------------------------------


class UnknownTransferEncoding(ValueError):
    """The body's Content-Transfer-Encoding is none IMAP can decode (RFC 3516 §4.2: UNKNOWN-CTE)."""


IDENTITY_ENCODINGS = frozenset({"7bit", "8bit", "binary"})
_BASE64_KEEP = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_BASE64_DROP = bytes(sorted(set(range(256)) - set(_BASE64_KEEP)))


def decode_transfer(data: bytes, encoding: str | None) -> bytes:
    """`data` with its transfer encoding undone; no encoding means 7bit (RFC 2045 §6.1)."""
    name = (encoding or "7bit").lower()
    if name in IDENTITY_ENCODINGS:
        return data
    if name == "base64":
        return decode_base64(data)
    if name == "quoted-printable":
        return binascii.a2b_qp(data)
    raise UnknownTransferEncoding(name)


def decode_base64(data: bytes) -> bytes:
    """Lenient base64 (RFC 2045 §6.8): characters outside the alphabet are ignored
    and each "="-terminated run is decoded on its own, so concatenated encodings
    and missing padding still decode."""
    decoded = []
    for run in data.translate(None, _BASE64_DROP).split(b"="):
        usable = run[: len(run) - 1] if len(run) % 4 == 1 else run  # a lone trailing sextet holds no byte
        if usable:
            decoded.append(binascii.a2b_base64(usable + b"=" * (-len(usable) % 4)))
    return b"".join(decoded)
