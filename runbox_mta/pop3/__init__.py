"""POP3 (RFC 1939, 2449, 2595, 3206, 5034): a sans-I/O core and thin asyncio glue.

- `wire`: bytes in, command lines out, with the line limits enforced.
- `session`: the state machine, one state type per RFC 1939 state
  (`Authorization`, `SaslExchange`, `Transaction`, `Update`, `Closed`). It
  answers lines with replies and requests (authenticate, open the maildrop,
  fetch a message, commit deletions, start TLS) that the glue performs and
  feeds back, so every dialogue can be tested without sockets.
- `message`: what a client receives for a message (CRLF lines, dot-stuffed),
  its exact size, TOP, and the UIDL format.
- `server`: the listener protocol: sockets, timeouts, TLS, the store.

Invariants:
- USER, PASS and AUTH are refused until TLS is active (RFC 2595 §2.3,
  SPEC §6); CAPA offers USER and SASL only then.
- The maildrop is the INBOX as it was at login, locked against other POP3
  sessions (also on other daemons sharing PostgreSQL); sizes in STAT and LIST
  are exactly the octets RETR sends before its terminating ".CRLF".
- DELE only marks. Messages are expunged (tombstones, change events: what
  IMAP reports as EXPUNGE) only by QUIT in the TRANSACTION state, durably,
  before the "+OK"; a connection that ends any other way deletes nothing.
- Bad input gets "-ERR" and the connection lives on, up to `MAX_ERRORS`.
- Logs name no client address (outside debug mode), no content, no address.
"""
