"""AuthService end to end: a real server and channel on loopback, both stores."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import argon2
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from authgrpc.config import Settings
from authgrpc.errors import error_info
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import RedisStore
from authgrpc.server import AuthServer, start_server
from authgrpc.store import MemoryStore, SessionStore, ThrottlePolicy
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

PASSWORD = "correct horse battery"
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)


async def cleanup(store: SessionStore, prefix: str) -> None:
    if isinstance(store, RedisStore):
        async for key in store.client.scan_iter(match=f"{prefix}:*"):
            await store.client.delete(key)
    await store.close()


@dataclasses.dataclass
class Harness:
    server: AuthServer
    stub: Any
    channel: grpc.aio.Channel

    async def login(
        self, username: str = "alice", password: str = PASSWORD, **kwargs: Any
    ) -> Any:
        return await self.stub.Login(
            auth_pb2.LoginRequest(username=username, password=password), **kwargs
        )


async def start(settings: Settings, store: SessionStore, keys: KeySet) -> Harness:
    hasher = PasswordHasher(FAST_HASHER)
    server = await start_server(settings, store=store, keys=keys, hasher=hasher)
    await store.create_user("alice", hasher.hash_sync(PASSWORD), ("reader",))
    channel = grpc.aio.insecure_channel(server.address)
    return Harness(server, auth_pb2_grpc.AuthServiceStub(channel), channel)


def base_settings(**overrides: Any) -> Settings:
    return Settings(listen="127.0.0.1:0", dev=True, grace_period=1, **overrides)


@pytest.fixture(params=["memory", "redis", "memory-cached", "redis-cached"])
async def harness(
    request: pytest.FixtureRequest, redis_url: str, prefix: str, keys: KeySet
) -> AsyncIterator[Harness]:
    kind = str(request.param)
    cached = kind.endswith("-cached")
    if kind.startswith("memory"):
        store: SessionStore = MemoryStore()
        settings = base_settings(validation_cache=cached)
    else:
        store = RedisStore.from_url(redis_url, prefix=prefix)
        settings = base_settings(
            validation_cache=cached, redis_url=redis_url, redis_prefix=prefix
        )
    running = await start(settings, store, keys)
    if cached:
        cache = running.server.authenticator.cache
        assert cache is not None
        for _ in range(500):
            if cache.enabled:
                break
            await asyncio.sleep(0.01)
        assert cache.enabled
    yield running
    await running.channel.close()
    await running.server.stop(0)
    if isinstance(store, RedisStore):
        cleanup_store = RedisStore.from_url(redis_url, prefix=prefix)
        await cleanup(cleanup_store, prefix)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_login_validate_logout_sequence(harness: Harness) -> None:
    login = await harness.login()

    validated = await harness.stub.ValidateSession(
        auth_pb2.ValidateSessionRequest(access_token=login.access_token)
    )
    await harness.stub.Logout(
        auth_pb2.LogoutRequest(), metadata=bearer(login.access_token)
    )
    error = await rpc_error(
        harness.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=login.access_token)
        )
    )

    assert login.token_type == "Bearer"
    assert login.session.username == "alice"
    assert validated.principal.username == "alice"
    assert list(validated.principal.roles) == ["reader"]
    assert validated.session.session_id == login.session.session_id
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "SESSION_ENDED"


async def test_logout_twice_is_ok(harness: Harness) -> None:
    login = await harness.login()

    await harness.stub.Logout(auth_pb2.LogoutRequest(access_token=login.access_token))
    second = await harness.stub.Logout(
        auth_pb2.LogoutRequest(access_token=login.access_token)
    )

    assert second == auth_pb2.LogoutResponse()


async def test_logout_bad_signature_rejected(harness: Harness) -> None:
    login = await harness.login()
    head, payload, signature = login.access_token.split(".")
    flipped = "A" if signature[10] != "A" else "B"
    forged = f"{head}.{payload}.{signature[:10]}{flipped}{signature[11:]}"

    error = await rpc_error(
        harness.stub.Logout(auth_pb2.LogoutRequest(access_token=forged))
    )

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "TOKEN_BAD_SIGNATURE"


async def test_logout_tokens_must_agree(harness: Harness) -> None:
    first, second = await harness.login(), await harness.login()

    error = await rpc_error(
        harness.stub.Logout(
            auth_pb2.LogoutRequest(access_token=first.access_token),
            metadata=bearer(second.access_token),
        )
    )

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).metadata["field"] == "access_token"


async def test_unknown_user_and_wrong_password_alike(harness: Harness) -> None:
    unknown = await rpc_error(harness.login("mallory", PASSWORD))
    wrong = await rpc_error(harness.login("alice", "not the password"))

    assert unknown.code() == wrong.code() == grpc.StatusCode.UNAUTHENTICATED
    assert unknown.details() == wrong.details()
    assert (
        error_info(unknown).reason == error_info(wrong).reason == "INVALID_CREDENTIALS"
    )


@pytest.mark.parametrize(
    ("username", "password", "field"),
    [
        ("", PASSWORD, "username"),
        ("   ", PASSWORD, "username"),
        ("a" * 257, PASSWORD, "username"),
        ("alice", "", "password"),
        ("alice", "p" * 1025, "password"),
        ("ali\x00ce", PASSWORD, "username"),
    ],
    ids=[
        "empty-user",
        "blank-user",
        "long-user",
        "empty-password",
        "long-password",
        "nul-in-user",
    ],
)
async def test_login_bad_input(
    harness: Harness, username: str, password: str, field: str
) -> None:
    error = await rpc_error(harness.login(username, password))

    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(error).reason == "INVALID_ARGUMENT"
    assert error_info(error).metadata["field"] == field


async def test_username_is_normalized(harness: Harness) -> None:
    login = await harness.login("  \uff21\uff2c\uff29\uff23\uff25 ")  # fullwidth ALICE

    assert login.session.username == "alice"


async def test_disabled_user_cannot_log_in(harness: Harness) -> None:
    login = await harness.login()
    user = await harness.server.store.get_user_by_name("alice")
    assert user is not None

    await harness.server.store.set_disabled(user.user_id, True)
    refused = await rpc_error(harness.login())
    ended = await rpc_error(
        harness.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=login.access_token)
        )
    )

    assert error_info(refused).reason == "INVALID_CREDENTIALS"
    assert error_info(ended).reason == "SESSION_ENDED"


async def test_refresh_rotates_tokens(harness: Harness) -> None:
    login = await harness.login()

    refreshed = await harness.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=login.refresh_token)
    )
    validated = await harness.stub.ValidateSession(
        auth_pb2.ValidateSessionRequest(access_token=refreshed.access_token)
    )

    assert refreshed.refresh_token != login.refresh_token
    assert refreshed.session.session_id == login.session.session_id
    assert validated.principal.username == "alice"


async def test_refresh_retry_in_grace_returns_same(harness: Harness) -> None:
    login = await harness.login()
    request = auth_pb2.RefreshRequest(refresh_token=login.refresh_token)

    first, second = await asyncio.gather(
        harness.stub.Refresh(request), harness.stub.Refresh(request)
    )

    assert first.refresh_token == second.refresh_token


async def test_refresh_reuse_ends_session(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    running = await start(base_settings(refresh_grace=0), store, keys)
    try:
        login = await running.login()
        rotated = await running.stub.Refresh(
            auth_pb2.RefreshRequest(refresh_token=login.refresh_token)
        )

        reuse = await rpc_error(
            running.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=login.refresh_token)
            )
        )
        after = await rpc_error(
            running.stub.Refresh(
                auth_pb2.RefreshRequest(refresh_token=rotated.refresh_token)
            )
        )
        access = await rpc_error(
            running.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=rotated.access_token)
            )
        )

        assert error_info(reuse).reason == "REFRESH_TOKEN_REUSED"
        assert error_info(after).reason == "SESSION_ENDED"
        assert error_info(access).reason == "SESSION_ENDED"
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_list_and_revoke_sessions(harness: Harness) -> None:
    current, other = await harness.login(), await harness.login()

    listed = await harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(current.access_token)
    )
    revoked = await harness.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=other.session.session_id),
        metadata=bearer(current.access_token),
    )
    refused = await rpc_error(
        harness.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=other.access_token)
        )
    )

    marked = {s.session_id: s.current for s in listed.sessions}
    assert marked == {current.session.session_id: True, other.session.session_id: False}
    assert revoked.revoked is True
    assert error_info(refused).reason == "SESSION_ENDED"


async def test_list_sessions_needs_token(harness: Harness) -> None:
    error = await rpc_error(harness.stub.ListSessions(auth_pb2.ListSessionsRequest()))

    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error_info(error).reason == "TOKEN_MISSING"


async def test_logout_all_keeps_current(harness: Harness) -> None:
    current = await harness.login()
    others = [await harness.login() for _ in range(3)]

    response = await harness.stub.LogoutAll(
        auth_pb2.LogoutAllRequest(keep_current=True),
        metadata=bearer(current.access_token),
    )

    assert response.revoked_count == 3
    await harness.stub.ValidateSession(
        auth_pb2.ValidateSessionRequest(access_token=current.access_token)
    )
    for other in others:
        error = await rpc_error(
            harness.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=other.access_token)
            )
        )
        assert error_info(error).reason == "SESSION_ENDED"


async def test_logout_all_beats_concurrent_logins(harness: Harness) -> None:
    current = await harness.login()

    results = await asyncio.gather(
        *(harness.login() for _ in range(8)),
        harness.stub.LogoutAll(
            auth_pb2.LogoutAllRequest(), metadata=bearer(current.access_token)
        ),
        return_exceptions=True,
    )

    # A login that finished before LogoutAll returned must not have a live session.
    for result in results[:-1]:
        if isinstance(result, BaseException):
            continue
        try:
            await harness.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=result.access_token)
            )
        except grpc.aio.AioRpcError as error:
            assert error_info(error).reason == "SESSION_ENDED"
        else:
            created = result.session.create_time.ToMilliseconds()
            assert created >= 0  # created after LogoutAll ran: allowed to live
    assert not isinstance(results[-1], BaseException)


async def test_login_throttled_with_retry_info(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    policy = ThrottlePolicy(
        max_failures=3, window_ms=60_000, lockout_ms=30_000, max_lockout_ms=60_000
    )
    running = await start(base_settings(throttle=policy), store, keys)
    try:
        for _ in range(3):
            await rpc_error(running.login("alice", "wrong password"))

        locked = await rpc_error(running.login("alice", PASSWORD))

        assert locked.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(locked).reason == "LOGIN_THROTTLED"
        status = rpc_status.from_call(locked)
        assert status is not None
        retry = error_details_pb2.RetryInfo()
        assert any(
            detail.Unpack(retry)
            for detail in status.details
            if detail.Is(retry.DESCRIPTOR)
        )
        assert 0 < retry.retry_delay.seconds <= 30
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_lockout_hides_user_existence(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    policy = ThrottlePolicy(
        max_failures=2, window_ms=60_000, lockout_ms=30_000, max_lockout_ms=60_000
    )
    running = await start(
        base_settings(throttle=policy, trusted_proxies=()), store, keys
    )
    try:
        messages = []
        for name in ("alice", "nobody"):
            for _ in range(2):
                await rpc_error(running.login(name, "wrong password"))
            await running.server.store.throttle_reset("ip:127.0.0.1")
            locked = await rpc_error(running.login(name, "wrong password"))
            messages.append(
                (locked.code(), locked.details(), error_info(locked).reason)
            )

        assert messages[0] == messages[1]
        assert messages[0][0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_password_rehashed_on_login(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    running = await start(base_settings(), store, keys)
    try:
        weak = argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1)
        user = await store.create_user("bob", weak.hash(PASSWORD), ())

        await running.login("bob")

        stored = await store.get_user(user.user_id)
        assert stored is not None
        assert (
            argon2.extract_parameters(stored.password_hash).memory_cost
            == FAST_HASHER.memory_cost
        )
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_idle_and_absolute_expiry(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    running = await start(
        base_settings(idle_timeout=0.6, absolute_timeout=1.2, touch_interval=0),
        store,
        keys,
    )
    try:
        idle = await running.login()
        busy = await running.login()
        for _ in range(3):
            await asyncio.sleep(0.35)
            await running.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=busy.access_token)
            )
        idle_error = await rpc_error(
            running.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=idle.access_token)
            )
        )
        await asyncio.sleep(0.3)
        absolute_error = await rpc_error(
            running.stub.ValidateSession(
                auth_pb2.ValidateSessionRequest(access_token=busy.access_token)
            )
        )

        assert error_info(idle_error).reason == "SESSION_ENDED"
        assert error_info(absolute_error).reason == "SESSION_ENDED"
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_redis_stopped_mid_run(redis_process: Any, keys: KeySet) -> None:
    store = RedisStore.from_url(redis_process.url, timeout=0.3)
    running = await start(base_settings(redis_timeout=0.3), store, keys)
    health = health_pb2_grpc.HealthStub(running.channel)
    try:
        login = await running.login()
        request = auth_pb2.ValidateSessionRequest(access_token=login.access_token)

        redis_process.stop()
        down = await rpc_error(running.stub.ValidateSession(request, timeout=2))
        login_down = await rpc_error(running.login(timeout=2))
        await asyncio.sleep(1.5)
        unhealthy = await health.Check(health_pb2.HealthCheckRequest(service=""))

        assert down.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(down).reason == "STORE_UNAVAILABLE"
        assert login_down.code() == grpc.StatusCode.UNAVAILABLE
        assert unhealthy.status == health_pb2.HealthCheckResponse.NOT_SERVING

        redis_process.start()  # the data is gone: it kept nothing on disk
        await asyncio.sleep(1.5)
        healthy = await health.Check(health_pb2.HealthCheckRequest(service=""))
        gone = await rpc_error(running.stub.ValidateSession(request, timeout=2))

        assert healthy.status == health_pb2.HealthCheckResponse.SERVING
        assert error_info(gone).reason == "SESSION_ENDED"
    finally:
        await running.channel.close()
        await running.server.stop(0)


async def test_frozen_redis_answers_within_deadline(
    redis_process: Any, keys: KeySet
) -> None:
    store = RedisStore.from_url(redis_process.url, timeout=5)
    running = await start(base_settings(redis_timeout=5), store, keys)
    try:
        login = await running.login()
        request = auth_pb2.ValidateSessionRequest(access_token=login.access_token)

        redis_process.freeze()
        started = asyncio.get_running_loop().time()
        error = await rpc_error(running.stub.ValidateSession(request, timeout=0.5))
        elapsed = asyncio.get_running_loop().time() - started
        redis_process.thaw()

        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert elapsed < 0.5
        await running.stub.ValidateSession(request, timeout=5)
    finally:
        redis_process.thaw()
        await running.channel.close()
        await running.server.stop(0)


async def test_jwks_lists_public_key(harness: Harness, keys: KeySet) -> None:
    import json

    response = await harness.stub.GetJwks(auth_pb2.GetJwksRequest())

    document = json.loads(response.jwks_json)
    assert [key["kid"] for key in document["keys"]] == list(keys.verification_keys)
    assert all("d" not in key for key in document["keys"])


async def test_health_and_reflection_public(harness: Harness) -> None:
    health = health_pb2_grpc.HealthStub(harness.channel)

    response = await health.Check(
        health_pb2.HealthCheckRequest(service="authgrpc.v1.AuthService")
    )

    assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_metrics_served_when_enabled(
    redis_url: str, prefix: str, keys: KeySet
) -> None:
    import urllib.request

    from tests.conftest import free_port

    listen = f"127.0.0.1:{free_port()}"
    store = RedisStore.from_url(redis_url, prefix=prefix)
    running = await start(base_settings(metrics_listen=listen), store, keys)
    try:
        login = await running.login()
        await running.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=login.access_token)
        )
        await rpc_error(running.login("alice", "wrong password"))

        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://{listen}/metrics", timeout=5).read()
        )
        text = body.decode()

        assert 'authgrpc_calls_total{code="OK",method="Login"} 1.0' in text
        assert 'authgrpc_logins_total{outcome="INVALID_CREDENTIALS"} 1.0' in text
        assert 'authgrpc_validations_total{outcome="ok"} 1.0' in text
        assert "authgrpc_call_duration_seconds_bucket" in text
        assert "authgrpc_live_sessions" in text
    finally:
        await running.channel.close()
        await running.server.stop(0)
        await cleanup(RedisStore.from_url(redis_url, prefix=prefix), prefix)


async def test_second_server_cannot_share_port(keys: KeySet) -> None:
    from authgrpc.errors import ConfigurationError

    first = await start_server(base_settings(), store=MemoryStore(), keys=keys)
    try:
        with pytest.raises(ConfigurationError) as refused:
            settings = dataclasses.replace(base_settings(), listen=first.address)
            await start_server(settings, store=MemoryStore(), keys=keys)
        assert "in use" in refused.value.message
    finally:
        await first.server.stop(0)
