"""The header text SEARCH matches, made once when a message is stored.

SEARCH FROM, SUBJECT, HEADER and TEXT compare case-insensitively with the
decoded text of header fields (RFC 9051 §6.4.4). Parsing every message's
header with the email package for each SEARCH cost about a millisecond a
message, so the store keeps this form beside the bytes (blobs.search_header)
and a key is one regular expression over it, as Dovecot's index cache keeps
the fields it has searched.

The form: one line per header field, "name:value", unfolded, encoded words
(RFC 2047) decoded, line breaks and NUL inside a value replaced, all of it
casefolded. Like `encoding`, it is total: any bytes give a string.
"""

from __future__ import annotations

import binascii
import re
from functools import lru_cache

from runbox_mta.imap.encoding import decode_base64, header_text

# RFC 5322 §2.1: the header ends at the first empty line. CRLF is canonical; a bare
# LF is tolerated because IMAP APPEND and imports bring what they bring.
_EMPTY_LINE = re.compile(rb"(?:^|\n)\r?\n")
_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# RFC 2047 §2 encoded-word; the whitespace between two adjacent ones is not text (§6.2).
_ENCODED_WORD = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")
_BETWEEN_WORDS = re.compile(r"(\?=)[ \t]+(?==\?)")


def header_end(data: bytes) -> int:
    """Offset just past the header and its terminating empty line (all of `data` if none)."""
    match = _EMPTY_LINE.search(data)
    return match.end() if match else len(data)


def searchable_header(data: bytes) -> str:
    """The message's header in the form SEARCH matches (see the module's docstring)."""
    lines = []
    for line in _FOLD.sub(b"", data[:header_end(data)]).split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon and name.strip():
            lines.append(f"{header_text(name)}:{decode_words(header_text(value))}")
    return "\n".join(lines).casefold()


def decode_words(text: str) -> str:
    """`text` with its RFC 2047 encoded words decoded; a word in an unknown charset or
    encoding is decoded as UTF-8 with replacement rather than left out."""
    if "=?" not in text:
        return text
    return _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub(r"\1", text))


def _decode_word(match: re.Match[str]) -> str:
    charset, encoding, payload = match.groups()
    raw = payload.encode("ascii", "replace")
    octets = decode_base64(raw) if encoding in "bB" else binascii.a2b_qp(raw, header=True)
    try:
        decoded = octets.decode(charset, "replace")
    except LookupError:
        decoded = octets.decode("utf-8", "replace")
    return decoded.replace("\0", "\ufffd").replace("\r", " ").replace("\n", " ")


def field_contains(searchable: str, field: str, value: str) -> bool:
    """Whether a `field` line of a `searchable_header` contains `value` (any, if empty)."""
    return _field_pattern(field.casefold(), value.casefold()).search(searchable) is not None


def field_values(searchable: str, field: str) -> list[str]:
    """The values of every `field` line of a `searchable_header`, casefolded."""
    return _field_pattern(field.casefold(), None).findall(searchable)


@lru_cache(maxsize=256)
def _field_pattern(field: str, value: str | None) -> re.Pattern[str]:
    if value is None:
        return re.compile(f"^{re.escape(field)}:(.*)$", re.M)
    return re.compile(f"^{re.escape(field)}:.*?{re.escape(value)}", re.M)
