"""Refresh tokens: their format, their stored hash, and how each next one is derived.

A refresh token reads ``rt1.<user_id>.<session_id>.<secret>`` with a 256-bit
random secret, base64url-encoded. The ids only route the token to its
session's keys; the secret is what authenticates it, and the store keeps
only a hash of it. Each rotation derives the next secret as
HMAC-SHA256(rotation key, presented secret), with a random rotation key
that the store keeps (one per user in Redis). So a retry of the same
refresh token within the grace window yields the very same next token, and
two racing refreshes cannot leave two valid tokens behind.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from authgrpc.errors import Reason, Unauthenticated

_PREFIX = "rt1"
_ID = r"[A-Za-z0-9_-]{1,64}"
_PATTERN = re.compile(rf"{_PREFIX}\.({_ID})\.({_ID})\.([A-Za-z0-9_-]{{43}})")
MAX_REFRESH_TOKEN_BYTES = 256


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """A parsed refresh token."""

    user_id: str
    session_id: str
    secret: bytes = field(repr=False)

    def encode(self) -> str:
        """Return the token string a client stores."""
        text = base64.urlsafe_b64encode(self.secret).rstrip(b"=").decode()
        return f"{_PREFIX}.{self.user_id}.{self.session_id}.{text}"

    @property
    def stored_hash(self) -> bytes:
        """The form kept in the store: the first 12 bytes of the secret's SHA-256.

        Finding a secret with a given hash takes about 2**96 tries, and the
        store keeps a few bytes less per session.
        """
        return hashlib.sha256(self.secret).digest()[:12]

    def next(self, rotation_key: bytes) -> RefreshToken:
        """Derive the token that replaces this one."""
        secret = hmac.new(rotation_key, self.secret, hashlib.sha256).digest()
        return RefreshToken(self.user_id, self.session_id, secret)


def new_secret() -> bytes:
    """Return a random 256-bit refresh secret."""
    return secrets.token_bytes(32)


def new_rotation_key() -> bytes:
    """Return a random key for deriving each next refresh secret."""
    return secrets.token_bytes(16)


def parse(token: str) -> RefreshToken:
    """Parse a refresh token, or raise Unauthenticated(REFRESH_TOKEN_INVALID)."""
    if not token:
        raise Unauthenticated(Reason.REFRESH_TOKEN_INVALID, "refresh token is missing")
    if len(token) > MAX_REFRESH_TOKEN_BYTES:
        raise Unauthenticated(Reason.REFRESH_TOKEN_INVALID, "refresh token is too long")
    match = _PATTERN.fullmatch(token)
    if match is None:
        raise Unauthenticated(
            Reason.REFRESH_TOKEN_INVALID, "refresh token is malformed"
        )
    user_id, session_id, text = match.groups()
    secret = base64.urlsafe_b64decode(text + "=")
    parsed = RefreshToken(user_id, session_id, secret)
    # The last of 43 characters carries two unused bits. Requiring them to be
    # zero keeps one string per secret, as encode() writes it.
    if parsed.encode() != token:
        raise Unauthenticated(
            Reason.REFRESH_TOKEN_INVALID, "refresh token is malformed"
        )
    return parsed
