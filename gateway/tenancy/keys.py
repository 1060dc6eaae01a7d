"""API keys in their two written forms: plaintext, or ``sha256:<64 hex>`` (the key's SHA-256 digest), so
that a config file that leaks leaks no key. Every form is compared as a digest, in constant time."""

from __future__ import annotations

import hashlib
import re
import secrets

__all__ = ["HASHED_PREFIX", "KEY_PREFIX", "digest", "entry_digest", "hashed_form", "is_hashed", "new_key"]

HASHED_PREFIX = "sha256:"
# Recognisable in logs and by secret scanners.
KEY_PREFIX = "mgw-"
_HASHED = re.compile(r"sha256:[0-9a-f]{64}")


def is_hashed(entry: str) -> bool:
    """Whether a configured key is the digest form (the config refuses other keys starting ``sha256:``)."""
    return _HASHED.fullmatch(entry) is not None


def digest(token: str) -> bytes:
    """The SHA-256 digest of a key as sent. Comparing fixed-length digests hides the key's length too, and
    accepts any text (``hmac.compare_digest`` refuses non-ASCII str, which a latin-1 header can hold)."""
    return hashlib.sha256(token.encode()).digest()


def entry_digest(entry: str) -> bytes:
    """The digest a configured key stands for: the one it holds (hashed form), or its own (plaintext)."""
    return bytes.fromhex(entry.removeprefix(HASHED_PREFIX)) if is_hashed(entry) else digest(entry)


def hashed_form(key: str) -> str:
    return HASHED_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key: 32 random bytes (256 bits), URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)
