"""DKIM signing (RFC 6376) with dkimpy's logic and OpenSSL's RSA: same bytes, verifiable by dkimpy."""

from __future__ import annotations

import base64
import hashlib
import re

import dkim
import dkim.crypto
import pytest
from hypothesis import given
from hypothesis import strategies as st
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from runbox_mta.smtp.signing import compress_whitespace, rsassa_pkcs1_v1_5_sign, sign, strip_trailing_whitespace


def dkimpy_compress_whitespace(content: bytes) -> bytes:  # dkimpy's, as the replacement must behave
    return re.sub(b"[\t ]+", b" ", content)


def dkimpy_strip_trailing_whitespace(content: bytes) -> bytes:
    return re.sub(b"[\t ]+\r\n", b"\r\n", content)

MESSAGE = (b"From: Alice <alice@example.test>\r\nTo: bob@example.net\r\nSubject: hello\r\n"
           b"Date: Mon, 23 Nov 2026 12:00:00 +0000\r\nMessage-ID: <1@example.test>\r\n\r\nHi Bob.\r\n")


def pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.mark.parametrize("algorithm", ["sha256", "sha1"])
def test_openssl_gives_the_same_signature_as_dkimpys_pure_python(key: rsa.RSAPrivateKey, algorithm: str) -> None:
    dkimpy_key = dkim.crypto.parse_pem_private_key(pem(key))
    digest = dkim.HashThrough(hashlib.new(algorithm))
    digest.update(b"the canonicalised header fields")
    assert rsassa_pkcs1_v1_5_sign(digest, dkimpy_key) == dkim.crypto.RSASSA_PKCS1_v1_5_sign(digest, dkimpy_key)


def test_dkimpy_signs_through_openssl_and_parses_each_key_once(key: rsa.RSAPrivateKey) -> None:
    assert dkim.RSASSA_PKCS1_v1_5_sign is rsassa_pkcs1_v1_5_sign
    assert dkim.parse_pem_private_key(pem(key)) is dkim.parse_pem_private_key(pem(key))


@given(st.lists(st.sampled_from([b" ", b"\t", b"\r\n", b"\r", b"\n", b"a", b"\xe5"]), max_size=60).map(b"".join)
       | st.binary(max_size=200))
def test_the_whitespace_helpers_rewrite_exactly_as_dkimpys(content: bytes) -> None:
    assert compress_whitespace(content) == dkimpy_compress_whitespace(content)
    assert strip_trailing_whitespace(content) == dkimpy_strip_trailing_whitespace(content)
    assert dkim.canonicalization.compress_whitespace is compress_whitespace
    assert dkim.canonicalization.strip_trailing_whitespace is strip_trailing_whitespace


async def test_a_signed_message_verifies_with_dkimpy(key: rsa.RSAPrivateKey) -> None:
    signed = await sign(MESSAGE, domain="example.test", selector="sel", private_key_pem=pem(key).decode())
    assert signed.startswith(b"DKIM-Signature: ") and signed.endswith(MESSAGE)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes:
        return record if name == b"sel._domainkey.example.test." else b""

    assert dkim.verify(signed, dnsfunc=dns)
    assert not dkim.verify(signed.replace(b"Hi Bob.", b"Hi Eve."), dnsfunc=dns)
