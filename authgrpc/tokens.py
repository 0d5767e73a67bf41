"""Issuing and verifying access tokens (JWTs, RFC 7519, checked as RFC 8725 advises).

An access token's header is ``{"alg": <configured>, "typ": "at+jwt", "kid":
<signing key>}`` and its claims are ``iss``, ``aud``, ``sub`` (user id),
``sid`` (session id), ``iat``, ``exp`` and ``jti``. Verification accepts only
the configured algorithm, looks the key up by ``kid`` and never falls back to
another key, requires every claim above, compares ``iss`` and ``aud``
exactly, and rejects a token over the size limit before decoding it.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt

from authgrpc.errors import ConfigurationError, Reason, Unauthenticated
from authgrpc.keys import KeySet

ACCESS_TOKEN_TYPE = "at+jwt"
DEFAULT_MAX_TOKEN_BYTES = 4096
_REQUIRED_CLAIMS = ["iss", "aud", "sub", "sid", "iat", "exp", "jti"]


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
        """Sign a token for a session; ``not_after`` caps ``exp`` (the session's absolute expiry)."""
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
        )  # type: ignore[arg-type]
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
        self._decoder = jwt.PyJWT()
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
        """Return the claims of a valid token, or raise Unauthenticated with the reason."""
        if not token:
            raise Unauthenticated(Reason.TOKEN_MISSING, "access token is missing")
        if len(token) > self.max_token_bytes:
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED,
                f"access token is longer than {self.max_token_bytes} bytes",
            )
        if verify_exp:
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
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, "access token is not a valid JWT"
            ) from None
        if header.get("typ") != ACCESS_TOKEN_TYPE:
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, f"access token type must be {ACCESS_TOKEN_TYPE}"
            )
        if header.get("alg") != self.keys.algorithm:
            raise Unauthenticated(
                Reason.TOKEN_BAD_SIGNATURE,
                f"access token algorithm is not the configured {self.keys.algorithm}",
            )
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, "access token header has no kid"
            )
        key = self._key_for(kid)
        try:
            payload: dict[str, Any] = self._decoder.decode(
                token,
                key,  # type: ignore[arg-type]
                algorithms=[self.keys.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={
                    "require": _REQUIRED_CLAIMS,
                    "verify_exp": verify_exp,
                    "strict_aud": True,
                },
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated(
                Reason.TOKEN_EXPIRED, "access token has expired"
            ) from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated(
                Reason.TOKEN_NOT_YET_VALID, "access token is not valid yet"
            ) from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError):
            raise Unauthenticated(
                Reason.TOKEN_CLAIMS_INVALID,
                "access token was issued for another service",
            ) from None
        except jwt.InvalidSignatureError:
            raise Unauthenticated(
                Reason.TOKEN_BAD_SIGNATURE, "access token signature is invalid"
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, "access token claims are missing or invalid"
            ) from None
        return _claims_from(payload, kid)

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


def _claims_from(payload: dict[str, Any], kid: str) -> Claims:
    user_id, session_id, token_id = payload["sub"], payload["sid"], payload["jti"]
    issued_at, expires_at = payload["iat"], payload["exp"]
    for value in (user_id, session_id, token_id):
        if not isinstance(value, str) or not value or len(value) > 128:
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, "access token claims are missing or invalid"
            )
    for number in (issued_at, expires_at):
        if isinstance(number, bool) or not isinstance(number, int):
            raise Unauthenticated(
                Reason.TOKEN_MALFORMED, "access token claims are missing or invalid"
            )
    return Claims(user_id, session_id, issued_at, expires_at, token_id, kid)
