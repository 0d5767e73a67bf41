"""Server processes for the benchmark: the auth service and the protected no-op service.

Each server runs in its own process, started with the ``spawn`` method, and
sends ``("ready", port)`` or ``("failed", message)`` on its pipe once it is
listening. It serves until the parent sends anything on the pipe, or the pipe
closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import grpc
import redis

from authgrpc.cache import InvalidationListener, ValidationCache
from authgrpc.config import Settings
from authgrpc.interceptor import AsyncAuthInterceptor
from authgrpc.keys import load_verification_keys
from authgrpc.principal import Principal
from authgrpc.redis_store import KeyLayout, RedisStore
from authgrpc.server import start_server
from authgrpc.store import SessionRecord, ThrottlePolicy
from authgrpc.tokens import TokenVerifier
from authgrpc.validators import (
    AsyncLocalValidator,
    AsyncRemoteValidator,
    Validation,
    session_limits,
)

NOOP_METHOD = "/authgrpc.bench.v1.NoopService/Call"
ISSUER = "authgrpc"
AUDIENCE = "authgrpc"
# The benchmark logs in from one address with many parallel attempts, and the
# throttle counts each attempt while it runs, so the default limit of 5 would
# lock the bench client out. The counter scripts run the same either way.
BENCH_THROTTLE = ThrottlePolicy(max_failures=1_000_000)

# The validator kinds of the protected server, in table order.
VALIDATOR_KINDS = ("none", "public", "local", "remote", "cached", "signature")


@dataclass(frozen=True)
class ServerSpec:
    """The description of what one benchmark server process runs."""

    kind: str  # "auth", or one of VALIDATOR_KINDS for the no-op service
    redis_url: str
    key_path: Path
    auth_target: str = ""


def server_options(settings: Settings) -> list[tuple[str, Any]]:
    """Return the channel arguments that ``authgrpc.server.start_server`` passes."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", settings.max_metadata_bytes),
        ("grpc.so_reuseport", 1),
    ]


class SignatureOnlyValidator:
    """The stateless reference: verifies the JWT and never looks the session up.

    A logout does not reach it, so it is not a real validator; the benchmark
    uses it only to show what the session lookup costs.
    """

    def __init__(self, verifier: TokenVerifier):
        self.verifier = verifier

    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        claims = self.verifier.verify(token)
        session = SessionRecord(
            session_id=claims.session_id,
            user_id=claims.user_id,
            username="",
            roles=(),
            created_ms=claims.issued_at * 1000,
            absolute_expiry_ms=claims.expires_at * 1000,
            idle_expiry_ms=claims.expires_at * 1000,
            last_seen_ms=claims.issued_at * 1000,
        )
        principal = Principal(claims.user_id, "", (), claims.session_id)
        return Validation(principal, session, claims)


def _verifier(key_path: Path) -> TokenVerifier:
    keys = load_verification_keys(key_path)
    return TokenVerifier(keys, issuer=ISSUER, audience=AUDIENCE)


def _validator(spec: ServerSpec) -> tuple[Any, Callable[[], None]]:
    """Build the validator of a no-op server; also return what stops its helpers."""
    if spec.kind == "remote":
        return AsyncRemoteValidator(spec.auth_target), lambda: None
    verifier = _verifier(spec.key_path)
    if spec.kind == "signature":
        return SignatureOnlyValidator(verifier), lambda: None
    defaults = Settings(dev=True)
    store = RedisStore.from_url(spec.redis_url, timeout=defaults.redis_timeout)
    if spec.kind == "local":
        limits = session_limits(defaults.idle_timeout, defaults.touch_interval)
        return AsyncLocalValidator(verifier, store, limits), lambda: None
    cache = ValidationCache(recheck_after=defaults.touch_interval)

    def client_factory() -> redis.Redis:
        return redis.Redis.from_url(
            spec.redis_url, socket_timeout=1.0, socket_connect_timeout=1.0
        )

    listener = InvalidationListener(client_factory, KeyLayout().channel, cache)
    listener.start()
    if not listener.wait_connected(10):
        raise RuntimeError("the invalidation listener did not subscribe within 10 s")
    limits = session_limits(defaults.idle_timeout, defaults.touch_interval)
    validator = AsyncLocalValidator(verifier, store, limits, cache=cache)
    return validator, listener.stop


async def _noop(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return b""


async def _start_noop_server(spec: ServerSpec) -> tuple[grpc.aio.Server, int, Any]:
    settings = Settings(dev=True)
    interceptors = []
    stop_helpers: Callable[[], None] = lambda: None  # noqa: E731
    if spec.kind == "public":
        # The no-op passes through the interceptor as a public method, as
        # ValidateSession passes through the auth server's interceptor.
        interceptors.append(
            AsyncAuthInterceptor(_NeverCalled(), public_methods=[NOOP_METHOD])
        )
    elif spec.kind != "none":
        validator, stop_helpers = _validator(spec)
        interceptors.append(AsyncAuthInterceptor(validator))
    server = grpc.aio.server(
        interceptors=interceptors, options=server_options(settings)
    )
    handler = grpc.unary_unary_rpc_method_handler(_noop)
    service, _, method = NOOP_METHOD[1:].partition("/")
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler(service, {method: handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, stop_helpers


class _NeverCalled:
    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        raise AssertionError("a public method must not be validated")


async def _serve(spec: ServerSpec, conn: Connection) -> None:
    stop_helpers: Callable[[], None] = lambda: None  # noqa: E731
    if spec.kind == "auth":
        settings = Settings(
            listen="127.0.0.1:0",
            redis_url=spec.redis_url,
            signing_key=spec.key_path,
            throttle=BENCH_THROTTLE,
            key_reload_interval=0,
        )
        running = await start_server(settings)
        port = running.port

        async def stop() -> None:
            await running.stop(grace=0)

    else:
        server, port, stop_helpers = await _start_noop_server(spec)

        async def stop() -> None:
            await server.stop(0)

    conn.send(("ready", port))
    loop = asyncio.get_running_loop()
    # Block on the pipe in a thread, so the event loop only serves calls.
    await loop.run_in_executor(None, _wait_for_stop, conn)
    stop_helpers()
    await stop()


def _wait_for_stop(conn: Connection) -> None:
    with contextlib.suppress(EOFError):
        conn.recv()


def run_server(spec: ServerSpec, conn: Connection) -> None:
    """Process entry point: serve ``spec`` until the parent tells it to stop."""
    logging.basicConfig(level=logging.WARNING)
    try:
        asyncio.run(_serve(spec, conn))
    except Exception as error:
        conn.send(("failed", f"{type(error).__name__}: {error}"))
        raise


def wait_ready(conn: Connection, name: str, timeout: float = 30.0) -> int:
    """Return the port that a server process reports, or raise if it failed to start."""
    deadline = time.monotonic() + timeout
    if not conn.poll(max(0.0, deadline - time.monotonic())):
        raise RuntimeError(f"server {name} did not start within {timeout:.0f} s")
    status, value = conn.recv()
    if status != "ready":
        raise RuntimeError(f"server {name} failed to start: {value}")
    return int(value)
