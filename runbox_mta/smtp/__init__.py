"""SMTP: the MX (inbound mail for hosted domains) and submission (the provider's users sending).

aiosmtpd owns the SMTP grammar (session.py subclasses its SMTP protocol);
our logic sits outside it: pure decisions in policy.py, thin hooks in
handler.py / inbound.py / submission.py, storage in delivery.py, the added
header fields in headers.py, DKIM signing in signing.py, SPF/DKIM/DMARC
checks in auth_results.py, named replies in codes.py; server.py plugs the
`smtp` and `submission` protocols into the daemon's listeners.

Invariants:
- 250 after DATA only once the store's commit returned (durable); any
  storage failure answers 451 4.3.0, so nothing acknowledged is lost.
- Never an open relay: a recipient outside the hosted domains needs AUTH,
  which only submission offers, and only over TLS.
- DATA ends only at CRLF.CRLF, and a message with a bare CR or LF is
  refused whole: nothing can smuggle a second message through us.
- Plaintext pipelined after STARTTLS is discarded (RFC 3207 §4.2).
- Every reply after the greeting carries an enhanced status code; 5xx
  replies are counted and the session closed with 421 at the limit.
- No client address, correspondent or content in the logs (SPEC §7); the
  Received field of submitted mail withholds the user's IP and host name.
- An exception in our hooks is counted as a crash and answered 451, never
  a traceback on the wire.
"""
