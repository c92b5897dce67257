"""Errors that reach an operator as one line of text.

Anything derived from `RunboxError` is an expected failure (a bad config key,
an unknown account, an unreadable certificate): the CLI prints its message on
one line and exits 1. Any other exception is a bug and keeps its traceback.
"""


class RunboxError(Exception):
    """An expected, operator-facing failure; str(error) is the whole story."""


class ConfigError(RunboxError):
    """The configuration file is missing, unparsable or has a bad key/value."""


class NotFound(RunboxError):
    """A named domain, account, alias, app password or queue entry does not exist."""


class AlreadyExists(RunboxError):
    """A domain, account, alias or app-password label is already taken."""


class SchemaOutOfDate(RunboxError):
    """The database schema is older (or newer) than this build expects."""
