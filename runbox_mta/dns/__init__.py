"""DNS for every protocol, behind one interface (DESIGN: "DNS behind a small interface").

- `resolver`: `Resolver`, the only code that talks to dnspython; async
  lookups for the event loop and sync twins for worker-thread libraries
  (pyspf, dkimpy), all through the configured nameservers.

Invariants:

- "No such name / no records" is an empty result, never an exception;
  `DnsTempError` means "ask again later", `DnsPermError` "the question is
  invalid". SPF/DMARC temperror and queue retries depend on the difference.
- Error messages never name the domain that was looked up (SPEC §7).
"""

from runbox_mta.dns.resolver import (
    Answer,
    DnsError,
    DnsPermError,
    DnsTempError,
    Record,
    Resolver,
    TlsaRecord,
    parse_nameserver,
)

__all__ = [
    "Answer",
    "DnsError",
    "DnsPermError",
    "DnsTempError",
    "Record",
    "Resolver",
    "TlsaRecord",
    "parse_nameserver",
]
