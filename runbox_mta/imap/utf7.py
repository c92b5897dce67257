"""Modified UTF-7, the IMAP4rev1 encoding of mailbox names (RFC 3501 §5.1.3).

Printable US-ASCII (0x20-0x7E) stands for itself, except "&", written "&-".
Every other character is UTF-16BE, base64-encoded with "," instead of "/"
and without "=" padding, between "&" and "-".

`decode` is strict: it accepts only the canonical form, the one `encode`
produces. Anything else (a printable ASCII character hidden in base64, two
adjacent shifted runs, non-zero padding bits, an unterminated shift, raw
8-bit or control bytes) would give one mailbox several spellings, so two
names that compare different could open the same mailbox.
"""

from __future__ import annotations

import base64
import binascii
import re

_SHIFTED = re.compile(r"&([^-]*)(-?)")
_MODIFIED_BASE64 = re.compile(r"[A-Za-z0-9+,]+")


class Utf7Error(ValueError):
    """The text is not canonical modified UTF-7; str(error) says why."""


def _printable(char: str) -> bool:
    return " " <= char <= "~"


def encode(text: str) -> str:
    """Encode `text` (valid Unicode, no lone surrogates) as modified UTF-7."""
    out: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            raw = "".join(run).encode("utf-16-be")
            out.append("&" + base64.b64encode(raw).decode("ascii").rstrip("=").replace("/", ",") + "-")
            run.clear()

    for char in text:
        if _printable(char):
            flush()
            out.append("&-" if char == "&" else char)
        else:
            run.append(char)
    flush()
    return "".join(out)


def decode(data: str | bytes) -> str:
    """Decode canonical modified UTF-7; raise Utf7Error for anything else."""
    if isinstance(data, bytes):
        try:
            data = data.decode("ascii")
        except UnicodeDecodeError:
            raise Utf7Error("8-bit byte in a modified UTF-7 name (send UTF-8 only after ENABLE UTF8=ACCEPT)") from None
    if not all(_printable(char) for char in data):
        raise Utf7Error("control character in a modified UTF-7 name")
    out: list[str] = []
    pos = 0
    for match in _SHIFTED.finditer(data):
        out.append(data[pos:match.start()])
        pos = match.end()
        payload, dash = match.group(1), match.group(2)
        if not dash:
            raise Utf7Error("unterminated modified UTF-7 shift ('&' without '-')")
        out.append(_decode_run(payload) if payload else "&")
    out.append(data[pos:])
    text = "".join(out)
    # RFC 3501 §5.1.3: one spelling per name; re-encoding catches base64 that
    # hides printable ASCII, adjacent runs and non-zero padding bits alike.
    if encode(text) != data:
        raise Utf7Error("non-canonical modified UTF-7")
    return text


def _decode_run(payload: str) -> str:
    if not _MODIFIED_BASE64.fullmatch(payload):
        raise Utf7Error("invalid character in modified base64")
    padded = payload.replace(",", "/") + "=" * (-len(payload) % 4)
    try:
        raw = base64.b64decode(padded, validate=True)
        return raw.decode("utf-16-be")
    except (binascii.Error, UnicodeDecodeError):
        raise Utf7Error("modified base64 does not decode to UTF-16") from None
