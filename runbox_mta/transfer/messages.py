"""A message as a source gives it, and the line-end conversions between store and files."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

_BARE_LF = re.compile(rb"(?<!\r)\n")
# IMAP atom characters (RFC 9051 §9 atom-char, ASCII only): what a keyword may be made of.
_KEYWORD = re.compile(r"[^\x00-\x20\x7f(){%*\"\\\]]+")


@dataclass(frozen=True)
class SourceMessage:
    data: bytes  # canonical: CRLF line ends (see `canonical`)
    flags: frozenset[str]
    internal_date: datetime  # timezone-aware, whole seconds


def canonical(data: bytes) -> bytes:
    """CRLF line ends, the last line included: what SMTP delivers and IMAP serves.

    Maildir and mbox files normally use LF; a last line without a line end
    gets one because mbox cannot represent its absence (RFC 4155 §2), so
    this is also what keeps import -> export -> import byte-exact.
    """
    data = _BARE_LF.sub(b"\r\n", data)
    return data + b"\r\n" if data and not data.endswith(b"\r\n") else data


def to_lf(data: bytes) -> bytes:
    """CRLF -> LF, the line end of mbox files written here."""
    return data.replace(b"\r\n", b"\n")


def is_keyword(word: str) -> bool:
    """Could this be an IMAP keyword? Sources carry labels that cannot (spaces, brackets)."""
    return word.isascii() and bool(_KEYWORD.fullmatch(word)) and not word.startswith("\\")
