"""The authenticated caller, and how a handler gets it."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Principal:
    """The user behind the call being handled, as the auth service vouched for it."""

    user_id: str
    username: str
    roles: tuple[str, ...]
    session_id: str

    def has_role(self, role: str) -> bool:
        """Return whether the principal has ``role``."""
        return role in self.roles


_current: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "authgrpc_principal", default=None
)


class NoPrincipalError(LookupError):
    """current_principal() was called outside a call admitted by an interceptor."""


def current_principal() -> Principal:
    """Return the principal of the call being handled.

    Raises NoPrincipalError outside a call admitted by AuthInterceptor or
    AsyncAuthInterceptor, and in public methods, which run without one.
    """
    principal = _current.get()
    if principal is None:
        raise NoPrincipalError(
            "no authenticated principal: current_principal() works only inside "
            "a handler "
            "of a method that an AuthInterceptor or AsyncAuthInterceptor protects"
        )
    return principal


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make ``principal`` current; pass the returned token to reset_principal()."""
    return _current.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    """Restore the principal that was current before set_principal()."""
    _current.reset(token)
