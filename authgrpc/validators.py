"""Validators: turn an access token into a Principal, or raise the reason it is refused.

A validator checks the token's signature and claims and that its session is
still live. Every validator raises :class:`~authgrpc.errors.Unauthenticated`
for a bad token or an ended session and
:class:`~authgrpc.errors.StoreUnavailable` when it cannot find out, so
callers fail closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from authgrpc.errors import Reason, Unauthenticated
from authgrpc.principal import Principal
from authgrpc.store import SessionLimits, SessionRecord, SessionStore
from authgrpc.tokens import Claims, TokenVerifier


@dataclass(frozen=True, slots=True)
class Validation:
    """A successful validation: who is calling, and the session they hold."""

    principal: Principal
    session: SessionRecord
    claims: Claims


class Validator(Protocol):
    """What the synchronous interceptor calls."""

    def validate(self, token: str, timeout: float | None = None) -> Validation: ...


class AsyncValidator(Protocol):
    """What the asyncio interceptor calls."""

    async def validate(
        self, token: str, timeout: float | None = None
    ) -> Validation: ...


class AsyncLocalValidator:
    """Validates tokens with the auth service's keys and a direct view of its session store."""

    def __init__(
        self, verifier: TokenVerifier, store: SessionStore, limits: SessionLimits
    ):
        self.verifier = verifier
        self.store = store
        self.limits = limits

    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        """Return the validation of ``token``; ``timeout`` is bounded by the store's own timeout."""
        claims = self.verifier.verify(token)
        session = await self.store.validate_session(
            claims.user_id, claims.session_id, self.limits
        )
        if session is None:
            raise Unauthenticated(Reason.SESSION_ENDED, "session has ended")
        principal = Principal(
            session.user_id, session.username, session.roles, session.session_id
        )
        return Validation(principal, session, claims)
