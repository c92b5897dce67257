"""App passwords (SPEC §7): generated, one per device, scoped, revocable.

An app password is shown once as four dash-separated groups
(``k7mq-2xwd-pa9e-hn4r``) and hashed in its normalised form
(`normalise_app_password`: no spaces or dashes, lower case), so however the
user types it on a phone (with spaces, with dashes, in capitals) it matches.
Whoever stores a new one must hash ``normalise_app_password(secret)``.
"""

from __future__ import annotations

import secrets

from runbox_mta.errors import RunboxError

# The protocols an app password may be limited to; "smtp" means submission.
SCOPES = ("imap", "pop3", "smtp")

# Lower-case letters and digits without the look-alikes 0/o and 1/l: 32
# symbols, 5 bits each, so 16 symbols carry 80 bits of entropy, out of reach
# of an online (or even an offline) guessing attack.
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"
GROUPS = 4
GROUP_LENGTH = 4
LENGTH = GROUPS * GROUP_LENGTH


def generate_app_password() -> str:
    """A new random app password for display, e.g. ``k7mq-2xwd-pa9e-hn4r``."""
    symbols = "".join(secrets.choice(ALPHABET) for _ in range(LENGTH))
    return "-".join(symbols[i:i + GROUP_LENGTH] for i in range(0, LENGTH, GROUP_LENGTH))


def normalise_app_password(text: str) -> str:
    """The form app passwords are hashed in: separators removed, lower case."""
    return "".join(text.split()).replace("-", "").lower()


def looks_like_app_password(text: str) -> bool:
    """Whether `text`, once normalised, could be a generated app password."""
    normal = normalise_app_password(text)
    return len(normal) == LENGTH and all(symbol in ALPHABET for symbol in normal)


def parse_scopes(text: str) -> tuple[str, ...]:
    """``"imap,pop3"`` -> ``("imap", "pop3")``, in canonical order, without duplicates.

    Raises RunboxError for an empty list or an unknown scope (CLI ``--scope``).
    """
    names = [name.strip().lower() for name in text.split(",")]
    for name in names:
        if name not in SCOPES:
            shown = repr(name) if name else "an empty scope"
            raise RunboxError(f"unknown app password scope {shown}: expected {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in names)
