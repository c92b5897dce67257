"""Authentication shared by SMTP submission, IMAP and POP3 (SPEC §7).

Responsibilities:

- `passwords`: Argon2id hashing with the configured cost, run in a small
  dedicated thread pool so the event loop never blocks on it.
- `app_passwords`: generated per-device passwords, their normalised form
  and their scopes (imap, pop3, smtp).
- `limiter`: the failed-login limiter, per client address and per account.
- `service`: `AuthService.authenticate`, the one login check every
  protocol calls; the store is reached only through its `CredentialStore`.
- `sasl`: pure decoding of SASL PLAIN and LOGIN responses.

Invariants:

- One `AuthService` (hence one hasher and one limiter) per daemon: a limit
  that one protocol enforces, all enforce.
- Argon2 never runs on the event loop.
- Every login attempt that reaches the check costs at least one Argon2
  verification, also for an unknown or malformed login name, so a failure
  takes the same time whether or not the account exists.
- A client only ever learns success, "invalid" or "temporarily-locked";
  why (unknown account, disabled, policy, scope) is for the operator's log,
  which names client addresses only with debug logging on.
- Hashes are upgraded to the configured parameters on successful login.
- Passwords never reach logs or reprs.
"""
