"""Reading Maildir folders as Dovecot writes them.

- A folder is a directory with cur/ and new/ (tmp/ holds deliveries in
  progress and is ignored). The root is INBOX; Maildir++ subfolders are
  ".Name.Sub" directories beside cur/, "." separating hierarchy levels, names
  in modified UTF-7 unless Dovecot was told to write UTF-8.
- A file's info suffix ":2,FLAGS" holds the flags (https://cr.yp.to/proto/maildir.html):
  D F P R S T standard, lowercase a-z Dovecot keywords numbered by the
  folder's dovecot-keywords file ("0 $Label1" means "a"). Files in new/ are
  unseen mail; \\Recent is per session here, so nothing else to carry.
- The internal date is the file's mtime, as Dovecot keeps it (copy maildirs
  with `cp -a` or `rsync -t` to preserve it).
- Messages keep the order Dovecot's clients saw: by UID in the folder's
  dovecot-uidlist, then (files it does not list, or no such file) by the
  timestamp that starts Maildir file names, then by name.

The stdlib `mailbox.Maildir` is not used: it lists messages in directory
order, and its flag and folder handling is the few lines below anyway.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from runbox_mta.imap import utf7
from runbox_mta.transfer.messages import SourceMessage, canonical, is_keyword

# Maildir flag letters; "P" (passed) has no IMAP flag, Dovecot maps it to $Forwarded.
FLAGS = {"D": "\\Draft", "F": "\\Flagged", "P": "$Forwarded", "R": "\\Answered", "S": "\\Seen",
         "T": "\\Deleted"}
KEYWORDS_FILE = "dovecot-keywords"
UIDLIST_FILE = "dovecot-uidlist"
INFO_SEPARATOR = ":2,"
_LEADING_NUMBER = re.compile(r"\d+")


def is_maildir(path: Path) -> bool:
    return (path / "cur").is_dir() and (path / "new").is_dir()


def maildir_folders(root: Path) -> list[tuple[tuple[str, ...], Path]]:
    """(name components, directory) of INBOX (the root) and each Maildir++ subfolder."""
    folders: list[tuple[tuple[str, ...], Path]] = [(("INBOX",), root)]
    for entry in sorted(root.iterdir()):
        parts = entry.name[1:].split(".")
        if entry.name.startswith(".") and all(parts) and is_maildir(entry):
            folders.append((tuple(_folder_name(part) for part in parts), entry))
    return folders


def read_maildir(folder: Path) -> Iterator[SourceMessage]:
    keywords = read_keywords(folder / KEYWORDS_FILE)
    uids = read_uidlist(folder / UIDLIST_FILE)
    entries = [entry for sub in ("cur", "new") for entry in os.scandir(folder / sub)
               if not entry.name.startswith(".") and entry.is_file()]
    entries.sort(key=lambda entry: _source_order(entry.name, uids))
    for entry in entries:
        _, separator, letters = entry.name.partition(INFO_SEPARATOR)
        when = datetime.fromtimestamp(int(entry.stat().st_mtime), UTC)
        with open(entry.path, "rb") as file:
            data = file.read()
        yield SourceMessage(canonical(data), parse_flags(letters, keywords) if separator else frozenset(), when)


def parse_flags(letters: str, keywords: dict[str, str]) -> frozenset[str]:
    """The flags of a ":2," info suffix; unknown letters are dropped."""
    return frozenset(FLAGS.get(letter) or keywords[letter] for letter in letters
                     if letter in FLAGS or letter in keywords)


def read_keywords(path: Path) -> dict[str, str]:
    """Dovecot's dovecot-keywords: "N name" lines, keyword N being the letter chr(ord("a") + N)."""
    try:
        text = path.read_text("utf-8", errors="replace")
    except FileNotFoundError:
        return {}
    keywords = {}
    for line in text.splitlines():
        number, _, name = line.strip().partition(" ")
        if number.isdigit() and int(number) < 26 and is_keyword(name):
            keywords[chr(ord("a") + int(number))] = name
    return keywords


def read_uidlist(path: Path) -> dict[str, int]:
    """Dovecot's dovecot-uidlist: a header line, then "UID [EXTENSIONS] :BASENAME" per message."""
    try:
        lines = path.read_text("utf-8", errors="replace").splitlines()[1:]
    except FileNotFoundError:
        return {}
    uids = {}
    for line in lines:
        uid, _, rest = line.partition(" ")
        _, colon, name = rest.partition(":")
        if uid.isdigit() and colon:
            uids[name.partition(INFO_SEPARATOR)[0]] = int(uid)
    return uids


def _folder_name(part: str) -> str:
    try:
        return utf7.decode(part)
    except utf7.Utf7Error:
        return part  # Dovecot with UTF-8 folder names, or a hand-made folder


def _source_order(name: str, uids: dict[str, int]) -> tuple[int, int, str]:
    uid = uids.get(name.partition(INFO_SEPARATOR)[0])
    if uid is not None:
        return (0, uid, name)
    match = _LEADING_NUMBER.match(name)
    return (1, int(match.group()) if match else 2**63, name)
