"""The greeter servicers, sync and asyncio, and the servers that protect them.

Every greeting names ``current_principal().username``, which the auth
interceptor sets. The health service is the only public one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from authgrpc.example.v1 import greeter_pb2, greeter_pb2_grpc
from authgrpc.interceptor import AsyncAuthInterceptor, AuthInterceptor
from authgrpc.principal import current_principal
from authgrpc.validators import AsyncValidator, Validator

SERVICE_NAME = "authgrpc.example.v1.GreeterService"
PUBLIC_METHODS = ("/grpc.health.v1.Health/*",)
MAX_TEXT_BYTES = 256
MAX_GREETINGS = 100
DEFAULT_GREETINGS = 3


def _greeting(suffix: str = "") -> str:
    text = f"Hello, {current_principal().username}!"
    return f"{text} {suffix}" if suffix else text


def _check_text(field: str, value: str) -> str | None:
    if len(value.encode()) > MAX_TEXT_BYTES:
        return f"{field} is longer than {MAX_TEXT_BYTES} bytes"
    return None


def _greeting_count(request: greeter_pb2.StreamGreetingsRequest) -> int | None:
    if request.count == 0:
        return DEFAULT_GREETINGS
    if 1 <= request.count <= MAX_GREETINGS:
        return request.count
    return None


_COUNT_ERROR = (
    f"count must be between 1 and {MAX_GREETINGS}, or 0 for {DEFAULT_GREETINGS}"
)


class Greeter(greeter_pb2_grpc.GreeterServiceServicer):  # type: ignore[misc]
    """The greeter for ``grpc.server``."""

    def SayHello(
        self, request: greeter_pb2.SayHelloRequest, context: grpc.ServicerContext
    ) -> greeter_pb2.SayHelloResponse:
        error = _check_text("message", request.message)
        if error:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return greeter_pb2.SayHelloResponse(greeting=_greeting(request.message))

    def StreamGreetings(
        self, request: greeter_pb2.StreamGreetingsRequest, context: grpc.ServicerContext
    ) -> Iterator[greeter_pb2.StreamGreetingsResponse]:
        count = _greeting_count(request)
        if count is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, _COUNT_ERROR)
            return
        for index in range(1, count + 1):
            yield greeter_pb2.StreamGreetingsResponse(greeting=_greeting(), index=index)

    def CollectGreetings(
        self,
        request_iterator: Iterator[greeter_pb2.CollectGreetingsRequest],
        context: grpc.ServicerContext,
    ) -> greeter_pb2.CollectGreetingsResponse:
        names = []
        for request in request_iterator:
            error = _check_text("name", request.name)
            if error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            names.append(request.name)
        greeting = (
            _greeting("Greetings to " + ", ".join(names) + ".")
            if names
            else _greeting()
        )
        return greeter_pb2.CollectGreetingsResponse(greeting=greeting, count=len(names))

    def Chat(
        self,
        request_iterator: Iterator[greeter_pb2.ChatRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[greeter_pb2.ChatResponse]:
        for request in request_iterator:
            error = _check_text("message", request.message)
            if error:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            yield greeter_pb2.ChatResponse(
                reply=_greeting(f"You said: {request.message}")
            )


class AsyncGreeter(greeter_pb2_grpc.GreeterServiceServicer):  # type: ignore[misc]
    """The greeter for ``grpc.aio.server``."""

    async def SayHello(
        self, request: greeter_pb2.SayHelloRequest, context: grpc.aio.ServicerContext
    ) -> greeter_pb2.SayHelloResponse:
        error = _check_text("message", request.message)
        if error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
        return greeter_pb2.SayHelloResponse(greeting=_greeting(request.message))

    async def StreamGreetings(
        self,
        request: greeter_pb2.StreamGreetingsRequest,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[greeter_pb2.StreamGreetingsResponse]:
        count = _greeting_count(request)
        if count is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _COUNT_ERROR)
            return
        for index in range(1, count + 1):
            yield greeter_pb2.StreamGreetingsResponse(greeting=_greeting(), index=index)

    async def CollectGreetings(
        self,
        request_iterator: AsyncIterator[greeter_pb2.CollectGreetingsRequest],
        context: grpc.aio.ServicerContext,
    ) -> greeter_pb2.CollectGreetingsResponse:
        names = []
        async for request in request_iterator:
            error = _check_text("name", request.name)
            if error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            names.append(request.name)
        greeting = (
            _greeting("Greetings to " + ", ".join(names) + ".")
            if names
            else _greeting()
        )
        return greeter_pb2.CollectGreetingsResponse(greeting=greeting, count=len(names))

    async def Chat(
        self,
        request_iterator: AsyncIterator[greeter_pb2.ChatRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[greeter_pb2.ChatResponse]:
        async for request in request_iterator:
            error = _check_text("message", request.message)
            if error:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, error)
            yield greeter_pb2.ChatResponse(
                reply=_greeting(f"You said: {request.message}")
            )


def _health() -> health.HealthServicer:
    servicer = health.HealthServicer()
    for service in ("", SERVICE_NAME):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return servicer


async def _async_health() -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    for service in ("", SERVICE_NAME):
        await servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def build_server(
    validator: Validator,
    listen: str,
    *,
    required_roles: Mapping[str, Iterable[str]] | None = None,
    max_workers: int = 8,
) -> tuple[grpc.Server, int]:
    """Build a ``grpc.server`` with the protected greeter; return it and its bound port.

    The server is not started. Port 0 in ``listen`` picks a free port.
    """
    interceptor = AuthInterceptor(validator, PUBLIC_METHODS, required_roles)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers), interceptors=[interceptor]
    )
    greeter_pb2_grpc.add_GreeterServiceServicer_to_server(Greeter(), server)
    health_pb2_grpc.add_HealthServicer_to_server(_health(), server)
    port = server.add_insecure_port(listen)
    return server, port


async def build_async_server(
    validator: AsyncValidator,
    listen: str,
    *,
    required_roles: Mapping[str, Iterable[str]] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Build a ``grpc.aio.server`` with the protected greeter; return it and its port.

    The server is not started. Port 0 in ``listen`` picks a free port.
    """
    interceptor = AsyncAuthInterceptor(validator, PUBLIC_METHODS, required_roles)
    server = grpc.aio.server(interceptors=[interceptor])
    greeter_pb2_grpc.add_GreeterServiceServicer_to_server(AsyncGreeter(), server)
    health_pb2_grpc.add_HealthServicer_to_server(await _async_health(), server)
    port = server.add_insecure_port(listen)
    return server, port
