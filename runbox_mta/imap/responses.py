"""Server responses on the wire (RFC 9051 §7): status lines, strings, names, flags.

Only this module turns values into IMAP syntax; the session composes lines
from these pieces. Text after a status is ours (never client data), so it
needs no escaping; strings and mailbox names do.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from runbox_mta.imap import utf7

CRLF = b"\r\n"
# RFC 9051 §2.3.2 system flags; \Recent is not settable and gone in IMAP4rev2.
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")


def tagged(tag: str, status: str, text: str, code: str | None = None) -> bytes:
    """ "tag OK [CODE] text" (RFC 9051 §7.1)."""
    return f"{tag} {status} {'[' + code + '] ' if code else ''}{text}".encode() + CRLF


def untagged(text: str | bytes) -> bytes:
    return b"* " + (text.encode() if isinstance(text, str) else text) + CRLF


def status(name: str, text: str, code: str | None = None) -> bytes:
    """An untagged status response: "* OK [CODE] text"."""
    return untagged(f"{name} {'[' + code + '] ' if code else ''}{text}")


def quoted(value: str) -> str:
    """A quoted string (RFC 9051 §4.3); callers pass no CR or LF."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def mailbox_name(name: str, utf8: bool) -> str:
    """A mailbox name as the client expects it: UTF-8 after ENABLE (RFC 6855 §3), else modified UTF-7."""
    return quoted(name if utf8 else utf7.encode(name))


def flag_list(flags: Iterable[str]) -> str:
    """System flags first in their usual order, then keywords sorted: stable transcripts."""
    return _flag_list(flags if isinstance(flags, frozenset) else frozenset(flags))


@lru_cache(maxsize=1024)  # FETCH FLAGS formats the same few sets over and over
def _flag_list(flags: frozenset[str]) -> str:
    ordered = [flag for flag in SYSTEM_FLAGS if flag in flags] + sorted(flags - set(SYSTEM_FLAGS))
    return "(" + " ".join(ordered) + ")"
