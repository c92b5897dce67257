"""Logging to stderr, with the privacy rule built in (SPEC §7).

Logs record events and errors, never message contents or correspondents, and
client addresses only when the operator has turned debug logging on. Code that
wants to mention a client calls `client_label(address)` instead of formatting
the address itself, so the rule lives in one place.
"""

from __future__ import annotations

import logging
import os
import sys

_debug = False


def setup_logging(level: str) -> None:
    """Send log records to stderr; journald adds its own timestamps under systemd."""
    global _debug
    _debug = level == "debug"
    under_journald = "JOURNAL_STREAM" in os.environ
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not under_journald:
        fmt = "%(asctime)s " + fmt
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # Library chatter (aiosmtpd logs every peer address at INFO) breaks the
    # no-traffic-logs promise; only debug mode lets it through.
    for noisy in ("mail.log", "aiosqlite", "asyncio", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if _debug else logging.WARNING)


def client_label(address: object) -> str:
    """The client's address in debug mode, else a placeholder that identifies no one."""
    return str(address) if _debug else "[client]"
