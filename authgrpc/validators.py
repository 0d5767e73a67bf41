"""Validators: turn an access token into a Principal, or raise the reason it is refused.

A validator checks the token's signature and claims and that its session is
still live. Every validator raises :class:`~authgrpc.errors.Unauthenticated`
for a bad token or an ended session and
:class:`~authgrpc.errors.StoreUnavailable` when it cannot find out, so
callers fail closed.

Two kinds exist, each in a sync and an asyncio flavour:

- local validators (:class:`LocalValidator`, :class:`AsyncLocalValidator`)
  verify the signature with the auth service's public keys and check the
  session in the auth service's Redis themselves;
- remote validators (:class:`RemoteValidator`, :class:`AsyncRemoteValidator`)
  call ``AuthService/ValidateSession``.

Every validator takes ``timeout``, the caller's remaining time in seconds, and
gives up with StoreUnavailable once it has passed. The local validators take
``cache=True`` to keep recently validated sessions in memory. A cached
session ended by another process may be accepted until its end message
arrives, for at most 0.25 s. :mod:`authgrpc.cache` explains the bound, and
why the cache turns itself off while that channel is down.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import grpc
import jwt

from authgrpc.cache import (
    MAX_STALENESS,
    InvalidationListener,
    ValidationCache,
    subscriber_factory,
)
from authgrpc.errors import (
    ERROR_DOMAIN,
    AuthError,
    ConfigurationError,
    Reason,
    StoreUnavailable,
    Unauthenticated,
    error_info,
    from_status,
)
from authgrpc.keys import (
    DEFAULT_ALGORITHM,
    KeySet,
    keyset_from_jwks,
    load_verification_keys,
)
from authgrpc.principal import Principal
from authgrpc.redis_store import KeyLayout, RedisStore, SyncSessionChecker
from authgrpc.store import SessionLimits, SessionRecord, SessionStore
from authgrpc.tokens import Claims, KeyRefresher, TokenVerifier
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("authgrpc.validators")

DEFAULT_IDLE_TIMEOUT = 30 * 60
DEFAULT_TOUCH_INTERVAL = 1.0

KeySource = KeySet | str | os.PathLike[str]
JwksFetcher = Callable[[], KeySet]


@dataclass(frozen=True, slots=True)
class Validation:
    """A successful validation: who is calling, and the session they hold."""

    principal: Principal
    session: SessionRecord
    claims: Claims


class Validator(Protocol):
    """The validator interface of the synchronous interceptor."""

    def validate(self, token: str, timeout: float | None = None) -> Validation: ...


class AsyncValidator(Protocol):
    """The validator interface of the asyncio interceptor."""

    async def validate(
        self, token: str, timeout: float | None = None
    ) -> Validation: ...


def session_limits(idle_timeout: float, touch_interval: float) -> SessionLimits:
    """Build the limits a validator extends sessions with; both in seconds.

    They must match the auth service's ``--idle-timeout`` and
    ``--touch-interval``, because each validation extends the session's idle
    expiry itself. A validation never changes the absolute expiry.
    """
    if idle_timeout <= 0:
        raise ConfigurationError(f"idle_timeout must be positive, not {idle_timeout}")
    if touch_interval < 0 or touch_interval >= idle_timeout:
        raise ConfigurationError(
            f"touch_interval must be at least 0 and shorter than idle_timeout, "
            f"not {touch_interval}"
        )
    idle_ms = int(idle_timeout * 1000)
    return SessionLimits(
        idle_ms=idle_ms,
        absolute_ms=idle_ms,
        touch_interval_ms=int(touch_interval * 1000),
    )


class GrpcJwksFetcher:
    """Fetches the verification keys from ``AuthService/GetJwks``.

    Calling it returns a KeySet of the keys for ``algorithm``, or raises
    StoreUnavailable when the call fails and ConfigurationError when the
    document is not a valid JWKS. ``credentials`` are channel credentials for
    TLS; without them the channel is plaintext.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 1.0,
        algorithm: str = DEFAULT_ALGORITHM,
    ):
        self.target = target
        self.timeout = timeout
        self.algorithm = algorithm
        self._channel = _channel(target, credentials)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    def __call__(self) -> KeySet:
        try:
            response = self._stub.GetJwks(
                auth_pb2.GetJwksRequest(), timeout=self.timeout
            )
        except grpc.RpcError as error:
            raise StoreUnavailable(
                f"fetching keys from {self.target} failed: {error.code().name}: "
                f"{error.details()}"
            ) from None
        return keyset_from_jwks(response.jwks_json, self.algorithm)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()


def load_keys(
    keys: KeySource | None, algorithm: str, jwks_fetcher: JwksFetcher | None
) -> KeySet:
    """Return ``keys`` as a KeySet, loading a path, or else call ``jwks_fetcher``."""
    if isinstance(keys, KeySet):
        return keys
    if keys is not None:
        return load_verification_keys(Path(keys), algorithm)
    if jwks_fetcher is None:
        raise ConfigurationError("no verification keys: pass keys or jwks_fetcher")
    return jwks_fetcher()


def _key_refresher(jwks_fetcher: JwksFetcher | None) -> KeyRefresher | None:
    if jwks_fetcher is None:
        return None

    def refresh() -> KeySet | None:
        try:
            return jwks_fetcher()
        except AuthError as error:
            log.warning(
                "refreshing verification keys failed, keeping the old ones: %s", error
            )
            return None

    return refresh


def _verifier(
    keys: KeySource | None,
    *,
    issuer: str,
    audience: str,
    leeway: float,
    algorithm: str,
    jwks_fetcher: JwksFetcher | None,
) -> TokenVerifier:
    return TokenVerifier(
        load_keys(keys, algorithm, jwks_fetcher),
        issuer=issuer,
        audience=audience,
        leeway_seconds=leeway,
        refresh_keys=_key_refresher(jwks_fetcher),
    )


def _principal(session: SessionRecord) -> Principal:
    return Principal(
        session.user_id, session.username, session.roles, session.session_id
    )


def _session_ended() -> Unauthenticated:
    return Unauthenticated(Reason.SESSION_ENDED, "session has ended")


def _store_timed_out(timeout: float | None) -> StoreUnavailable:
    return StoreUnavailable(f"session store check timed out after {timeout or 0:.3f} s")


def _deadline_passed() -> StoreUnavailable:
    return StoreUnavailable("the call's deadline passed before its session was checked")


class LocalValidator:
    """Validates tokens in sync code with the auth service's keys and its Redis.

    ``keys`` is a KeySet or a path to a JWKS file, a key file or a key
    directory. It may be None when ``jwks_fetcher``, such as a
    :class:`GrpcJwksFetcher`, supplies the keys. A token naming an unknown
    kid makes the verifier call ``jwks_fetcher`` again, at most once per 30
    seconds. ``redis_url`` and ``prefix`` must name the auth service's Redis
    and key prefix, and ``idle_timeout`` and ``touch_interval`` (seconds) its
    settings, since each validation extends the session's idle expiry.
    ``redis_timeout`` bounds each Redis connect and reply in seconds.
    """

    def __init__(
        self,
        keys: KeySource | None,
        *,
        issuer: str,
        audience: str,
        redis_url: str,
        prefix: str = "authgrpc",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        leeway: float = 30,
        redis_timeout: float = 1.0,
        jwks_fetcher: JwksFetcher | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        max_workers: int = 8,
        cache: bool = False,
    ):
        self.verifier = _verifier(
            keys,
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            algorithm=algorithm,
            jwks_fetcher=jwks_fetcher,
        )
        self.checker = SyncSessionChecker.from_url(
            redis_url, prefix=prefix, timeout=redis_timeout
        )
        self.limits = session_limits(idle_timeout, touch_interval)
        self.cache, self._listener = _start_cache(cache, redis_url, prefix, self.limits)
        # NOTE: an estimate. redis-py makes one retry after a short backoff, so
        # a dead Redis can hold a call for about two timeouts.
        self._longest_store_call = 2.25 * redis_timeout
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="authgrpc-session-check"
        )

    def validate(self, token: str, timeout: float | None = None) -> Validation:
        """Return the validation of ``token``, giving up after ``timeout`` seconds."""
        claims = self.verifier.verify(token)
        session = self._live_session(claims, timeout)
        return Validation(_principal(session), session, claims)

    def _live_session(self, claims: Claims, timeout: float | None) -> SessionRecord:
        if timeout is not None and timeout <= 0:
            raise _deadline_passed()
        if timeout is None or timeout >= self._longest_store_call:
            session = self._check(claims)
        else:
            # The Redis client's socket timeout is fixed per connection, so a
            # shorter deadline is kept by waiting on the check from outside.
            future = self._executor.submit(self._check, claims)
            try:
                session = future.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                raise _store_timed_out(timeout) from None
        if session is None:
            raise _session_ended()
        return session

    def _check(self, claims: Claims) -> SessionRecord | None:
        cache = self.cache
        if cache is not None:
            cached = cache.lookup(claims.user_id, claims.session_id)
            if cached is not None:
                return cached
            epoch = cache.epoch()
        session = self.checker.validate_session(
            claims.user_id, claims.session_id, self.limits
        )
        if cache is not None and session is not None:
            cache.store(session, epoch)
        return session

    def close(self) -> None:
        """Stop the worker threads and cache listener, and close the Redis client."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.checker.close()
        if self._listener is not None:
            self._listener.stop()

    def __enter__(self) -> LocalValidator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncLocalValidator:
    """Validates tokens with the auth service's keys and direct access to its store."""

    def __init__(
        self,
        verifier: TokenVerifier,
        store: SessionStore,
        limits: SessionLimits,
        cache: ValidationCache | None = None,
    ):
        self.verifier = verifier
        self.store = store
        self.limits = limits
        self.cache = cache
        self._owns_store = False
        self._listener: InvalidationListener | None = None

    @classmethod
    def from_url(
        cls,
        keys: KeySource | None,
        *,
        issuer: str,
        audience: str,
        redis_url: str,
        prefix: str = "authgrpc",
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        touch_interval: float = DEFAULT_TOUCH_INTERVAL,
        leeway: float = 30,
        redis_timeout: float = 1.0,
        jwks_fetcher: JwksFetcher | None = None,
        algorithm: str = DEFAULT_ALGORITHM,
        cache: bool = False,
    ) -> AsyncLocalValidator:
        """Build a validator on the Redis at ``redis_url``; :meth:`close` closes it.

        The arguments mean what they mean for :class:`LocalValidator`. No
        connection opens until the first validation, so a Redis that is down
        at start-up shows up as UNAVAILABLE calls, not as an exception here.
        A key refresh through ``jwks_fetcher`` is a blocking call that holds
        the event loop for up to the fetcher's timeout.
        """
        verifier = _verifier(
            keys,
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            algorithm=algorithm,
            jwks_fetcher=jwks_fetcher,
        )
        limits = session_limits(idle_timeout, touch_interval)
        store = RedisStore.from_url(redis_url, prefix=prefix, timeout=redis_timeout)
        validation_cache, listener = _start_cache(cache, redis_url, prefix, limits)
        validator = cls(verifier, store, limits, validation_cache)
        validator._owns_store = True
        validator._listener = listener
        return validator

    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        """Return the validation of ``token``, giving up after ``timeout`` seconds.

        The store's own timeout bounds each call as well.
        """
        claims = self.verifier.verify(token)
        if timeout is not None and timeout <= 0:
            raise _deadline_passed()
        cache = self.cache
        session = None
        if cache is not None:
            session = cache.lookup(claims.user_id, claims.session_id)
        if session is None:
            session = await self._live_session(claims, timeout)
        return Validation(_principal(session), session, claims)

    async def _live_session(
        self, claims: Claims, timeout: float | None
    ) -> SessionRecord:
        cache = self.cache
        if cache is not None:
            epoch = cache.epoch()
        check = self.store.validate_session(
            claims.user_id, claims.session_id, self.limits
        )
        try:
            async with asyncio.timeout(timeout):
                session = await check
        except TimeoutError:
            raise _store_timed_out(timeout) from None
        if session is None:
            raise _session_ended()
        if cache is not None:
            cache.store(session, epoch)
        return session

    async def close(self) -> None:
        """Close the store if :meth:`from_url` opened it, but not a store passed in."""
        if self._listener is not None:
            await asyncio.to_thread(self._listener.stop)
        if self._owns_store:
            await self.store.close()


def _start_cache(
    enabled: bool, redis_url: str, prefix: str, limits: SessionLimits
) -> tuple[ValidationCache | None, InvalidationListener | None]:
    """Return a cache fed by the Redis session-end channel, or (None, None)."""
    if not enabled:
        return None, None
    # Rechecking reads Redis but writes only once per touch interval, so the
    # bound on staleness is kept apart from how often the idle timeout slides.
    recheck = min(max(limits.touch_interval_ms / 1000, 0.05), MAX_STALENESS)
    cache = ValidationCache(recheck_after=recheck)
    factory = subscriber_factory(redis_url)
    listener = InvalidationListener(factory, KeyLayout(prefix).channel, cache).start()
    return cache, listener


def _channel(target: str, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    if credentials is None:
        return grpc.insecure_channel(target)
    return grpc.secure_channel(target, credentials)


def _aio_channel(
    target: str, credentials: grpc.ChannelCredentials | None
) -> grpc.aio.Channel:
    if credentials is None:
        return grpc.aio.insecure_channel(target)
    return grpc.aio.secure_channel(target, credentials)


def call_timeout(own: float, remaining: float | None) -> float:
    """Return the deadline for a call to the auth service: the shorter of both."""
    timeout = own if remaining is None else min(own, remaining)
    if timeout <= 0:
        raise _deadline_passed()
    return timeout


def remote_error(error: grpc.RpcError) -> AuthError:
    """Map a failed ValidateSession call to the error that the validator raises.

    UNAUTHENTICATED keeps its ErrorInfo reason and INVALID_ARGUMENT becomes
    TOKEN_MALFORMED. Every other code, DEADLINE_EXCEEDED and UNAVAILABLE
    included, becomes StoreUnavailable, so the caller sees UNAVAILABLE.
    """
    code = error.code()
    details = error.details() or ""
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.INVALID_ARGUMENT):
        info = error_info(error)
        reason = (
            info.reason if info is not None and info.domain == ERROR_DOMAIN else None
        )
        return from_status(code, details, reason)
    # The details name internal addresses, which the caller must not see.
    log.warning("auth service call failed: %s: %s", code.name, details)
    return StoreUnavailable(f"auth service call failed: {code.name}")


def validation_from(token: str, response: Any) -> Validation:
    """Build the Validation from a ValidateSessionResponse for ``token``.

    The claims are read from the token without checking its signature, which
    the auth service has just checked.
    """
    principal, session = response.principal, response.session
    if not principal.user_id or not session.session_id:
        raise StoreUnavailable("auth service returned a validation without a principal")
    record = SessionRecord(
        session_id=session.session_id,
        user_id=principal.user_id,
        username=principal.username,
        roles=tuple(principal.roles),
        created_ms=session.create_time.ToMilliseconds(),
        absolute_expiry_ms=session.absolute_expire_time.ToMilliseconds(),
        idle_expiry_ms=session.idle_expire_time.ToMilliseconds(),
        last_seen_ms=session.last_seen_time.ToMilliseconds(),
        peer=session.peer,
        user_agent=session.user_agent,
    )
    return Validation(_principal(record), record, _unverified_claims(token))


def _unverified_claims(token: str) -> Claims:
    try:
        kid = jwt.get_unverified_header(token).get("kid", "")
        payload = jwt.decode(token, options={"verify_signature": False})
        return Claims(
            user_id=str(payload["sub"]),
            session_id=str(payload["sid"]),
            issued_at=int(payload["iat"]),
            expires_at=int(payload["exp"]),
            token_id=str(payload["jti"]),
            key_id=str(kid),
        )
    except (jwt.PyJWTError, KeyError, TypeError, ValueError):
        raise Unauthenticated(
            Reason.TOKEN_MALFORMED, "access token claims are missing or invalid"
        ) from None


class RemoteValidator:
    """Validates tokens by calling ``AuthService/ValidateSession`` at ``target``.

    ``credentials`` are channel credentials for TLS; without them the channel
    is plaintext. Each call's deadline is the shorter of ``timeout`` and the
    caller's remaining time, both in seconds.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 1.0,
    ):
        self.target = target
        self.timeout = timeout
        self._channel = _channel(target, credentials)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)

    def validate(self, token: str, timeout: float | None = None) -> Validation:
        """Return the validation of ``token`` as the auth service reports it."""
        request = auth_pb2.ValidateSessionRequest(access_token=token)
        try:
            response = self._stub.ValidateSession(
                request, timeout=call_timeout(self.timeout, timeout)
            )
        except grpc.RpcError as error:
            raise remote_error(error) from None
        return validation_from(token, response)

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def __enter__(self) -> RemoteValidator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncRemoteValidator:
    """The asyncio counterpart of :class:`RemoteValidator`.

    The channel opens on the first validation, so that it belongs to the
    event loop that uses it.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = 1.0,
    ):
        self.target = target
        self.timeout = timeout
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None

    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        """Return the validation of ``token`` as the auth service reports it."""
        if self._stub is None:
            self._channel = _aio_channel(self.target, self._credentials)
            self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        request = auth_pb2.ValidateSessionRequest(access_token=token)
        try:
            response = await self._stub.ValidateSession(
                request, timeout=call_timeout(self.timeout, timeout)
            )
        except grpc.RpcError as error:
            raise remote_error(error) from None
        return validation_from(token, response)

    async def close(self) -> None:
        """Close the channel, if one was opened."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None
