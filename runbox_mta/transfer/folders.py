"""What a source path holds, which mailbox each of its folders goes to, and where export writes.

A source is a Maildir (with Maildir++ subfolders), one mbox file (its folder
is named after the file, less ".mbox": "Sent.mbox" goes to Sent, a spool
file /var/mail/alice to "alice"), or a directory of mbox files as `export`
writes it: one "NAME.mbox" per mailbox, children of NAME in the directory
NAME/, so "Archive/2024" is Archive/2024.mbox. In file names "%" and a
leading "." are percent-escaped, so no name becomes a hidden file, "." or "..".

Folders named like a special-use mailbox (Sent, "Sent Items", Trash, Spam
...) go to the account's mailbox with that attribute (RFC 6154) instead of
a second one beside it; INBOX stays INBOX.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from runbox_mta.errors import RunboxError
from runbox_mta.store.names import HIERARCHY_DELIMITER, normalise_mailbox_name
from runbox_mta.transfer.maildir import is_maildir, maildir_folders, read_maildir
from runbox_mta.transfer.mbox import is_mbox, read_mbox
from runbox_mta.transfer.messages import SourceMessage

MBOX_SUFFIX = ".mbox"
# Names clients and servers give special-use folders (Dovecot, Thunderbird,
# Apple Mail, Outlook), matched case-insensitively on the top-level name.
WELL_KNOWN = {
    "sent": "\\Sent", "sent messages": "\\Sent", "sent items": "\\Sent", "sent mail": "\\Sent",
    "drafts": "\\Drafts", "draft": "\\Drafts",
    "trash": "\\Trash", "deleted messages": "\\Trash", "deleted items": "\\Trash",
    "junk": "\\Junk", "spam": "\\Junk", "junk e-mail": "\\Junk", "junk email": "\\Junk",
    "archive": "\\Archive", "archives": "\\Archive",
}


@dataclass(frozen=True)
class SourceFolder:
    name: tuple[str, ...]  # hierarchy levels, as the source names them
    location: Path
    reader: Callable[[Path], Iterator[SourceMessage]]

    @property
    def label(self) -> str:
        return HIERARCHY_DELIMITER.join(self.name)

    def messages(self) -> Iterator[SourceMessage]:
        return self.reader(self.location)


@dataclass(frozen=True)
class Source:
    folders: tuple[SourceFolder, ...]
    skipped: tuple[Path, ...]  # files in an mbox directory that are not mbox files


def open_source(path: Path) -> Source:
    """The folders at `path`; RunboxError if it is none of the three kinds."""
    if not path.exists():
        raise RunboxError(f"{path}: no such file or directory")
    if path.is_dir() and is_maildir(path):
        return Source(tuple(SourceFolder(name, directory, read_maildir)
                            for name, directory in maildir_folders(path)), ())
    if path.is_dir():
        source = _mbox_directory(path)
        if source.folders:
            return source
    elif path.is_file() and is_mbox(path):
        return Source((SourceFolder((_file_folder(path.name),), path, read_mbox),), ())
    raise RunboxError(f"{path} is not a Maildir, an mbox file or a directory of mbox files")


def target_name(name: tuple[str, ...], special_uses: Mapping[str, str]) -> str:
    """The account's mailbox for a source folder; `special_uses` maps "\\Sent" to its mailbox name."""
    top = special_uses.get(WELL_KNOWN.get(name[0].lower(), ""), name[0])
    return normalise_mailbox_name(HIERARCHY_DELIMITER.join((top, *name[1:])))


def export_file(root: Path, mailbox: str) -> Path:
    parts = [_escape(part) for part in mailbox.split(HIERARCHY_DELIMITER)]
    return root.joinpath(*parts[:-1], parts[-1] + MBOX_SUFFIX)


def _mbox_directory(root: Path) -> Source:
    folders, skipped = [], []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file():
            continue
        if is_mbox(path) or (path.suffix == MBOX_SUFFIX and path.stat().st_size == 0):
            name = (*(unquote(part) for part in relative.parts[:-1]), _file_folder(path.name))
            folders.append(SourceFolder(name, path, read_mbox))
        else:
            skipped.append(relative)
    return Source(tuple(folders), tuple(skipped))


def _file_folder(file_name: str) -> str:
    return unquote(file_name.removesuffix(MBOX_SUFFIX) or file_name)


def _escape(part: str) -> str:
    part = part.replace("%", "%25")
    return "%2E" + part[1:] if part.startswith(".") else part
