"""Authenticated-state mailbox commands (RFC 9051 §6.3): SELECT/EXAMINE, CREATE,
DELETE, RENAME, SUBSCRIBE/UNSUBSCRIBE, LIST/LSUB, STATUS, APPEND.

A mixin of `Session`: it uses the session's `services`, `out`, `state` and
reply helpers. Hierarchy delimiter "/", one personal namespace, INBOX
case-insensitive (the parser already spells it "INBOX").
"""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from runbox_mta.errors import RunboxError
from runbox_mta.imap import commands as c
from runbox_mta.imap.responses import SYSTEM_FLAGS, flag_list, mailbox_name, status, untagged
from runbox_mta.imap.sequence import format_uid_set
from runbox_mta.imap.session_state import Authenticated, MailboxView, Refused, Selected
from runbox_mta.store.api import Mailbox
from runbox_mta.store.names import HIERARCHY_DELIMITER, INBOX

if TYPE_CHECKING:
    from runbox_mta.imap.session import Session

    _Base = Session
else:
    _Base = object

# RFC 6154 attributes the store keeps (one per mailbox); \All and \Flagged need virtual mailboxes.
STORABLE_USES = ("\\Drafts", "\\Sent", "\\Trash", "\\Junk", "\\Archive")
_STATUS_ORDER = ("MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "DELETED", "SIZE", "HIGHESTMODSEQ",
                 "APPENDLIMIT", "DELETED-STORAGE")


class MailboxCommands(_Base):
    def _account(self) -> Authenticated:
        assert isinstance(self.state, Authenticated)
        return self.state

    async def _find(self, name: str) -> Mailbox:
        try:
            return await self.services.store.get_mailbox(self._account().account_id, name)
        except RunboxError:  # NotFound, or a name the store would never hold
            raise Refused("No such mailbox.", "NONEXISTENT") from None

    # --- SELECT / EXAMINE (RFC 9051 §6.3.2, §6.3.3) -----------------------------------------

    async def _select(self, command: c.Select) -> None:
        account = self._account()
        if isinstance(self.state, Selected) and (self.rev2 or "CONDSTORE" in self.enabled):
            self.out.write(status("OK", "Previous mailbox is now closed.", "CLOSED"))  # RFC 9051 §7.1
        self.state = Authenticated(account.account_id, account.address)  # a failed SELECT deselects
        if command.qresync is not None and not self.qresync:
            raise Refused("ENABLE QRESYNC first.", status="BAD")  # RFC 7162 §3.2.5 MUST
        if command.condstore:
            self.enabled.add("CONDSTORE")  # RFC 7162 §3.1.8
        try:
            snapshot = await self.services.store.snapshot(account.account_id, command.mailbox)
        except RunboxError:
            raise Refused("No such mailbox.", "NONEXISTENT") from None
        view = MailboxView(snapshot.mailbox_id, snapshot.name, snapshot.uidvalidity, command.readonly,
                           snapshot.uids, snapshot.highestmodseq, set(snapshot.keywords))
        self._write_flags(view)
        self.out.write(untagged(f"{len(view.uids)} EXISTS"))
        if not self.rev2:
            self.out.write(untagged("0 RECENT"))  # RFC 3501 §6.3.1; \Recent is not tracked
        self.out.write(status("OK", "UIDs valid.", f"UIDVALIDITY {snapshot.uidvalidity}"))
        self.out.write(status("OK", "Predicted next UID.", f"UIDNEXT {snapshot.uidnext}"))
        self.out.write(status("OK", "Highest.", f"HIGHESTMODSEQ {snapshot.highestmodseq}"))  # RFC 7162 §3.1.2.1
        if self.rev2:
            self.out.write(untagged(f'LIST () "/" {mailbox_name(snapshot.name, self.utf8)}'))  # RFC 9051 §6.3.2
        self.state = Selected(account.account_id, account.address, view)
        if command.qresync is not None and command.qresync.uidvalidity == snapshot.uidvalidity:
            await self.resync(view, command.qresync)  # RFC 7162 §3.2.5.2
        code = "READ-ONLY" if command.readonly else "READ-WRITE"
        self.out.write(f"{command.tag} OK [{code}] {'EXAMINE' if command.readonly else 'SELECT'} completed.\r\n"
                       .encode())

    def _write_flags(self, view: MailboxView) -> None:
        flags = flag_list([*SYSTEM_FLAGS, *view.keywords])
        self.out.write(untagged(f"FLAGS {flags}"))
        permanent = "()" if view.readonly else flag_list([*SYSTEM_FLAGS, *view.keywords])[:-1] + " \\*)"
        self.out.write(status("OK", "Flags permitted.", f"PERMANENTFLAGS {permanent}"))

    # --- CREATE, DELETE, RENAME, SUBSCRIBE (RFC 9051 §6.3.4-§6.3.8) --------------------------

    async def _create(self, command: c.Create) -> None:
        name = command.mailbox.rstrip(HIERARCHY_DELIMITER)  # RFC 9051 §6.3.4: a trailing delimiter is a hint
        if name == INBOX:
            raise Refused("INBOX already exists.", "ALREADYEXISTS")
        if len(command.special_use) > 1 or not set(command.special_use) <= set(STORABLE_USES):
            raise Refused("Unsupported special-use attribute.", "USEATTR")  # RFC 6154 §3
        use = command.special_use[0] if command.special_use else None
        await self._store_call(self.services.store.create_mailbox_path(self._account().account_id, name, use))
        await self.done(command.tag, "CREATE completed.")

    async def _delete(self, command: c.Delete) -> None:
        if command.mailbox == INBOX:
            raise Refused("INBOX cannot be deleted.")  # RFC 9051 §6.3.5
        await self._store_call(self.services.store.delete_mailbox(self._account().account_id, command.mailbox))
        await self.done(command.tag, "DELETE completed.")

    async def _rename(self, command: c.Rename) -> None:
        new = command.new_name.rstrip(HIERARCHY_DELIMITER)
        if new == INBOX:
            raise Refused("Mailbox already exists.", "ALREADYEXISTS")
        store = self.services.store
        await self._store_call(store.rename_mailbox(self._account().account_id, command.mailbox, new))
        await self.done(command.tag, "RENAME completed.")

    async def _subscribe(self, command: c.Subscribe) -> None:
        await self._store_call(self.services.store.set_subscribed(self._account().account_id, command.mailbox, True))
        await self.done(command.tag, "SUBSCRIBE completed.")

    async def _unsubscribe(self, command: c.Unsubscribe) -> None:
        await self._store_call(
            self.services.store.set_subscribed(self._account().account_id, command.mailbox, False))
        await self.done(command.tag, "UNSUBSCRIBE completed.")

    async def _store_call(self, call: Awaitable[None]) -> None:
        """Await a store write. A plain RunboxError is a rule the client broke (an invalid
        name, a mailbox with children): NO with its text. Its subclasses (NotFound,
        AlreadyExists, CommitFailed ...) keep their own replies in Session._guarded."""
        try:
            await call
        except RunboxError as error:
            if type(error) is not RunboxError:
                raise
            raise Refused(_sentence(str(error))) from None

    # --- LIST / LSUB (RFC 9051 §6.3.9, RFC 5258, RFC 5819, RFC 6154) --------------------------

    async def _list(self, command: c.List) -> None:
        mailboxes = await self.services.store.list_mailboxes(self._account().account_id)
        if command.patterns == ("",) and not command.select_options:
            # RFC 9051 §6.3.9: the delimiter and root name.
            self.out.write(untagged('LIST (\\Noselect) "/" ""'))
            await self.done(command.tag, "LIST completed.")
            return
        names = {box.name for box in mailboxes}
        subscribed = {box.name for box in mailboxes if box.subscribed}
        subscribed_only = "SUBSCRIBED" in command.select_options
        recursive = subscribed_only and "RECURSIVEMATCH" in command.select_options
        for box in mailboxes:
            if not any(_matches(command.reference, pattern, box.name) for pattern in command.patterns):
                continue
            # RFC 5258 §3.5: with RECURSIVEMATCH a parent of subscribed mailboxes is listed with CHILDINFO.
            childinfo = recursive and _has_descendant(box.name, subscribed)
            if subscribed_only and not box.subscribed and not childinfo:
                continue
            if "SPECIAL-USE" in command.select_options and not box.special_use:
                continue
            attributes = _attributes(box, names, subscribed_only or "SUBSCRIBED" in command.return_options)
            extended = ' ("CHILDINFO" ("SUBSCRIBED"))' if childinfo else ""
            self.out.write(untagged(
                f"LIST ({' '.join(attributes)}) \"/\" {mailbox_name(box.name, self.utf8)}{extended}"))
            if "STATUS" in command.return_options:
                await self._write_status(box, command.status_items)  # RFC 5819
        await self.done(command.tag, "LIST completed.")

    async def _lsub(self, command: c.Lsub) -> None:
        for box in await self.services.store.list_mailboxes(self._account().account_id):
            if box.subscribed and _matches(command.reference, command.pattern, box.name):
                self.out.write(untagged(f'LSUB () "/" {mailbox_name(box.name, self.utf8)}'))
        await self.done(command.tag, "LSUB completed.")

    # --- STATUS (RFC 9051 §6.3.11) -------------------------------------------------------------

    async def _status(self, command: c.Status) -> None:
        await self._write_status(await self._find(command.mailbox), command.items)
        await self.done(command.tag, "STATUS completed.")

    async def _write_status(self, box: Mailbox, items: tuple[str, ...]) -> None:
        counts = await self.services.store.mailbox_counts(box.id)
        limits = self.services.config.limits
        values = {
            "MESSAGES": counts.messages, "RECENT": 0, "UIDNEXT": box.uidnext, "UIDVALIDITY": box.uidvalidity,
            "UNSEEN": counts.unseen, "DELETED": counts.deleted, "SIZE": counts.size,
            "HIGHESTMODSEQ": box.highestmodseq,
            "APPENDLIMIT": min(limits.imap_literal_size, limits.message_size),
            "DELETED-STORAGE": -(-counts.deleted_size // 1024),  # RFC 9208 §4.2: in STORAGE units
        }
        shown = " ".join(f"{item} {values[item]}" for item in _STATUS_ORDER if item in items)
        self.out.write(untagged(f"STATUS {mailbox_name(box.name, self.utf8)} ({shown})"))

    # --- QUOTA (RFC 9208): one root "" per account, STORAGE in units of 1024 octets -----------

    async def _getquotaroot(self, command: c.GetQuotaRoot) -> None:
        box = await self._find(command.mailbox)
        account = await self.services.store.get_account(self._account().address)
        roots = ' ""' if account.quota_bytes is not None else ""
        self.out.write(untagged(f"QUOTAROOT {mailbox_name(box.name, self.utf8)}{roots}"))
        if account.quota_bytes is not None:
            self.out.write(untagged(_quota(account.used_bytes, account.quota_bytes)))
        await self.done(command.tag, "GETQUOTAROOT completed.")

    async def _getquota(self, command: c.GetQuota) -> None:
        account = await self.services.store.get_account(self._account().address)
        if command.root != "" or account.quota_bytes is None:
            raise Refused("No such quota root.", "NONEXISTENT")
        self.out.write(untagged(_quota(account.used_bytes, account.quota_bytes)))
        await self.done(command.tag, "GETQUOTA completed.")

    async def _setquota(self, command: c.SetQuota) -> None:
        raise Refused("Quotas are set by the administrator.", "NOPERM")  # RFC 9208 §4.3.3

    # --- APPEND (RFC 9051 §6.3.12, RFC 4315 §3 APPENDUID, RFC 7889) ----------------------------

    async def _append(self, command: c.Append) -> None:
        box = await self._find_for_append(command.mailbox)
        limit = self.services.config.limits.message_size
        for message in command.messages:  # all checked first: MULTIAPPEND stores all or none (RFC 3502 §3)
            if not message.data:
                raise Refused("Cannot store an empty message.")
            if len(message.data) > limit:
                raise Refused(f"Message exceeds the limit of {limit} bytes.", "TOOBIG")  # RFC 7889 §4
        appended = await self.services.store.append_messages(
            box.id, [(message.data, message.flags, message.internal_date) for message in command.messages])
        code = f"APPENDUID {appended.uidvalidity} {format_uid_set(appended.uids)}"  # RFC 4315 §3
        await self.done(command.tag, "APPEND completed.", code)

    async def _find_for_append(self, name: str) -> Mailbox:
        try:
            return await self._find(name)
        except Refused:
            raise Refused("Mailbox does not exist.", "TRYCREATE") from None  # RFC 9051 §6.3.12 MUST


def _quota(used: int, limit: int) -> str:
    # RFC 9208 §5.1: STORAGE counts units of 1024 octets; usage rounds up.
    return f'QUOTA "" (STORAGE {-(-used // 1024)} {limit // 1024})'


def _sentence(text: str) -> str:
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")


def _matches(reference: str, pattern: str, name: str) -> bool:
    """RFC 9051 §6.3.9: "*" matches anything, "%" anything but the delimiter."""
    full = reference + pattern if not pattern.startswith(HIERARCHY_DELIMITER) or not reference else pattern
    regex = "".join(".*" if char == "*" else "[^/]*" if char == "%" else re.escape(char) for char in full)
    if full[:5].upper() == INBOX and (len(full) == 5 or full[5] in "/*%"):
        regex = "INBOX" + regex[5:]  # INBOX is case-insensitive in patterns too
    return re.fullmatch(regex, name, re.DOTALL) is not None


def _has_descendant(name: str, names: set[str]) -> bool:
    prefix = name + HIERARCHY_DELIMITER
    return any(other.startswith(prefix) for other in names)


def _attributes(box: Mailbox, names: set[str], with_subscribed: bool) -> list[str]:
    attributes = ["\\HasChildren" if _has_descendant(box.name, names) else "\\HasNoChildren"]  # RFC 3348
    if box.special_use:
        attributes.append(box.special_use)  # RFC 6154 §2
    if with_subscribed and box.subscribed:
        attributes.append("\\Subscribed")  # RFC 5258 §3.4
    return attributes
