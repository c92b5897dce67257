"""`runbox-mta import ADDRESS PATH` and `export ADDRESS PATH` (SPEC §2): Maildir and mbox in,
mboxrd out, flags, keywords, internal dates and folders kept, and a round trip that changes nothing."""

from __future__ import annotations

import mailbox
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from runbox_mta.store import ChangeKind
from runbox_mta.transfer.folders import export_file, target_name
from runbox_mta.transfer.migrate import BATCH_MESSAGES, import_path
from tests import test_cli
from tests.test_cli import fails, ok, stored

# The CLI test's fixtures: the command line run in process against a fresh database.
config_path = test_cli.config_path
cli = test_cli.cli

pytestmark = pytest.mark.timeout(120)

ALICE, BOB = "alice@example.test", "bob@example.test"
T0 = 1_700_000_000  # 2023-11-14 22:13:20 UTC


def at(offset: int) -> datetime:
    return datetime.fromtimestamp(T0 + offset, UTC)


def message(subject: str, body: bytes = b"Hello.\n") -> bytes:
    fields = {"From": "Carol <carol@example.org>", "To": ALICE, "Subject": subject,
              "Message-ID": f"<{subject.replace(' ', '.')}@example.org>"}
    return "".join(f"{name}: {value}\n" for name, value in fields.items()).encode() + b"\n" + body


# The Maildir fixture: what Dovecot leaves behind, with the cases that break naive importers.
EIGHT_BIT = message("Blåbærsyltetøy", "Grüße, ø and a Latin-1 byte: ".encode() + b"\xe6\n")
FROM_IN_BODY = message("quoting", b"From the start of a line\n>From already quoted\n>>From twice\n")
NO_FINAL_NEWLINE = message("no newline", b"last line without an end")


def write_file(path: Path, data: bytes, mtime: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, (mtime, mtime))


def make_maildir(root: Path, keywords: str = "") -> Path:
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True)
    if keywords:
        (root / "dovecot-keywords").write_text(keywords)
    return root


@pytest.fixture
def maildir(tmp_path) -> Path:
    root = make_maildir(tmp_path / "Maildir", "0 work\n1 $Label1\n")
    # Written out of delivery order: the filename timestamps decide the UIDs.
    write_file(root / "cur" / f"{T0 + 4}.M4P1.host,S=99:2,S", NO_FINAL_NEWLINE, T0 + 4)
    write_file(root / "cur" / f"{T0 + 1}.M1P1.host:2,RSa", message("answered"), T0 + 1)
    write_file(root / "new" / f"{T0 + 2}.M2P1.host", EIGHT_BIT, T0 + 2)
    write_file(root / "cur" / f"{T0 + 3}.M3P1.host:2,FPb", FROM_IN_BODY, T0 + 3)
    write_file(root / "tmp" / f"{T0 + 5}.M5P1.host", message("still being delivered"), T0 + 5)
    write_file(make_maildir(root / ".Sent") / "cur" / f"{T0 + 10}.M10.host:2,S", message("sent"), T0 + 10)
    archive = make_maildir(root / ".Archive.2024", "0 old\n")
    write_file(archive / "cur" / f"{T0 + 20}.M20.host:2,STa", message("archived"), T0 + 20)
    write_file(make_maildir(root / ".Spam") / "new" / f"{T0 + 30}.M30.host", message("spam"), T0 + 30)
    write_file(make_maildir(root / ".Kj&APg-p") / "cur" / f"{T0 + 40}.M40.host:2,", message("shopping"), T0 + 40)
    return root


@pytest.fixture
def accounts(cli):
    ok(cli("domain", "add", "example.test"))
    for address in (ALICE, BOB):
        ok(cli("user", "add", address, "--password-stdin", stdin="correct horse\n"))


def crlf(data: bytes) -> bytes:
    return data.replace(b"\n", b"\r\n")


def mailboxes(config_path: Path, address: str) -> dict[str, list[tuple[int, frozenset[str], datetime, bytes]]]:
    """Every mailbox of the account: (uid, flags, internal date, bytes) of each message, by name."""

    async def read(store):
        account = await store.get_account(address)
        result = {}
        for box in await store.list_mailboxes(account.id):
            result[box.name] = [(info.uid, info.flags, info.internal_date, await store.read_message(box.id, info.uid))
                                for info in await store.list_messages(box.id)]
        return result

    return stored(config_path, read)


def test_maildir_import_keeps_flags_keywords_dates_folders_and_bytes(cli, config_path, accounts, maildir):
    out = ok(cli("import", ALICE, str(maildir)))

    assert out.splitlines() == [
        "INBOX: 4 imported, 0 already present",
        "Archive/2024: 1 imported, 0 already present",
        "Kjøp: 1 imported, 0 already present",
        "Sent: 1 imported, 0 already present",
        "Spam -> Junk: 1 imported, 0 already present",
    ]
    boxes = mailboxes(config_path, ALICE)
    # Well-known names land in the special-use mailboxes; nothing is duplicated beside them.
    assert sorted(boxes) == ["Archive", "Archive/2024", "Drafts", "INBOX", "Junk", "Kjøp", "Sent", "Trash"]
    # UIDs follow delivery order; tmp/ is not mail yet; new/ is unseen; P is $Forwarded, a-z are keywords.
    assert boxes["INBOX"] == [
        (1, {"\\Answered", "\\Seen", "work"}, at(1), crlf(message("answered"))),
        (2, set(), at(2), crlf(EIGHT_BIT)),
        (3, {"\\Flagged", "$Forwarded", "$Label1"}, at(3), crlf(FROM_IN_BODY)),
        (4, {"\\Seen"}, at(4), crlf(NO_FINAL_NEWLINE) + b"\r\n"),
    ]
    assert boxes["Archive/2024"] == [(1, {"\\Seen", "\\Deleted", "old"}, at(20), crlf(message("archived")))]
    assert boxes["Sent"][0][1:3] == ({"\\Seen"}, at(10))
    assert boxes["Junk"][0][1] == set()


def test_export_writes_one_private_mboxrd_file_per_mailbox(cli, config_path, accounts, maildir, tmp_path):
    ok(cli("import", ALICE, str(maildir)))
    target = tmp_path / "export"

    out = ok(cli("export", ALICE, str(target)))

    assert f"INBOX: 4 messages exported to {target / 'INBOX.mbox'}" in out.splitlines()
    files = sorted(str(path.relative_to(target)) for path in target.rglob("*") if path.is_file())
    # Hierarchy as directories: Archive.mbox beside Archive/ holding 2024.mbox; empty mailboxes too.
    assert files == ["Archive.mbox", "Archive/2024.mbox", "Drafts.mbox", "INBOX.mbox", "Junk.mbox",
                     "Kjøp.mbox", "Sent.mbox", "Trash.mbox"]
    assert all(stat.S_IMODE(path.stat().st_mode) == 0o600 for path in target.rglob("*.mbox"))
    assert stat.S_IMODE((target / "Archive").stat().st_mode) == 0o700
    assert (target / "Drafts.mbox").read_bytes() == b""

    inbox = (target / "INBOX.mbox").read_bytes()
    assert inbox.startswith(b"From MAILER-DAEMON Tue Nov 14 22:13:21 2023\nStatus: RO\nX-Status: A\n"
                            b"X-Keywords: work\nFrom: Carol")
    # mboxrd: every ">*From " body line gets one more ">"; LF line ends; an empty line after each message.
    assert b"\n>From the start of a line\n>>From already quoted\n>>>From twice\n\n" in inbox
    assert b"\nlast line without an end\n\n" in inbox and b"\r" not in inbox
    assert b"From MAILER-DAEMON Tue Nov 14 22:13:23 2023\nStatus: O\nX-Status: F\n" \
           b"X-Keywords: $Forwarded $Label1\n" in inbox
    # Other mbox readers (the stdlib's, like mutt's) see the same messages and flags.
    assert [entry.get_flags() for entry in mailbox.mbox(target / "INBOX.mbox")] == ["ROA", "O", "OF", "RO"]


def test_export_then_import_into_another_account_changes_nothing(cli, config_path, accounts, maildir, tmp_path):
    ok(cli("import", ALICE, str(maildir)))

    async def odd_names(store):
        account = await store.get_account(ALICE)
        box = await store.ensure_mailbox(account.id, ".hidden/100% done")
        await store.append(box, crlf(message("odd")), flags=["\\Seen"], internal_date=at(50))

    stored(config_path, odd_names)
    ok(cli("export", ALICE, str(tmp_path / "export")))
    # No mailbox name becomes a hidden file, "." or "..": "%" and a leading "." are escaped.
    assert (tmp_path / "export" / "%2Ehidden" / "100%25 done.mbox").is_file()

    out = ok(cli("import", BOB, str(tmp_path / "export")))

    assert "Archive/2024: 1 imported, 0 already present" in out.splitlines()
    assert ".hidden/100% done: 1 imported, 0 already present" in out.splitlines()
    assert mailboxes(config_path, BOB) == mailboxes(config_path, ALICE)


def test_importing_the_same_source_twice_adds_nothing(cli, config_path, accounts, maildir):
    ok(cli("import", ALICE, str(maildir)))
    before = mailboxes(config_path, ALICE)

    out = ok(cli("import", ALICE, str(maildir)))

    assert "INBOX: 0 imported, 4 already present" in out.splitlines()
    assert mailboxes(config_path, ALICE) == before
    # A duplicate has the same internal date, size and Message-ID: an edited message is new.
    write_file(maildir / "cur" / f"{T0 + 4}.M4P1.host,S=99:2,S", NO_FINAL_NEWLINE + b"!", T0 + 4)
    assert "INBOX: 1 imported, 3 already present" in ok(cli("import", ALICE, str(maildir))).splitlines()


def test_dovecot_uidlist_order_wins_over_file_names(cli, config_path, accounts, tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    # Moved in later from another folder: an old file name, but the newest UID.
    write_file(root / "cur" / f"{T0 + 1}.old.host:2,S", message("moved in"), T0 + 1)
    write_file(root / "cur" / f"{T0 + 2}.new.host:2,S", message("delivered"), T0 + 2)
    write_file(root / "new" / f"{T0}.unlisted.host", message("not in the uidlist yet"), T0)
    (root / "dovecot-uidlist").write_text(f"3 V{T0} N8 G0123\n5 :{T0 + 2}.new.host\n7 W1300 :{T0 + 1}.old.host\n")

    ok(cli("import", ALICE, str(root)))

    subjects = [data.split(b"Subject: ")[1].split(b"\r\n")[0] for *_, data in mailboxes(config_path, ALICE)["INBOX"]]
    assert subjects == [b"delivered", b"moved in", b"not in the uidlist yet"]


def test_messages_without_message_id_are_duplicates_only_when_their_bytes_are(cli, config_path, accounts,
                                                                              tmp_path):
    root = make_maildir(tmp_path / "Maildir")
    for name, text in (("a", b"Subject: one\n\nsame size\n"), ("b", b"Subject: two\n\nsame size\n")):
        write_file(root / "cur" / f"{T0}.{name}.host:2,S", text, T0)

    assert ok(cli("import", ALICE, str(root))).splitlines() == ["INBOX: 2 imported, 0 already present"]
    assert ok(cli("import", ALICE, str(root))).splitlines() == ["INBOX: 0 imported, 2 already present"]


MBOXRD = b"""\
From MAILER-DAEMON Thu Jan  1 00:00:00 1970
X-IMAP: 1700000000 0000000002
Subject: DON'T DELETE THIS MESSAGE -- FOLDER INTERNAL DATA

This text is part of the internal format of your mail folder.

From carol@example.org Mon Jan  1 12:30:45 2024
Return-Path: <carol@example.org>
Status: RO
X-Status: AF
X-Keywords: $Forwarded, project-x [not-a-keyword] bl\xc3\xa5
X-UID: 7
Subject: one

>From the body, quoted once
>>From quoted twice
From inside a paragraph does not start a message
CRLF line\r
end

From dave@example.org Tue Feb 13 08:00:00 +0100 2024
Subject: two
Status: O

second
"""


def test_hand_written_mboxrd_file_goes_into_a_folder_named_after_it(cli, config_path, accounts, tmp_path):
    source = tmp_path / "Lists.mbox"
    source.write_bytes(MBOXRD)

    assert ok(cli("import", ALICE, str(source))).splitlines() == ["Lists: 2 imported, 0 already present"]

    one, two = mailboxes(config_path, ALICE)["Lists"]
    # The mbox bookkeeping fields go (Dovecot hides them too); quoting is undone; line ends are CRLF;
    # labels that cannot be IMAP keywords are dropped.
    assert one == (1, {"\\Seen", "\\Answered", "\\Flagged", "$Forwarded", "project-x"},
                   datetime(2024, 1, 1, 12, 30, 45, tzinfo=UTC),
                   (b"Return-Path: <carol@example.org>\r\nSubject: one\r\n\r\nFrom the body, quoted once\r\n"
                    b">From quoted twice\r\nFrom inside a paragraph does not start a message\r\nCRLF line\r\nend\r\n"))
    assert two[1:] == (set(), datetime(2024, 2, 13, 7, 0, tzinfo=UTC), b"Subject: two\r\n\r\nsecond\r\n")


def test_a_large_folder_goes_in_batches_with_uids_in_source_order(cli, config_path, accounts, tmp_path):
    count = BATCH_MESSAGES * 2 + 10
    source = tmp_path / "INBOX"
    source.write_bytes(b"".join(b"From x@example.org Mon Jan  1 12:00:00 2024\n" + message(f"number {n}") + b"\n"
                                for n in range(1, count + 1)))

    assert ok(cli("import", ALICE, str(source))).splitlines() == [f"INBOX: {count} imported, 0 already present"]

    inbox = mailboxes(config_path, ALICE)["INBOX"]
    assert [uid for uid, *_ in inbox] == list(range(1, count + 1))
    assert all(f"Subject: number {uid}\r\n".encode() in data for uid, _, _, data in inbox)


def test_import_stops_cleanly_at_the_quota(cli, config_path, accounts, maildir):
    size = len(crlf(message("answered"))) + len(crlf(EIGHT_BIT))
    ok(cli("user", "set", ALICE, "--quota", str(size)))

    status, out, err = cli("import", ALICE, str(maildir))

    assert out.splitlines() == ["INBOX: 2 imported, 0 already present"]
    fails((status, out, err), f"{ALICE} is at its quota: stopped in INBOX")
    boxes = mailboxes(config_path, ALICE)
    assert [uid for uid, *_ in boxes["INBOX"]] == [1, 2]
    assert boxes["Sent"] == [] and "Archive/2024" not in boxes


async def test_imported_messages_reach_open_sessions_as_appends(store, alice, inbox, maildir):
    with store.subscribe(mailbox_id=inbox.id) as subscription:
        await import_path(store, ALICE, maildir, lambda line: None)
        events = [await subscription.get() for _ in range(4)]

    assert [(event.kind, event.uid) for event in events] == [(ChangeKind.APPEND, uid) for uid in (1, 2, 3, 4)]


def test_errors_are_one_line(cli, accounts, maildir, tmp_path):
    fails(cli("import", "nobody@example.test", str(maildir)), "no such account: nobody@example.test")
    fails(cli("export", "nobody@example.test", str(tmp_path / "out")), "no such account: nobody@example.test")
    fails(cli("import", ALICE, str(tmp_path / "missing")), "no such file or directory")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk\n")
    fails(cli("import", ALICE, str(notes)), "is not a Maildir, an mbox file or a directory of mbox files")
    fails(cli("import", ALICE, str(notes / "todo.txt")), "is not a Maildir, an mbox file or a directory of mbox files")
    # Export never overwrites: the directory must be new or empty.
    fails(cli("export", ALICE, str(notes)), "is not empty")
    fails(cli("export", ALICE, str(notes / "todo.txt")), "is not a directory")
    assert (notes / "todo.txt").read_text() == "buy milk\n"


SPECIAL_USES = {"\\Sent": "Sent", "\\Drafts": "Drafts", "\\Trash": "Papirkurv", "\\Junk": "Junk",
                "\\Archive": "Archive"}


@pytest.mark.parametrize(("source", "mailbox"), [
    (("INBOX",), "INBOX"),
    (("inbox", "Lists"), "INBOX/Lists"),
    (("Sent Items",), "Sent"),  # Outlook
    (("Sent Messages",), "Sent"),  # Apple Mail
    (("Deleted Messages",), "Papirkurv"),  # whatever the account's \Trash is called
    (("Spam",), "Junk"),
    (("archive", "2024"), "Archive/2024"),
    (("Projects", "Sent"), "Projects/Sent"),  # only top-level names are special
    (("Kjøp",), "Kjøp"),
])
def test_source_folders_map_onto_the_accounts_mailboxes(source, mailbox):
    assert target_name(source, SPECIAL_USES) == mailbox


@pytest.mark.parametrize(("mailbox", "file"), [
    ("INBOX", "INBOX.mbox"),
    ("Archive/2024", "Archive/2024.mbox"),
    ("..", "%2E..mbox"),
    (".hidden/50%", "%2Ehidden/50%25.mbox"),
])
def test_export_file_names_stay_inside_the_directory(mailbox, file):
    assert export_file(Path("/out"), mailbox) == Path("/out") / file
