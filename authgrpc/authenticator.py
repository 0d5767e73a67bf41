"""The auth service's policy: logging in, refreshing, validating and ending sessions.

It does not use gRPC: the servicer in :mod:`authgrpc.service` passes it
plain values and maps its exceptions to statuses.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
from dataclasses import dataclass

from authgrpc import refresh
from authgrpc.cache import ValidationCache
from authgrpc.config import Settings
from authgrpc.errors import InvalidArgument, Reason, Throttled, Unauthenticated
from authgrpc.passwords import PasswordHasher, check_password_size, normalize_username
from authgrpc.store import (
    NewSession,
    RefreshOutcome,
    SessionRecord,
    SessionStore,
    UserChanged,
    UserRecord,
)
from authgrpc.tokens import IssuedToken, TokenIssuer, TokenVerifier
from authgrpc.validators import AsyncLocalValidator, Validation

log = logging.getLogger("authgrpc.service")

MAX_USER_AGENT_BYTES = 64
_BAD_CREDENTIALS = "invalid username or password"


def username_throttle_key(name: str) -> str:
    """Return the store key of the failed-login counter of a normalized username."""
    return f"u:{name}"


def peer_throttle_key(peer: str) -> str:
    """Return the store key of the failed-login counter of a peer address.

    An IP address is written in its canonical form, so that ``[::1]`` and
    ``0:0:0:0:0:0:0:1`` name the counter of ``::1``.
    """
    # Anything else, such as a Unix socket path, is kept as it is.
    with contextlib.suppress(ValueError):
        peer = str(ipaddress.ip_address(peer.strip("[]")))
    return f"ip:{peer}"


@dataclass(frozen=True, slots=True)
class LoginResult:
    """The tokens and session that a successful login or refresh produced."""

    access: IssuedToken
    refresh_token: str
    session: SessionRecord


class Authenticator:
    """Login, refresh, validation and session management on one store and key set."""

    def __init__(
        self,
        settings: Settings,
        store: SessionStore,
        issuer: TokenIssuer,
        verifier: TokenVerifier,
        hasher: PasswordHasher,
        cache: ValidationCache | None = None,
    ):
        self.settings = settings
        self.store = store
        self.issuer = issuer
        self.verifier = verifier
        self.hasher = hasher
        self.limits = settings.limits
        self.validator = AsyncLocalValidator(verifier, store, self.limits, cache)
        # Sessions this process ends leave its own cache at once; other
        # processes learn of them from the store's session-end channel.
        self.cache = cache

    async def login(
        self, username: str, password: str, *, peer: str, user_agent: str
    ) -> LoginResult:
        """Check credentials and create a session.

        Raises InvalidArgument before any hashing for an empty or oversized
        field, Throttled during a lockout, and Unauthenticated with one
        message for an unknown user, a wrong password and a disabled user.
        """
        name = normalize_username(username)
        check_password_size(password)
        user_key, peer_key = username_throttle_key(name), peer_throttle_key(peer)
        await self._acquire_attempt(user_key, peer_key, name, peer)
        user = await self.store.get_user_by_name(name)
        usable = user is not None and not user.disabled
        matched = await self.hasher.verify(
            user.password_hash if usable and user else None, password
        )
        if not matched or user is None:
            log.info("login failed: username=%r peer=%s", name, peer)
            raise Unauthenticated(Reason.INVALID_CREDENTIALS, _BAD_CREDENTIALS)
        await self.store.throttle_reset(user_key)
        await self.store.throttle_release(peer_key)
        await self._rehash_if_needed(user, password)
        result = await self._create_session(user, peer, user_agent)
        log.info(
            "login succeeded: username=%r user_id=%s session_id=%s peer=%s",
            name,
            user.user_id,
            result.session.session_id,
            peer,
        )
        return result

    async def validate(self, token: str) -> Validation:
        """Return the principal and session of a valid token whose session is live."""
        return await self.validator.validate(token)

    async def logout(self, token: str) -> bool:
        """End the session of ``token``; return whether it was still live.

        Only the signature, issuer and audience must be valid: an expired
        token or an ended session logs out successfully.
        """
        claims = self.verifier.verify(token, verify_exp=False)
        ended = await self.store.end_session(claims.user_id, claims.session_id)
        self._forget(claims.user_id, claims.session_id)
        log.info(
            "logout: user_id=%s session_id=%s was_live=%s",
            claims.user_id,
            claims.session_id,
            ended,
        )
        return ended

    async def refresh(self, token: str) -> LoginResult:
        """Exchange a refresh token for new tokens, ending the session on reuse."""
        presented = refresh.parse(token)
        state = await self.store.get_refresh_state(
            presented.user_id, presented.session_id
        )
        if state is None:
            raise Unauthenticated(Reason.SESSION_ENDED, "session has ended")
        following = presented.next(state.rotation_key)
        outcome, session = await self.store.commit_refresh(
            presented.user_id,
            presented.session_id,
            presented.stored_hash,
            following.stored_hash,
            int(self.settings.refresh_grace * 1000),
            self.limits,
        )
        if outcome is RefreshOutcome.REUSED:
            self._forget(presented.user_id, presented.session_id)
            log.warning(
                "refresh token reuse, session ended: user_id=%s session_id=%s",
                presented.user_id,
                presented.session_id,
            )
            raise Unauthenticated(
                Reason.REFRESH_TOKEN_REUSED,
                "refresh token was already used, so the session has been ended; "
                "log in again",
            )
        if outcome is RefreshOutcome.INVALID:
            raise Unauthenticated(
                Reason.REFRESH_TOKEN_INVALID,
                "refresh token is not valid for this session",
            )
        if session is None:
            raise Unauthenticated(Reason.SESSION_ENDED, "session has ended")
        access = self.issuer.issue(
            session.user_id,
            session.session_id,
            not_after=session.absolute_expiry_ms / 1000,
        )
        return LoginResult(access, following.encode(), session)

    async def list_sessions(self, user_id: str) -> list[SessionRecord]:
        """Return a user's live sessions, oldest first."""
        return await self.store.list_sessions(user_id)

    async def revoke_session(self, user_id: str, session_id: str) -> bool:
        """End one of a user's sessions; return whether it was live."""
        if not session_id or len(session_id) > 64:
            raise InvalidArgument("session_id", "session_id must be 1 to 64 characters")
        ended = await self.store.end_session(user_id, session_id)
        self._forget(user_id, session_id)
        log.info(
            "session revoked: user_id=%s session_id=%s was_live=%s",
            user_id,
            session_id,
            ended,
        )
        return ended

    async def logout_all(self, user_id: str, keep_session_id: str | None) -> int:
        """End every session of a user but ``keep_session_id``; return the count."""
        ended = await self.store.end_all_sessions(user_id, keep_session_id)
        if self.cache is not None:
            self.cache.forget_user(user_id)
        log.info(
            "logout all: user_id=%s ended=%d kept=%s",
            user_id,
            ended,
            keep_session_id or "-",
        )
        return ended

    def _forget(self, user_id: str, session_id: str) -> None:
        if self.cache is not None:
            self.cache.invalidate(user_id, session_id)

    async def _acquire_attempt(
        self, user_key: str, peer_key: str, name: str, peer: str
    ) -> None:
        policy = self.settings.throttle
        by_user = await self.store.throttle_acquire(user_key, policy)
        if not by_user.allowed:
            self._reject_throttled(by_user.retry_after_ms, name, peer, "username")
        by_peer = await self.store.throttle_acquire(peer_key, policy)
        if not by_peer.allowed:
            await self.store.throttle_release(user_key)
            self._reject_throttled(by_peer.retry_after_ms, name, peer, "peer")

    def _reject_throttled(
        self, retry_after_ms: int, name: str, peer: str, scope: str
    ) -> None:
        log.warning(
            "login throttled by %s: username=%r peer=%s retry_after_ms=%d",
            scope,
            name,
            peer,
            retry_after_ms,
        )
        raise Throttled(
            "too many failed login attempts; try again later", retry_after_ms / 1000
        )

    async def _rehash_if_needed(self, user: UserRecord, password: str) -> None:
        if not self.hasher.needs_rehash(user.password_hash):
            return
        new_hash = await self.hasher.hash(password)
        if await self.store.replace_password_hash(
            user.user_id, user.password_hash, new_hash
        ):
            log.info(
                "password rehashed with current parameters: user_id=%s", user.user_id
            )

    async def _create_session(
        self, user: UserRecord, peer: str, user_agent: str
    ) -> LoginResult:
        secret = refresh.new_secret()
        rotation_key = refresh.new_rotation_key()
        agent = user_agent.encode()[:MAX_USER_AGENT_BYTES].decode(errors="ignore")
        draft = refresh.RefreshToken(user.user_id, "", secret)
        new = NewSession(draft.stored_hash, rotation_key, peer, agent)
        try:
            session = await self.store.create_session(user, new, self.limits)
        except UserChanged:
            log.info(
                "login rejected, the user changed during the login: user_id=%s",
                user.user_id,
            )
            raise Unauthenticated(
                Reason.INVALID_CREDENTIALS, _BAD_CREDENTIALS
            ) from None
        token = refresh.RefreshToken(user.user_id, session.session_id, secret).encode()
        access = self.issuer.issue(
            user.user_id,
            session.session_id,
            not_after=session.absolute_expiry_ms / 1000,
        )
        return LoginResult(access, token, session)
