"""The ``authgrpc.v1.AuthService`` servicer: requests become Authenticator calls.

Each method maps :class:`~authgrpc.errors.AuthError` to its status in
:func:`authgrpc.errors.to_status`. Any other exception is logged with its
traceback and reaches the caller as INTERNAL with a fixed message. Every
call that touches the store is bounded by the caller's deadline, so that a
frozen Redis yields UNAVAILABLE rather than a hang.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from authgrpc.authenticator import Authenticator, LoginResult
from authgrpc.errors import (
    AuthError,
    InvalidArgument,
    Reason,
    StoreUnavailable,
    Unauthenticated,
    to_status,
)
from authgrpc.interceptor import _ThrottledLog
from authgrpc.keys import KeySet
from authgrpc.metadata import bearer_token, client_address
from authgrpc.metrics import NullMetrics
from authgrpc.principal import current_principal
from authgrpc.store import SessionRecord
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("authgrpc.service")

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, grpc.aio.ServicerContext], Awaitable[Response]]

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
TOKEN_TYPE = "Bearer"
# Methods that take a bearer token in metadata and go through the auth interceptor.
PROTECTED_METHODS = ("ListSessions", "RevokeSession", "LogoutAll")
PUBLIC_METHODS = tuple(
    f"/{SERVICE_NAME}/{name}"
    for name in ("Login", "Logout", "ValidateSession", "Refresh", "GetJwks")
)


def _budget(remaining: float | None) -> float | None:
    """Return how long a call may wait on the store: its deadline less a margin.

    The margin (a fifth of the time left, 50 to 500 ms) leaves room to send
    UNAVAILABLE before the caller's deadline turns it into DEADLINE_EXCEEDED.
    """
    if remaining is None:
        return None
    margin = min(max(remaining * 0.2, 0.05), 0.5)
    return max(remaining - margin, 0.01)


_STORE_LOG = _ThrottledLog(logger=log)


def _handle_errors(method: Handler[Request, Response]) -> Handler[Request, Response]:
    """Run a method within the caller's deadline, map its errors, record metrics."""
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(
        self: AuthServicer, request: Request, context: grpc.aio.ServicerContext
    ) -> Response:
        started = time.perf_counter()
        outcome, code = "ok", grpc.StatusCode.OK
        budget = _budget(context.time_remaining())
        try:
            async with asyncio.timeout(budget):
                return await method(self, request, context)
        except AuthError as error:
            outcome, code = error.reason.value, error.code
            status = to_status(error)
            if isinstance(error, StoreUnavailable):
                # The caller gets only the exception's class; the log also
                # names redis-py's reason, such as the refused address.
                cause = f" ({error.__cause__})" if error.__cause__ else ""
                _STORE_LOG.warning("%s failed: %s%s", name, error.message, cause)
        except TimeoutError:
            timed_out = StoreUnavailable(
                "session store did not answer within the call's deadline"
            )
            outcome, code = timed_out.reason.value, timed_out.code
            status = to_status(timed_out)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            outcome, code = "aborted", grpc.StatusCode.CANCELLED
            raise
        except Exception:
            log.exception("unexpected error in %s", name)
            outcome, code = "internal", grpc.StatusCode.INTERNAL
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise AssertionError("abort always raises") from None  # pragma: no cover
        finally:
            metrics = self.metrics
            metrics.observe_call(name, code.name, time.perf_counter() - started)
            if code == grpc.StatusCode.UNAVAILABLE:
                metrics.observe_store_error()
            if name == "ValidateSession":
                metrics.observe_validation(outcome)
            elif name == "Login":
                metrics.observe_login(outcome)
        await context.abort_with_status(status)
        raise AssertionError("abort_with_status always raises")  # pragma: no cover

    return wrapper


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    """Serves ``authgrpc.v1.AuthService``."""

    def __init__(
        self,
        authenticator: Authenticator,
        keys: Callable[[], KeySet],
        metrics: NullMetrics | None = None,
    ):
        self.auth = authenticator
        self._keys = keys
        self.metrics = metrics or NullMetrics()
        settings = authenticator.settings
        self._trusted_proxies = [
            ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies
        ]

    @_handle_errors
    async def Login(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        metadata = context.invocation_metadata() or ()
        peer = client_address(context.peer(), metadata, self._trusted_proxies)
        agent = next((str(v) for k, v in metadata if k == "user-agent"), "")
        result = await self.auth.login(
            request.username, request.password, peer=peer, user_agent=agent
        )
        return auth_pb2.LoginResponse(
            access_token=result.access.token,
            token_type=TOKEN_TYPE,
            access_token_expire_time=_timestamp_s(result.access.expires_at),
            session=_session(result.session),
            refresh_token=result.refresh_token,
        )

    @_handle_errors
    async def Logout(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        token = _token_from(request.access_token, context)
        await self.auth.logout(token)
        return auth_pb2.LogoutResponse()

    @_handle_errors
    async def ValidateSession(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        validation = await self.auth.validate(request.access_token)
        principal = validation.principal
        return auth_pb2.ValidateSessionResponse(
            principal=auth_pb2.Principal(
                user_id=principal.user_id,
                username=principal.username,
                roles=list(principal.roles),
            ),
            session=_session(validation.session),
        )

    @_handle_errors
    async def Refresh(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        result: LoginResult = await self.auth.refresh(request.refresh_token)
        return auth_pb2.RefreshResponse(
            access_token=result.access.token,
            token_type=TOKEN_TYPE,
            access_token_expire_time=_timestamp_s(result.access.expires_at),
            refresh_token=result.refresh_token,
            session=_session(result.session),
        )

    @_handle_errors
    async def ListSessions(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        principal = current_principal()
        sessions = await self.auth.list_sessions(principal.user_id)
        items = [
            _session(s, current=s.session_id == principal.session_id) for s in sessions
        ]
        return auth_pb2.ListSessionsResponse(sessions=items)

    @_handle_errors
    async def RevokeSession(
        self, request: Any, context: grpc.aio.ServicerContext
    ) -> Any:
        principal = current_principal()
        revoked = await self.auth.revoke_session(principal.user_id, request.session_id)
        return auth_pb2.RevokeSessionResponse(revoked=revoked)

    @_handle_errors
    async def LogoutAll(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        principal = current_principal()
        keep = principal.session_id if request.keep_current else None
        ended = await self.auth.logout_all(principal.user_id, keep)
        return auth_pb2.LogoutAllResponse(revoked_count=ended)

    @_handle_errors
    async def GetJwks(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        import json

        return auth_pb2.GetJwksResponse(
            jwks_json=json.dumps(self._keys().jwks(), sort_keys=True)
        )


def _token_from(body_token: str, context: grpc.aio.ServicerContext) -> str:
    """Return the token of the body or ``authorization`` metadata; both must agree."""
    try:
        header_token = bearer_token(context.invocation_metadata())
    except Unauthenticated as error:
        # Only an absent header yields to the body; a malformed one is an error.
        if body_token and error.reason is Reason.TOKEN_MISSING:
            return body_token
        raise
    if body_token and body_token != header_token:
        raise InvalidArgument(
            "access_token",
            "access_token differs from the token in authorization metadata",
        )
    return header_token


def _timestamp_ms(milliseconds: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMilliseconds(milliseconds)
    return stamp


def _timestamp_s(seconds: int) -> timestamp_pb2.Timestamp:
    return timestamp_pb2.Timestamp(seconds=seconds)


def _session(session: SessionRecord, *, current: bool = False) -> Any:
    return auth_pb2.Session(
        session_id=session.session_id,
        user_id=session.user_id,
        username=session.username,
        create_time=_timestamp_ms(session.created_ms),
        idle_expire_time=_timestamp_ms(session.idle_expiry_ms),
        absolute_expire_time=_timestamp_ms(session.absolute_expiry_ms),
        last_seen_time=_timestamp_ms(session.last_seen_ms),
        peer=session.peer,
        user_agent=session.user_agent,
        current=current,
    )
