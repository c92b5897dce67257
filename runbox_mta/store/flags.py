"""How message flags are stored: system flags as bits, keywords as text.

System flags are a fixed set (RFC 9051 §2.3.2) matched case-insensitively and
stored as bits of messages.system_flags; keywords are kept as given, sorted
and space separated in messages.keywords (an IMAP atom cannot contain a space).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

# The system flags that persist (\Recent is per session, and gone in IMAP4rev2).
SYSTEM_FLAGS = {"\\Seen": 1, "\\Answered": 2, "\\Flagged": 4, "\\Deleted": 8, "\\Draft": 16}
_SYSTEM_FLAG_BITS = {name.lower(): bit for name, bit in SYSTEM_FLAGS.items()}


def encode_flags(flags: Iterable[str]) -> tuple[int, str]:
    """(system flag bits, keywords text); ValueError for what cannot be stored."""
    bits = 0
    keywords: set[str] = set()
    for flag in flags:
        if flag.startswith("\\"):
            bit = _SYSTEM_FLAG_BITS.get(flag.lower())
            if bit is None:
                raise ValueError(f"not a storable system flag: {flag}")
            bits |= bit
        elif not flag or any(char.isspace() for char in flag):
            raise ValueError(f"not a valid keyword: {flag!r}")
        else:
            keywords.add(flag)
    return bits, " ".join(sorted(keywords))


@lru_cache(maxsize=4096)
def decode_flags(bits: int, keywords: str) -> frozenset[str]:
    """Canonical system flag names and the keywords, as one set. A mailbox has few distinct
    combinations and FETCH FLAGS decodes one per message: they are remembered."""
    return frozenset([name for name, bit in SYSTEM_FLAGS.items() if bits & bit] + keywords.split())
