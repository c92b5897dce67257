"""DKIM signing of submitted mail (RFC 6376), with the sending domain's stored key.

Signing hashes the whole body, which for a large message is long enough to
stall every other connection, so it runs in a worker thread.

dkimpy does everything DKIM here but the RSA private-key operation, which it
does in pure Python: about 6 ms of CPU per message (a quarter of the
submission path under `scripts/bench outbound`) and big-integer arithmetic
whose timing depends on the key. OpenSSL, through cryptography, signs in a
quarter of a millisecond, in constant time. dkimpy looks that one primitive up
as a module global when it signs, so it is replaced once, at import, by one
with the same contract; RSASSA-PKCS1-v1_5 is deterministic, and a test pins
the two to the same bytes. Its PEM parsing is remembered per key the same way.

Relaxed canonicalization (RFC 6376 §3.4.4) was the next quarter: dkimpy
rewrites every run of spaces and tabs with a regular expression, single
spaces included, and a body of text is mostly single spaces. The two
whitespace helpers it looks up as module globals are replaced by ones that
return the content untouched when there is nothing to rewrite (a substring
test, in C) and otherwise rewrite only what changes; a property test pins
them to dkimpy's on arbitrary bytes.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import lru_cache
from typing import Any

import dkim
import dkim.canonicalization
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from runbox_mta.smtp import headers

log = logging.getLogger(__name__)

# RFC 6376 §5.4.1: the fields worth signing, signed when present.
SIGNED_FIELDS = (
    "from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc", "mime-version",
    "content-type", "content-transfer-encoding", "content-id", "content-description",
    "in-reply-to", "references", "list-id", "list-help", "list-unsubscribe", "list-subscribe",
    "list-post", "list-owner", "list-archive",
)
# RFC 6376 §8.15: fields that may appear once (RFC 5322 §3.6) are named once
# more than they occur ("oversigned"), so adding one breaks the signature.
OVERSIGNED_FIELDS = ("from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
                     "in-reply-to", "references")


async def sign(data: bytes, *, domain: str, selector: str, private_key_pem: str) -> bytes:
    """`data` with a DKIM-Signature field on top; unsigned (and logged) if the key is unusable."""
    try:
        signature = await asyncio.to_thread(_signature, data, domain, selector, private_key_pem)
    except dkim.DKIMException as error:
        log.error("cannot DKIM-sign for %s with selector %s: %s", domain, selector, error)
        return data
    return headers.prepend(data, signature)


def _signature(data: bytes, domain: str, selector: str, private_key_pem: str) -> bytes:
    present = {name for name, _, _ in headers.fields(data)}
    include = [name for name in SIGNED_FIELDS if name in present] + list(OVERSIGNED_FIELDS)
    return dkim.sign(data, selector.encode("ascii"), domain.encode("ascii"), private_key_pem.encode("ascii"),
                     canonicalize=(b"relaxed", b"relaxed"), include_headers=[name.encode() for name in include])


_HASHES = {"sha256": hashes.SHA256(), "sha1": hashes.SHA1()}  # rsa-sha256, and rsa-sha1 (RFC 8301 §3.1: never signed)
_KEY_FIELDS = ("prime1", "prime2", "exponent1", "exponent2", "coefficient", "privateExponent", "publicExponent",
               "modulus")


def rsassa_pkcs1_v1_5_sign(hash_object: Any, private_key: dict[str, int]) -> bytes:
    """dkim.crypto.RSASSA_PKCS1_v1_5_sign through OpenSSL: (hash object, dkimpy key dict) -> signature."""
    algorithm = _HASHES[hash_object.name.lower()]
    key = _openssl_key(tuple(private_key[name] for name in _KEY_FIELDS))
    return key.sign(hash_object.digest(), padding.PKCS1v15(), Prehashed(algorithm))


@lru_cache(maxsize=64)  # a few hosted domains sign all the mail: build each key once
def _openssl_key(numbers: tuple[int, ...]) -> rsa.RSAPrivateKey:
    p, q, dmp1, dmq1, iqmp, d, e, n = numbers
    return rsa.RSAPrivateNumbers(p, q, d, dmp1, dmq1, iqmp, rsa.RSAPublicNumbers(e, n)).private_key()


dkim.RSASSA_PKCS1_v1_5_sign = rsassa_pkcs1_v1_5_sign
# dkimpy also parses the PEM key (ASN.1, in Python) for every message; a domain's
# key is the same bytes each time, and the parsed dict is only read.
dkim.parse_pem_private_key = lru_cache(maxsize=64)(dkim.crypto.parse_pem_private_key)


# Runs that relaxed canonicalization changes: any containing a tab, or two or more spaces.
_WHITESPACE_TO_COMPRESS = re.compile(rb"\t[\t ]*| [\t ]+")
_WHITESPACE_BEFORE_LINE_END = re.compile(rb"[\t ]+\r\n")


def compress_whitespace(content: bytes) -> bytes:
    """dkim.canonicalization.compress_whitespace: every run of WSP becomes one space."""
    if b"\t" not in content and b"  " not in content:
        return content
    return _WHITESPACE_TO_COMPRESS.sub(b" ", content)


def strip_trailing_whitespace(content: bytes) -> bytes:
    """dkim.canonicalization.strip_trailing_whitespace: no WSP before a line end."""
    if b" \r\n" not in content and b"\t\r\n" not in content:
        return content
    return _WHITESPACE_BEFORE_LINE_END.sub(b"\r\n", content)


dkim.canonicalization.compress_whitespace = compress_whitespace
dkim.canonicalization.strip_trailing_whitespace = strip_trailing_whitespace
