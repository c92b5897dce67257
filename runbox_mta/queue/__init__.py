"""Outbound delivery: the persistent queue's worker, routes, back-off and bounces.

- `routes`: configured routes, then MX (RFC 5321 §5.1, null MX RFC 7505), to hops.
- `scheduler`: pure decisions: back-off with jitter, expiry, delay warnings.
- `attempt`: one batch of messages to one destination over as few
  connections as possible, with the TLS policy per hop (DANE from `dane`,
  MTA-STS from `mta_sts`, configured `verify`, or opportunistic).
- `dane`: RFC 7672 DANE-EE and DANE-TA from DNSSEC-authenticated TLSA records.
- `mta_sts`: RFC 8461 policies: TXT record, HTTPS fetch, per-daemon cache.
- `bounces`: sending the DSNs (smtp.dsn) an attempt calls for.
- `worker`: the background service a daemon runs: claims due recipients per
  destination (leases in the store), runs attempts, records outcomes and TLS
  details, reschedules with back-off.

Invariants: a recipient leaves the queue only once delivered or bounced; a
DSN is delivered (durably) before the failed recipient is removed, so a crash
can at worst send a bounce twice, never lose one; no DSN ever answers a
null-sender message (RFC 5321 §4.5.5); logs name no recipient or peer
address unless debug logging is on.
"""
