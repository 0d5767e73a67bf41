"""Helpers for the interceptor, validator and client tests.

Sessions are created straight in Redis with RedisStore and TokenIssuer. The
protected service is a greeter with all four RPC kinds that records each
call it handles, so a test can tell that a rejected call never reached it.
grpc.aio servers run on an event loop in a background thread, so that every
test can call them through a plain sync channel.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, TypeVar

import argon2
import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authgrpc.config import Settings
from authgrpc.errors import error_info
from authgrpc.example.v1 import greeter_pb2, greeter_pb2_grpc
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.principal import NoPrincipalError, current_principal
from authgrpc.redis_store import RedisStore
from authgrpc.server import start_server
from authgrpc.store import NewSession, SessionLimits, SessionRecord
from authgrpc.tokens import TokenIssuer

T = TypeVar("T")

ISSUER = "authgrpc"
AUDIENCE = "authgrpc"
LIMITS = SessionLimits(idle_ms=60_000, absolute_ms=120_000, touch_interval_ms=1000)
GREETER = "/authgrpc.example.v1.GreeterService"
KINDS = ["unary_unary", "unary_stream", "stream_unary", "stream_stream"]
ANONYMOUS = "<anonymous>"
PASSWORD = "correct horse battery"
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
# Above the 8 KiB authorization limit, so that oversized values reach bearer_token().
SERVER_OPTIONS = [("grpc.max_metadata_size", 32 * 1024)]


def run(coroutine: Awaitable[T]) -> T:
    """Run ``coroutine`` on a fresh event loop; for sync tests."""

    async def wrapper() -> T:
        return await coroutine

    return asyncio.run(wrapper())


@dataclass
class Session:
    """A session created straight in Redis, and an access token for it."""

    token: str
    record: SessionRecord


@dataclass
class Sessions:
    """Creates and ends sessions in the Redis at ``redis_url`` under ``prefix``."""

    redis_url: str
    prefix: str
    keys: KeySet

    def create(self, username: str = "alice", roles: Iterable[str] = ()) -> Session:
        return run(self.create_async(username, roles))

    def end(self, session: Session) -> None:
        run(self.end_async(session))

    async def create_async(
        self, username: str = "alice", roles: Iterable[str] = ()
    ) -> Session:
        store = RedisStore.from_url(self.redis_url, prefix=self.prefix)
        try:
            user = await store.get_user_by_name(username)
            if user is None:
                user = await store.create_user(username, "unused-hash", tuple(roles))
            record = await store.create_session(user, NewSession(b"h", b"k"), LIMITS)
        finally:
            await store.close()
        issuer = TokenIssuer(
            self.keys, issuer=ISSUER, audience=AUDIENCE, lifetime_seconds=300
        )
        issued = issuer.issue(record.user_id, record.session_id)
        return Session(issued.token, record)

    async def end_async(self, session: Session) -> None:
        store = RedisStore.from_url(self.redis_url, prefix=self.prefix)
        try:
            await store.end_session(session.record.user_id, session.record.session_id)
        finally:
            await store.close()


@pytest.fixture
def sessions(redis_url: str, prefix: str, keys: KeySet) -> Sessions:
    return Sessions(redis_url, prefix, keys)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _username() -> str:
    try:
        return current_principal().username
    except NoPrincipalError:
        return ANONYMOUS


@dataclass
class Calls:
    """What the recording greeters handled: (method, username) per call."""

    handled: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, method: str) -> str:
        name = _username()
        with self.lock:
            self.handled.append((method, name))
        return name


class BoomError(RuntimeError):
    """Raised by the recording greeters for a SayHello message of "boom"."""


class RecordingGreeter(greeter_pb2_grpc.GreeterServiceServicer):  # type: ignore[misc]
    """A sync greeter that records each call and greets the current principal.

    The username is read again on every streamed message, so a test sees
    whether the principal is current while a streaming handler runs.
    """

    def __init__(self, calls: Calls):
        self.calls = calls

    def SayHello(self, request: Any, context: Any) -> Any:
        name = self.calls.record("SayHello")
        if request.message == "boom":
            raise BoomError("boom")
        return greeter_pb2.SayHelloResponse(greeting=name)

    def StreamGreetings(self, request: Any, context: Any) -> Iterator[Any]:
        self.calls.record("StreamGreetings")
        for index in range(1, request.count + 1):
            yield greeter_pb2.StreamGreetingsResponse(greeting=_username(), index=index)

    def CollectGreetings(self, request_iterator: Iterator[Any], context: Any) -> Any:
        self.calls.record("CollectGreetings")
        names = [request.name for request in request_iterator]
        return greeter_pb2.CollectGreetingsResponse(
            greeting=_username(), count=len(names)
        )

    def Chat(self, request_iterator: Iterator[Any], context: Any) -> Iterator[Any]:
        self.calls.record("Chat")
        for request in request_iterator:
            yield greeter_pb2.ChatResponse(reply=f"{_username()}:{request.message}")


class AsyncRecordingGreeter(greeter_pb2_grpc.GreeterServiceServicer):  # type: ignore[misc]
    """The grpc.aio counterpart of RecordingGreeter."""

    def __init__(self, calls: Calls):
        self.calls = calls

    async def SayHello(self, request: Any, context: Any) -> Any:
        name = self.calls.record("SayHello")
        if request.message == "boom":
            raise BoomError("boom")
        await asyncio.sleep(0)
        return greeter_pb2.SayHelloResponse(greeting=name)

    async def StreamGreetings(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.calls.record("StreamGreetings")
        for index in range(1, request.count + 1):
            await asyncio.sleep(0)
            yield greeter_pb2.StreamGreetingsResponse(greeting=_username(), index=index)

    async def CollectGreetings(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> Any:
        self.calls.record("CollectGreetings")
        names = [request.name async for request in request_iterator]
        return greeter_pb2.CollectGreetingsResponse(
            greeting=_username(), count=len(names)
        )

    async def Chat(
        self, request_iterator: AsyncIterator[Any], context: Any
    ) -> AsyncIterator[Any]:
        self.calls.record("Chat")
        async for request in request_iterator:
            yield greeter_pb2.ChatResponse(reply=f"{_username()}:{request.message}")


def call(
    stub: Any,
    kind: str,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float = 5,
) -> list[str]:
    """Call the greeter method of ``kind`` and return the greetings it sent."""
    if kind == "unary_unary":
        request = greeter_pb2.SayHelloRequest(message="hi")
        return [stub.SayHello(request, metadata=metadata, timeout=timeout).greeting]
    if kind == "unary_stream":
        request = greeter_pb2.StreamGreetingsRequest(count=2)
        responses = stub.StreamGreetings(request, metadata=metadata, timeout=timeout)
        return [response.greeting for response in responses]
    if kind == "stream_unary":
        requests = iter(
            [greeter_pb2.CollectGreetingsRequest(name=n) for n in ("a", "b")]
        )
        return [
            stub.CollectGreetings(requests, metadata=metadata, timeout=timeout).greeting
        ]
    requests = iter([greeter_pb2.ChatRequest(message=text) for text in ("x", "y")])
    responses = stub.Chat(requests, metadata=metadata, timeout=timeout)
    return [response.reply.partition(":")[0] for response in responses]


def expect_error(
    stub: Any,
    kind: str,
    metadata: list[tuple[str, str]] | None = None,
    timeout: float = 5,
) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call(stub, kind, metadata, timeout)
    return caught.value


def reason_of(error: grpc.RpcError) -> str | None:
    info = error_info(error)
    return None if info is None else info.reason


class AioServerThread:
    """A grpc.aio server on an event loop of its own, in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.server: Any = None

    def run(self, coroutine: Awaitable[T], timeout: float = 10) -> T:
        async def wrapper() -> T:
            return await coroutine

        return asyncio.run_coroutine_threadsafe(wrapper(), self.loop).result(timeout)

    def start(self, build: Callable[[], Awaitable[tuple[Any, int]]]) -> int:
        async def start() -> int:
            self.server, port = await build()
            await self.server.start()
            return port

        return self.run(start())

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()


def _health() -> health.HealthServicer:
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return servicer


@dataclass
class Running:
    """A started greeter server, the calls it handled, and a stub to call it."""

    calls: Calls
    port: int
    channel: grpc.Channel
    stub: Any
    stop: Callable[[], None]

    def health_check(self, metadata: list[tuple[str, str]] | None = None) -> Any:
        stub = health_pb2_grpc.HealthStub(self.channel)
        return stub.Check(health_pb2.HealthCheckRequest(), metadata=metadata, timeout=5)


def start_sync(interceptors: list[Any], max_workers: int = 4) -> Running:
    calls = Calls()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=interceptors,
        options=SERVER_OPTIONS,
    )
    greeter_pb2_grpc.add_GreeterServiceServicer_to_server(
        RecordingGreeter(calls), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(_health(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def stop() -> None:
        channel.close()
        server.stop(0).wait()

    return Running(
        calls, port, channel, greeter_pb2_grpc.GreeterServiceStub(channel), stop
    )


def start_aio(
    make_interceptors: Callable[[], list[Any]], *, sync_handlers: bool = False
) -> Running:
    """Start a grpc.aio greeter; ``make_interceptors`` runs on the server's loop.

    With ``sync_handlers`` the greeter's methods are plain functions and
    generators, which the async interceptor runs in threads.
    """
    calls = Calls()
    thread = AioServerThread()

    async def build() -> tuple[Any, int]:
        health_servicer = health.aio.HealthServicer()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        server = grpc.aio.server(
            interceptors=make_interceptors(), options=SERVER_OPTIONS
        )
        greeter: Any = (
            RecordingGreeter(calls) if sync_handlers else AsyncRecordingGreeter(calls)
        )
        greeter_pb2_grpc.add_GreeterServiceServicer_to_server(greeter, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        return server, server.add_insecure_port("127.0.0.1:0")

    port = thread.start(build)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def stop() -> None:
        channel.close()
        thread.stop()

    return Running(
        calls, port, channel, greeter_pb2_grpc.GreeterServiceStub(channel), stop
    )


class ErrorMappingInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Turns every exception a handler raises into INTERNAL, as many services do."""

    def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None

        def guard(behavior: Any, streaming: bool) -> Any:
            def unary(request: Any, context: Any) -> Any:
                try:
                    return behavior(request, context)
                except Exception:
                    context.abort(grpc.StatusCode.INTERNAL, "internal error")

            def stream(request: Any, context: Any) -> Iterator[Any]:
                try:
                    yield from behavior(request, context)
                except Exception:
                    context.abort(grpc.StatusCode.INTERNAL, "internal error")

            return stream if streaming else unary

        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary, False), **options
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard(handler.stream_unary, False), **options
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream, True), **options
            )
        return grpc.stream_stream_rpc_method_handler(
            guard(handler.stream_stream, True), **options
        )


class AsyncErrorMappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """The grpc.aio counterpart of ErrorMappingInterceptor."""

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None

        def guard(behavior: Any, streaming: bool) -> Any:
            async def unary(request: Any, context: Any) -> Any:
                try:
                    return await behavior(request, context)
                except Exception:
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for item in behavior(request, context):
                        yield item
                except Exception:
                    await context.abort(grpc.StatusCode.INTERNAL, "internal error")

            return stream if streaming else unary

        options = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                guard(handler.unary_unary, False), **options
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                guard(handler.stream_unary, False), **options
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                guard(handler.unary_stream, True), **options
            )
        return grpc.stream_stream_rpc_method_handler(
            guard(handler.stream_stream, True), **options
        )


@pytest.fixture
def auth_target(redis_url: str, prefix: str, keys: KeySet) -> Iterator[str]:
    """The address of a real auth server on the shared Redis, with user alice."""
    thread = AioServerThread()

    async def build() -> Any:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        hasher = PasswordHasher(FAST_HASHER)
        settings = Settings(listen="127.0.0.1:0", dev=True, grace_period=1)
        server = await start_server(settings, store=store, keys=keys, hasher=hasher)
        if await store.get_user_by_name("alice") is None:
            await store.create_user("alice", hasher.hash_sync(PASSWORD), ("reader",))
        return server

    thread.server = thread.run(build())
    yield thread.server.address
    thread.stop()
