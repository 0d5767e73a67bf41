"""Assembling and running the auth server.

The server combines the store, keys, servicer, health, reflection and
graceful shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from authgrpc.authenticator import Authenticator
from authgrpc.cache import (
    MAX_STALENESS,
    InvalidationListener,
    ValidationCache,
    subscriber_factory,
)
from authgrpc.config import Settings
from authgrpc.errors import AuthError, ConfigurationError
from authgrpc.interceptor import AsyncAuthInterceptor
from authgrpc.keys import (
    KeySet,
    SigningKey,
    generate_private_key,
    key_id,
    load_signing_keys,
)
from authgrpc.metrics import NullMetrics, PrometheusMetrics, count_live_sessions
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import RedisStore, guarded
from authgrpc.service import PUBLIC_METHODS, SERVICE_NAME, AuthServicer
from authgrpc.store import MemoryStore, SessionStore
from authgrpc.tokens import TokenIssuer, TokenVerifier
from authgrpc.v1 import auth_pb2_grpc

log = logging.getLogger("authgrpc.server")

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
REFLECTION_SERVICES = (
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
HEALTH_CHECK_INTERVAL = 1.0


class _CancelledCallFilter(logging.Filter):
    """Drop grpc's tracebacks of cancelled calls, such as streams open at shutdown.

    grpc.aio logs the CancelledError of every call it cancels, Health.Watch
    streams still open when the grace period ends included, as if the
    handler had failed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, asyncio.CancelledError)


_CANCELLED_CALL_FILTER = _CancelledCallFilter()


def ephemeral_keys(algorithm: str = "EdDSA") -> KeySet:
    """Return a key set with a fresh key that exists only in this process (dev mode)."""
    key = generate_private_key(algorithm)
    kid = key_id(key, algorithm)
    signing = SigningKey(kid, algorithm, key)
    return KeySet(algorithm, {kid: signing.verification_key}, signing)


def open_store(settings: Settings) -> SessionStore:
    """Return a RedisStore for ``settings.redis_url``, or in dev mode a MemoryStore."""
    if settings.redis_url:
        return RedisStore.from_url(
            settings.redis_url,
            prefix=settings.redis_prefix,
            timeout=settings.redis_timeout,
        )
    if settings.dev:
        return MemoryStore()
    raise ConfigurationError(
        "no session store: pass --redis-url URL (or set AUTHGRPC_REDIS_URL), "
        "or use --dev"
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def check_eviction_policy(store: RedisStore, *, refuse: bool) -> None:
    """Warn, or with ``refuse`` raise, when Redis may evict sessions and counters."""
    try:
        await guarded(store.client.dbsize())
    except redis.exceptions.ResponseError as error:
        # A reachable Redis that rejects the connection's set-up, such as a
        # database index out of range, would fail every call later on.
        raise ConfigurationError(f"Redis rejected the connection: {error}") from None
    except AuthError:
        # Unreachable for now. The health watcher logs it and reports
        # NOT_SERVING until Redis responds; the policy goes unchecked.
        return
    try:
        reply = await guarded(store.client.config_get("maxmemory-policy"))
    except (AuthError, redis.exceptions.ResponseError) as error:
        # Managed Redis services often disable CONFIG; the check is advisory then.
        log.warning(
            "cannot read Redis maxmemory-policy (%s); make sure it is noeviction",
            type(error).__name__,
        )
        return
    policies = {_text(key): _text(value) for key, value in dict(reply).items()}
    name = policies.get("maxmemory-policy", "")
    # Every session and counter key has a TTL, so volatile-* policies evict them too.
    if name and name != "noeviction":
        message = (
            f"Redis maxmemory-policy is {name}: under memory pressure Redis would "
            "evict sessions and failed-login counters; set it to noeviction"
        )
        if refuse:
            raise ConfigurationError(message)
        log.warning(message)


@dataclass
class AuthServer:
    """A running auth server and the parts that its tests and the CLI reach into."""

    settings: Settings
    server: grpc.aio.Server
    port: int
    store: SessionStore
    authenticator: Authenticator
    health: Any
    keys: KeySet
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    metrics_http: Any = None
    listener: InvalidationListener | None = None
    _serving: bool | None = None

    @property
    def address(self) -> str:
        host = self.settings.listen.rpartition(":")[0]
        return f"{host}:{self.port}"

    def reload_keys(self) -> bool:
        """Reload the key set from disk; on an invalid one, log why and keep the old."""
        path = self.settings.signing_key
        if path is None:
            return False
        try:
            keys = load_signing_keys(path, self.settings.algorithm)
        except AuthError as error:
            log.error("key reload failed, keeping the current keys: %s", error.message)
            return False
        if set(keys.verification_keys) == set(self.keys.verification_keys) and (
            keys.signing_key
            and self.keys.signing_key
            and keys.signing_key.kid == self.keys.signing_key.kid
        ):
            return False
        self.keys = keys
        self.authenticator.issuer.keys = keys
        self.authenticator.verifier.replace_keys(keys)
        active = keys.signing_key.kid if keys.signing_key else "-"
        log.info(
            "keys reloaded: active kid=%s, verification kids=%s",
            active,
            ",".join(sorted(keys.verification_keys)),
        )
        return True

    async def watch_store(self) -> None:
        """Keep the health status in step with the store's reachability."""
        while True:
            try:
                await asyncio.wait_for(
                    self.store.ping(), self.settings.redis_timeout * 2
                )
                serving = True
            except (AuthError, TimeoutError, OSError) as error:
                if self._serving is not False:
                    log.error(
                        "session store unreachable, health is NOT_SERVING: %s", error
                    )
                serving = False
            if serving != self._serving:
                if serving and self._serving is False:
                    log.info("session store reachable again, health is SERVING")
                await self._set_health(serving)
                self._serving = serving
            await asyncio.sleep(HEALTH_CHECK_INTERVAL)

    async def watch_keys(self) -> None:
        """Reload keys on a timer, so that a rotation on disk needs no restart."""
        while True:
            await asyncio.sleep(self.settings.key_reload_interval)
            self.reload_keys()

    async def _set_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, finish in-flight calls within the grace period, close."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        await self.server.stop(self.settings.grace_period if grace is None else grace)
        # Calls cut off at the end of the grace period finish cancelling on
        # later loop iterations. Waiting briefly lets them end before the
        # loop closes.
        await asyncio.sleep(0.05)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
        if self.listener is not None:
            await asyncio.to_thread(self.listener.stop)
        await self.store.close()
        self.authenticator.hasher.close()
        log.info("server stopped: address=%s", self.address)


async def start_server(
    settings: Settings,
    *,
    store: SessionStore | None = None,
    keys: KeySet | None = None,
    hasher: PasswordHasher | None = None,
    before_start: Callable[[AuthServer], Awaitable[None]] | None = None,
) -> AuthServer:
    """Build the server from ``settings``, bind it, start it, and return it.

    ``before_start`` runs once the port is bound but before any call is
    accepted, for set-up such as dev mode's demo user.
    """
    logging.getLogger("grpc._cython.cygrpc").addFilter(_CANCELLED_CALL_FILTER)
    if keys is None:
        if settings.signing_key is not None:
            keys = load_signing_keys(settings.signing_key, settings.algorithm)
        elif settings.dev:
            keys = ephemeral_keys(settings.algorithm)
        else:
            raise ConfigurationError(
                "no signing key: pass --signing-key PATH or use --dev"
            )
    store = store or open_store(settings)
    if isinstance(store, RedisStore):
        await check_eviction_policy(store, refuse=settings.refuse_evicting_redis)
    issuer = TokenIssuer(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        lifetime_seconds=settings.access_token_ttl,
    )
    verifier = TokenVerifier(
        keys,
        issuer=settings.issuer,
        audience=settings.audience,
        leeway_seconds=settings.leeway,
    )
    hasher = hasher or PasswordHasher(workers=settings.hash_workers)
    cache, listener = _validation_cache(settings, store)
    authenticator = Authenticator(settings, store, issuer, verifier, hasher, cache)

    public = (
        *PUBLIC_METHODS,
        f"/{HEALTH_SERVICE}/*",
        *(f"/{name}/*" for name in REFLECTION_SERVICES),
    )
    interceptor = AsyncAuthInterceptor(authenticator.validator, public_methods=public)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", settings.max_message_bytes),
            ("grpc.max_send_message_length", settings.max_message_bytes),
            ("grpc.max_metadata_size", settings.max_metadata_bytes),
            # gRPC turns SO_REUSEPORT on by default, which would let a second
            # server (a stray dev server, say) share the port unnoticed.
            ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
        ],
    )
    metrics = PrometheusMetrics() if settings.metrics_listen else NullMetrics()
    servicer = AuthServicer(authenticator, lambda: authenticator.verifier.keys, metrics)
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server
    )

    port = _bind(server, settings)
    running = AuthServer(
        settings, server, port, store, authenticator, health_servicer, keys
    )
    if before_start is not None:
        await before_start(running)
    await server.start()
    running.listener = listener
    if isinstance(metrics, PrometheusMetrics) and settings.metrics_listen:
        running.metrics_http = metrics.serve_http(settings.metrics_listen)
        if isinstance(store, RedisStore):
            pattern = f"{store.keys.prefix}:{{u:*}}:s:*"
            task = asyncio.create_task(
                count_live_sessions(metrics, store.client, pattern)
            )
            running._tasks.append(task)
    await running._set_health(True)
    running._tasks.append(asyncio.create_task(running.watch_store()))
    if settings.signing_key is not None and settings.key_reload_interval > 0:
        running._tasks.append(asyncio.create_task(running.watch_keys()))
    transport = (
        "TLS" + (" with client certificates" if settings.tls_client_ca else "")
        if settings.tls_cert
        else "plaintext (local use only)"
    )
    log.info(
        "server started: address=%s transport=%s algorithm=%s kid=%s store=%s",
        running.address,
        transport,
        keys.algorithm,
        keys.signing_key.kid if keys.signing_key else "-",
        type(store).__name__,
    )
    return running


def _validation_cache(
    settings: Settings, store: SessionStore
) -> tuple[ValidationCache | None, InvalidationListener | None]:
    """Return the cache for the server's own validations, fed by every session end."""
    if not settings.validation_cache:
        return None, None
    recheck = min(max(settings.touch_interval, 0.05), MAX_STALENESS)
    cache = ValidationCache(recheck_after=recheck)
    if isinstance(store, MemoryStore):
        store.on_session_end = cache.invalidate
        cache.clear(enable=True)
        return cache, None
    if isinstance(store, RedisStore) and settings.redis_url:
        factory = subscriber_factory(settings.redis_url, settings.redis_timeout)
        listener = InvalidationListener(factory, store.keys.channel, cache).start()
        return cache, listener
    return None, None


def _bind(server: grpc.aio.Server, settings: Settings) -> int:
    try:
        port = _add_port(server, settings)
    except RuntimeError:
        # grpc.aio raises where the sync server returns 0.
        port = 0
    if port == 0:
        raise ConfigurationError(
            f"cannot listen on {settings.listen}: the address is invalid or in use"
        )
    return int(port)


def _add_port(server: grpc.aio.Server, settings: Settings) -> int:
    if settings.tls_cert is None or settings.tls_key is None:
        return int(server.add_insecure_port(settings.listen))
    root = Path(settings.tls_client_ca).read_bytes() if settings.tls_client_ca else None
    credentials = grpc.ssl_server_credentials(
        [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
        root_certificates=root,
        require_client_auth=root is not None,
    )
    return int(server.add_secure_port(settings.listen, credentials))


async def serve(
    settings: Settings,
    *,
    before_start: Callable[[AuthServer], Awaitable[None]] | None = None,
) -> None:
    """Run the server until SIGTERM or SIGINT, reloading keys on SIGHUP."""
    running = await start_server(settings, before_start=before_start)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, running.reload_keys)
    await stop.wait()
    log.info(
        "shutdown requested, finishing in-flight calls for up to %.1f s",
        settings.grace_period,
    )
    with contextlib.suppress(asyncio.CancelledError):
        await running.stop()
