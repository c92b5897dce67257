"""IMAP4rev1/IMAP4rev2 (RFC 3501, RFC 9051) and the extensions of SPEC §6.

The core is pure: `wire.Receiver` turns bytes into raw commands (or NeedMore,
NeedLiteral, ProtocolError) with every size limit enforced inside it, and
`commands.parse_command` turns a raw command into a typed frozen dataclass or
a CommandError carrying its BAD/NO reply. No I/O happens in this package's
core modules; the asyncio session glue feeds it bytes and writes its replies.
"""
