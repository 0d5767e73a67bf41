"""Issuing and verifying access tokens (JWTs, RFC 7519, checked as RFC 8725 advises).

An access token's header is ``{"alg": <configured>, "typ": "at+jwt", "kid":
<signing key>}`` and its claims are ``iss``, ``aud``, ``sub`` (user id),
``sid`` (session id), ``iat``, ``exp`` and ``jti``. Verification rejects a
token over the size limit or outside the compact JWS alphabet before decoding
it, accepts only the configured algorithm, looks the key up by ``kid`` and
never falls back to another key, and ignores ``jku``, ``x5u``, ``jwk`` and
``x5c``. pyjwt checks the signature. The claims are then checked here rather
than by pyjwt, because pyjwt accepts booleans and floats as times:

- every claim above must be present, ``sub``, ``sid`` and ``jti`` as strings
  of 1 to 128 characters, ``iss`` as a string, and ``iat``, ``exp`` and (if
  present) ``nbf`` as integers, else TOKEN_MALFORMED;
- ``exp`` more than the leeway in the past gives TOKEN_EXPIRED, and ``iat`` or
  ``nbf`` more than the leeway in the future gives TOKEN_NOT_YET_VALID;
- ``iss`` and ``aud`` must equal the configured strings, else
  TOKEN_CLAIMS_INVALID. RFC 7519 lets ``aud`` be an array, and an array of
  strings is well-formed, but it is rejected even when it contains our
  audience, because this issuer never writes one.
"""

from __future__ import annotations

import json
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from authgrpc.errors import ConfigurationError, Reason, Unauthenticated
from authgrpc.keys import KeySet, is_valid_kid

ACCESS_TOKEN_TYPE = "at+jwt"
DEFAULT_MAX_TOKEN_BYTES = 4096
# The largest integer that every JSON parser reads exactly (RFC 7493, section 2.2).
MAX_NUMERIC_DATE = 2**53 - 1
_REQUIRED_CLAIMS = ("iss", "aud", "sub", "sid", "iat", "exp", "jti")
# Compact JWS: three base64url segments without padding (RFC 7515, section 2).
# The signature segment may be empty, so that an unsecured token reaches the
# alg check and is rejected as TOKEN_BAD_SIGNATURE.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


@dataclass(frozen=True, slots=True)
class Claims:
    """The verified contents of an access token."""

    user_id: str
    session_id: str
    issued_at: int
    expires_at: int
    token_id: str
    key_id: str


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A freshly signed access token and its expiry (Unix seconds)."""

    token: str
    expires_at: int
    token_id: str


class TokenIssuer:
    """Signs access tokens with the key set's active key."""

    def __init__(
        self, keys: KeySet, *, issuer: str, audience: str, lifetime_seconds: int
    ):
        if keys.signing_key is None:
            raise ConfigurationError("the key set has no signing key")
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.lifetime_seconds = lifetime_seconds

    def issue(
        self, user_id: str, session_id: str, *, not_after: float | None = None
    ) -> IssuedToken:
        """Sign a token for a session.

        ``not_after`` caps ``exp``, so that a token cannot outlive its
        session's absolute expiry.
        """
        signing = self.keys.signing_key
        assert signing is not None  # checked in __init__ and by every reload
        now = int(time.time())
        expires_at = now + self.lifetime_seconds
        if not_after is not None:
            expires_at = max(now + 1, min(expires_at, int(not_after)))
        token_id = secrets.token_urlsafe(16)
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": user_id,
            "sid": session_id,
            "iat": now,
            "exp": expires_at,
            "jti": token_id,
        }
        headers = {"kid": signing.kid, "typ": ACCESS_TOKEN_TYPE}
        token = jwt.encode(
            claims, signing.private_key, algorithm=signing.algorithm, headers=headers
        )
        return IssuedToken(token, expires_at, token_id)


KeyRefresher = Callable[[], KeySet | None]


class TokenVerifier:
    """Verifies access tokens against a key set.

    Verified claims are kept in a bounded cache keyed by the token string,
    because a token cannot change while it is valid; each hit still checks
    ``exp``. ``refresh_keys``, if given, is called at most once per
    ``refresh_interval`` seconds when a token names an unknown kid, so that
    keys rotated in elsewhere are picked up.
    """

    def __init__(
        self,
        keys: KeySet,
        *,
        issuer: str,
        audience: str,
        leeway_seconds: float = 30,
        max_token_bytes: int = DEFAULT_MAX_TOKEN_BYTES,
        cache_size: int = 10_000,
        refresh_keys: KeyRefresher | None = None,
        refresh_interval: float = 30.0,
    ):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.max_token_bytes = max_token_bytes
        self._jws = jwt.PyJWS()
        self._cache: OrderedDict[str, Claims] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._refresh_keys = refresh_keys
        self._refresh_interval = refresh_interval
        self._last_refresh = float("-inf")

    def replace_keys(self, keys: KeySet) -> None:
        """Switch to a new key set, dropping cached claims signed by removed keys."""
        with self._lock:
            self.keys = keys
            self._cache.clear()

    def verify(self, token: str, *, verify_exp: bool = True) -> Claims:
        """Return the claims of a valid token, or raise Unauthenticated with why."""
        if verify_exp:
            # The cache holds only tokens that passed every check below.
            with self._lock:
                cached = self._cache.get(token)
                if cached is not None:
                    self._cache.move_to_end(token)
            if cached is not None:
                if cached.expires_at + self.leeway_seconds <= time.time():
                    raise Unauthenticated(
                        Reason.TOKEN_EXPIRED, "access token has expired"
                    )
                return cached
        if not token:
            raise Unauthenticated(Reason.TOKEN_MISSING, "access token is missing")
        if len(token) > self.max_token_bytes:
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED,
                f"access token is longer than {self.max_token_bytes} bytes",
            )
        if not _COMPACT_JWS.fullmatch(token):
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED,
                "access token must be three base64url segments without padding",
            )
        claims = self._decode(token, verify_exp=verify_exp)
        if verify_exp:
            with self._lock:
                self._cache[token] = claims
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return claims

    def _decode(self, token: str, *, verify_exp: bool) -> Claims:
        try:
            header = jwt.get_unverified_header(token)
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _malformed("access token is not a valid JWT") from None
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise _malformed(f"access token type must be {ACCESS_TOKEN_TYPE}")
        if header.get("alg") != self.keys.algorithm:
            raise Unauthenticated(
                Reason.TOKEN_BAD_SIGNATURE,
                f"access token algorithm is not the configured {self.keys.algorithm}",
            )
        kid = header.get("kid")
        if kid is None:
            raise _malformed("access token header has no kid")
        if not is_valid_kid(kid):
            raise _malformed("access token kid must be 1 to 64 base64url characters")
        key = self._key_for(kid)
        try:
            signed = self._jws.decode_complete(
                token,
                key,
                algorithms=[self.keys.algorithm],
            )
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                Reason.TOKEN_BAD_SIGNATURE, "access token signature is invalid"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _malformed("access token is not a valid JWT") from None
        payload = _parse_payload(signed["payload"])
        claims = _claims_from(payload, kid)
        self._check_times(payload, claims, verify_exp=verify_exp)
        if payload["iss"] != self.issuer or payload["aud"] != self.audience:
            raise Unauthenticated(
                Reason.TOKEN_CLAIMS_INVALID,
                "access token was issued for another service",
            )
        return claims

    def _check_times(
        self, payload: dict[str, Any], claims: Claims, *, verify_exp: bool
    ) -> None:
        now = time.time()
        if verify_exp and claims.expires_at + self.leeway_seconds <= now:
            raise Unauthenticated(Reason.TOKEN_EXPIRED, "access token has expired")
        not_before = payload.get("nbf", claims.issued_at)
        if max(claims.issued_at, not_before) > now + self.leeway_seconds:
            raise Unauthenticated(
                Reason.TOKEN_NOT_YET_VALID, "access token is not valid yet"
            )

    def _key_for(self, kid: str) -> Any:
        key = self.keys.verification_keys.get(kid)
        if key is None and self._refresh_keys is not None:
            now = time.monotonic()
            if now - self._last_refresh >= self._refresh_interval:
                self._last_refresh = now
                refreshed = self._refresh_keys()
                if refreshed is not None:
                    self.replace_keys(refreshed)
                    key = refreshed.verification_keys.get(kid)
        if key is None:
            raise Unauthenticated(
                Reason.TOKEN_BAD_SIGNATURE, "access token was signed by an unknown key"
            )
        return key


def _malformed(message: str) -> Unauthenticated:
    return Unauthenticated(Reason.TOKEN_MALFORMED, message)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("duplicate member name")
    return members


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _parse_payload(data: bytes) -> dict[str, Any]:
    """Parse the claims: a UTF-8 JSON object with no repeated names (RFC 7519, 7.2)."""
    try:
        payload = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (ValueError, RecursionError):
        raise _malformed("access token claims are not a JSON object") from None
    if not isinstance(payload, dict):
        raise _malformed("access token claims are not a JSON object")
    return payload


def _claims_from(payload: dict[str, Any], kid: str) -> Claims:
    """Check that every claim is present and of the type this issuer writes."""
    for name in _REQUIRED_CLAIMS:
        if name not in payload:
            raise _malformed(f"access token has no {name} claim")
    for name in ("sub", "sid", "jti"):
        value = payload[name]
        if not isinstance(value, str) or not value or len(value) > 128:
            raise _malformed(
                f"access token claim {name} must be a string of 1 to 128 characters"
            )
    if not isinstance(payload["iss"], str):
        raise _malformed("access token claim iss must be a string")
    audience = payload["aud"]
    # RFC 7519 allows aud to be an array of strings. This issuer writes one
    # string, so an array is well-formed but never matches (TOKEN_CLAIMS_INVALID).
    if not isinstance(audience, str) and not (
        isinstance(audience, list) and all(isinstance(a, str) for a in audience)
    ):
        raise _malformed("access token claim aud must be a string")
    for name in ("iat", "exp", "nbf"):
        if name in payload and not _is_numeric_date(payload[name]):
            raise _malformed(
                f"access token claim {name} must be an integer number of seconds "
                f"from 0 to {MAX_NUMERIC_DATE}"
            )
    return Claims(
        payload["sub"],
        payload["sid"],
        payload["iat"],
        payload["exp"],
        payload["jti"],
        kid,
    )


def _is_numeric_date(value: Any) -> bool:
    # bool is a subclass of int, and floats are never written by this issuer.
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return 0 <= value <= MAX_NUMERIC_DATE
