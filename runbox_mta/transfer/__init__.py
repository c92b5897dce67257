"""Moving mail in and out of an account: `runbox-mta import` and `export` (SPEC §2).

Responsibility: reading Maildir (Dovecot's Maildir++ folders and keyword
files) and mbox (mboxrd, with mutt/Dovecot Status headers) sources, writing
one mboxrd file per mailbox, and feeding the store in batches.

Layout: messages.py, maildir.py, mbox.py and folders.py are pure (files in,
values out, no store); migrate.py is the only part that talks to the store.

Invariants:
- Stored messages have CRLF line ends and end with one, the form SMTP
  delivers: bare LFs become CRLF on import, and back to LF in mbox files
  (RFC 4155 §2: the local line-end convention). Nothing else in a message
  changes, except that the mbox flag fields (Status, X-Status, X-Keywords,
  and Dovecot's X-UID/X-IMAP/X-IMAPbase) are taken off on import, as Dovecot
  hides them, because export writes them: import -> export -> import gives
  the same bytes, flags and internal dates.
- A message already in its target mailbox (same internal date, size and
  Message-ID, or same bytes when it has no Message-ID) is skipped, so
  importing a source twice adds nothing (Dovecot's dsync skips by GUID,
  which plain Maildir and mbox sources do not carry).
- Imports stop cleanly at the account's quota; exports never overwrite.
"""
