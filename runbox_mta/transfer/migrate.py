"""Import and export through the store: the only part of transfer/ that touches it.

Reports name folders and count messages; they never name correspondents
(SPEC §7: no mail content or correspondents in output an operator may log).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

from runbox_mta.errors import RunboxError
from runbox_mta.store.transfer import ImportMessage, StoredMessage
from runbox_mta.transfer.folders import SourceFolder, export_file, open_source, target_name
from runbox_mta.transfer.mbox import mbox_entry
from runbox_mta.transfer.messages import SourceMessage

if TYPE_CHECKING:
    from runbox_mta.store import Store

T = TypeVar("T")

# One batch is one transaction: a few hundred messages amortise the commit
# while bounding how long the mailbox row stays locked and how much is held
# in memory (a byte bound too, for folders of large messages).
BATCH_MESSAGES = 250
BATCH_BYTES = 32 * 1024 * 1024


async def import_path(store: Store, address: str, path: Path, report: Callable[[str], None]) -> None:
    """Import every folder at `path` into the account; RunboxError (after reporting) at its quota."""
    account = await store.get_account(address)
    source = await asyncio.to_thread(_guarded, path, open_source, path)
    special_uses = {box.special_use: box.name for box in await store.list_mailboxes(account.id)
                    if box.special_use}
    for skipped in source.skipped:
        report(f"skipped {skipped}: not an mbox file")
    for folder in source.folders:
        name = target_name(folder.name, special_uses)
        mailbox_id = await store.ensure_mailbox(account.id, name)
        imported = duplicates = 0
        messages = folder.messages()
        while batch := await asyncio.to_thread(_guarded, folder.location, _next_batch, messages):
            result = await store.import_messages(mailbox_id, [
                ImportMessage(message.data, message.flags, message.internal_date) for message in batch])
            imported += len(result.uids)
            duplicates += result.duplicates
            if result.over_quota:
                report(_folder_line(folder, name, imported, duplicates))
                raise RunboxError(f"{account.address} is at its quota: stopped in {name}; "
                                  "the rest of it and later folders were not imported")
        report(_folder_line(folder, name, imported, duplicates))


async def export_path(store: Store, address: str, path: Path, report: Callable[[str], None]) -> None:
    """One mboxrd file per mailbox under `path`, a new or empty directory; files are 0600."""
    account = await store.get_account(address)
    await asyncio.to_thread(_guarded, path, _prepare_directory, path)
    for box in await store.list_mailboxes(account.id):
        file_path = export_file(path, box.name)
        fd = await asyncio.to_thread(_guarded, file_path, _create_private, file_path)
        count = 0
        with os.fdopen(fd, "wb") as file:
            async for batch in store.stored_messages(box.id):
                await asyncio.to_thread(_guarded, file_path, _write_entries, file, batch)
                count += len(batch)
        report(f"{box.name}: {count} message{'s' if count != 1 else ''} exported to {file_path}")


def _next_batch(messages: Iterator[SourceMessage]) -> list[SourceMessage]:
    batch: list[SourceMessage] = []
    size = 0
    for message in islice(messages, BATCH_MESSAGES):
        batch.append(message)
        size += len(message.data)
        if size >= BATCH_BYTES:
            break
    return batch


def _write_entries(file: BinaryIO, batch: list[StoredMessage]) -> None:
    file.write(b"".join(mbox_entry(message.data, message.flags, message.internal_date) for message in batch))


def _folder_line(folder: SourceFolder, name: str, imported: int, duplicates: int) -> str:
    into = name if folder.label == name else f"{folder.label} -> {name}"
    return f"{into}: {imported} imported, {duplicates} already present"


def _prepare_directory(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise RunboxError(f"{path} is not a directory")
    if path.exists() and any(path.iterdir()):
        raise RunboxError(f"{path} is not empty: export into a new or empty directory")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)


def _create_private(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # O_EXCL: never overwrite, even a file that appeared since the directory was checked.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _guarded(path: Path, action: Callable[..., T], *args: Any) -> T:
    """Run file work, turning an OS error into a one-line operator error."""
    try:
        return action(*args)
    except OSError as error:
        raise RunboxError(f"{error.filename or path}: {error.strerror or error}") from None
