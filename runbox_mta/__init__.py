"""runbox-mta: a privacy-first mail server in one asyncio daemon.

SMTP (MX and submission), outbound delivery, IMAP and POP3 share one
configuration, one TLS context factory, one authentication service and one
SQLAlchemy store. See README.md for operation and ../shared/SPEC.md for the
product specification.
"""

__version__ = "0.1.0"
