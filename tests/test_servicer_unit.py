"""AuthServicer unit tests through grpcio-testing, with the in-memory store.

grpcio-testing drives synchronous servicers only, so each async method runs
on a background event loop and a small adapter gives it the asyncio
ServicerContext methods it awaits. grpcio-testing records the status that
the method ended with.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import argon2
import grpc
import grpc_testing
import pytest
from google.rpc import error_details_pb2, status_pb2

from authgrpc.authenticator import Authenticator
from authgrpc.config import Settings
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.principal import Principal, reset_principal, set_principal
from authgrpc.service import AuthServicer
from authgrpc.store import MemoryStore
from authgrpc.tokens import TokenIssuer, TokenVerifier
from authgrpc.v1 import auth_pb2

SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"]
PASSWORD = "correct horse battery"


class Aborted(Exception):
    """Raised by AsyncContext.abort*, once the status is set on the test context."""


class AsyncContext:
    """The awaitable context methods that AuthServicer uses, on a grpcio-testing one."""

    def __init__(self, context: Any):
        self._context = context

    def invocation_metadata(self) -> Any:
        return self._context.invocation_metadata()

    def peer(self) -> str:
        return "ipv4:192.0.2.7:4242"

    def time_remaining(self) -> Any:
        return self._context.time_remaining()

    async def abort_with_status(self, status: Any) -> None:
        # grpcio-testing's abort() drops trailing metadata, which carries the ErrorInfo.
        self._context.set_trailing_metadata(status.trailing_metadata)
        await self.abort(status.code, status.details)

    async def abort(self, code: grpc.StatusCode, details: str) -> None:
        self._context.set_code(code)
        self._context.set_details(details)
        raise Aborted


class SyncServicer:
    """Runs each AuthServicer coroutine on ``loop`` and waits for it."""

    def __init__(self, servicer: AuthServicer, loop: asyncio.AbstractEventLoop):
        self._servicer = servicer
        self._loop = loop
        self.principal: Principal | None = None

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._servicer, name)

        def call(request: Any, context: Any) -> Any:
            async def run() -> Any:
                token = set_principal(self.principal)
                try:
                    return await method(request, AsyncContext(context))
                except Aborted:
                    return None
                finally:
                    reset_principal(token)

            return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

        return call


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    event_loop = asyncio.new_event_loop()
    thread = threading.Thread(target=event_loop.run_forever, daemon=True)
    thread.start()
    yield event_loop
    event_loop.call_soon_threadsafe(event_loop.stop)
    thread.join(5)
    event_loop.close()


@pytest.fixture
def subject(
    loop: asyncio.AbstractEventLoop, keys: KeySet
) -> tuple[Any, SyncServicer, MemoryStore]:
    settings = Settings(listen="127.0.0.1:0", dev=True)
    store = MemoryStore()
    hasher = PasswordHasher(
        argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    issuer = TokenIssuer(
        keys, issuer="authgrpc", audience="authgrpc", lifetime_seconds=60
    )
    verifier = TokenVerifier(keys, issuer="authgrpc", audience="authgrpc")
    authenticator = Authenticator(settings, store, issuer, verifier, hasher)
    asyncio.run_coroutine_threadsafe(
        store.create_user("alice", hasher.hash_sync(PASSWORD), ()), loop
    ).result(5)
    servicer = SyncServicer(AuthServicer(authenticator, lambda: keys), loop)
    server = grpc_testing.server_from_dictionary(
        {SERVICE: servicer}, grpc_testing.strict_real_time()
    )
    return server, servicer, store


def invoke(
    server: Any, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()
) -> Any:
    rpc = server.invoke_unary_unary(
        SERVICE.methods_by_name[method], metadata, request, 5
    )
    return rpc.termination()


def reason(trailing_metadata: Any) -> str:
    raw = dict(trailing_metadata)["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return str(info.reason)


def test_login_returns_tokens_and_session(subject: Any) -> None:
    server, _, _ = subject

    response, _, code, _ = invoke(
        server, "Login", auth_pb2.LoginRequest(username="alice", password=PASSWORD)
    )

    assert code == grpc.StatusCode.OK
    assert response.token_type == "Bearer"
    assert response.refresh_token.startswith("rt1.")
    assert response.session.peer == "192.0.2.7"
    assert (
        response.session.absolute_expire_time.ToMilliseconds()
        > response.session.create_time.ToMilliseconds()
    )


def test_login_wrong_password_status(subject: Any) -> None:
    server, _, _ = subject

    _, trailing, code, details = invoke(
        server, "Login", auth_pb2.LoginRequest(username="alice", password="nope")
    )

    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert details == "invalid username or password"
    assert reason(trailing) == "INVALID_CREDENTIALS"


def test_logout_reads_authorization_metadata(subject: Any) -> None:
    server, _, _ = subject
    login, *_ = invoke(
        server, "Login", auth_pb2.LoginRequest(username="alice", password=PASSWORD)
    )

    _, _, code, _ = invoke(
        server,
        "Logout",
        auth_pb2.LogoutRequest(),
        (("authorization", f"bearer {login.access_token}"),),
    )
    _, trailing, after, _ = invoke(
        server,
        "ValidateSession",
        auth_pb2.ValidateSessionRequest(access_token=login.access_token),
    )

    assert code == grpc.StatusCode.OK
    assert after == grpc.StatusCode.UNAUTHENTICATED
    assert reason(trailing) == "SESSION_ENDED"


def test_logout_without_token_rejected(subject: Any) -> None:
    server, _, _ = subject

    _, trailing, code, _ = invoke(server, "Logout", auth_pb2.LogoutRequest())

    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert reason(trailing) == "TOKEN_MISSING"


def test_list_sessions_marks_current(subject: Any) -> None:
    server, servicer, _ = subject
    login, *_ = invoke(
        server, "Login", auth_pb2.LoginRequest(username="alice", password=PASSWORD)
    )
    servicer.principal = Principal(
        login.session.user_id, "alice", (), login.session.session_id
    )

    response, _, code, _ = invoke(
        server, "ListSessions", auth_pb2.ListSessionsRequest()
    )

    assert code == grpc.StatusCode.OK
    assert [s.current for s in response.sessions] == [True]


def test_revoke_session_validates_id(subject: Any) -> None:
    server, servicer, _ = subject
    servicer.principal = Principal("u", "alice", (), "s")

    _, trailing, code, _ = invoke(
        server, "RevokeSession", auth_pb2.RevokeSessionRequest(session_id="")
    )

    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert reason(trailing) == "INVALID_ARGUMENT"


def test_unexpected_error_is_internal(subject: Any) -> None:
    server, servicer, _ = subject
    servicer.principal = None  # ListSessions without the interceptor has no principal

    _, _, code, details = invoke(server, "ListSessions", auth_pb2.ListSessionsRequest())

    assert code == grpc.StatusCode.INTERNAL
    assert details == "internal error"
