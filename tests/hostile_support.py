"""Shared parts of the hostile-input tests: a real server, forged tokens, checks."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import time
from typing import Any

import argon2
import grpc
import jwt
import pytest

from authgrpc.config import Settings
from authgrpc.errors import error_info
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.redis_store import RedisStore
from authgrpc.server import AuthServer, start_server
from authgrpc.store import SessionStore, ThrottlePolicy
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

PASSWORD = "correct horse battery"
FAST_HASHER = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
# Many cases log in with a wrong password, and none of them tests throttling.
NO_THROTTLE = ThrottlePolicy(max_failures=10_000)
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def json_segment(value: Any) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "dev": True,
        "grace_period": 1,
        "throttle": NO_THROTTLE,
    }
    values.update(overrides)
    return Settings(**values)


@dataclasses.dataclass
class Harness:
    """A running server with one logged-in user, ``alice``."""

    server: AuthServer
    channel: grpc.aio.Channel
    stub: Any
    keys: KeySet
    store: SessionStore
    user_id: str
    session_id: str
    token: str
    refresh_token: str

    async def login(self, username: str = "alice", password: str = PASSWORD) -> Any:
        request = auth_pb2.LoginRequest(username=username, password=password)
        return await self.stub.Login(request)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        """Return the claims of a valid token for alice's session, with changes."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.server.settings.issuer,
            "aud": self.server.settings.audience,
            "sub": self.user_id,
            "sid": self.session_id,
            "iat": now,
            "exp": now + 300,
            "jti": "forged-token-id",
        }
        claims.update(overrides)
        return claims

    def header(self, **overrides: Any) -> dict[str, Any]:
        """Return the header of a valid token, with changes."""
        assert self.keys.signing_key is not None
        header: dict[str, Any] = {
            "alg": self.keys.algorithm,
            "typ": "at+jwt",
            "kid": self.keys.signing_key.kid,
        }
        header.update(overrides)
        return header

    def sign(self, header: str, payload: str) -> str:
        """Sign the two encoded segments with the server's own private key."""
        assert self.keys.signing_key is not None
        key = self.keys.signing_key.private_key
        signing_input = f"{header}.{payload}".encode()
        if isinstance(key, bytes):
            signature = hmac.new(key, signing_input, hashlib.sha256).digest()
        else:
            signer = jwt.get_algorithm_by_name(self.keys.algorithm)
            signature = signer.sign(signing_input, key)
        return f"{header}.{payload}.{b64url(signature)}"

    def forge(self, header: dict[str, Any] | None = None, claims: Any = None) -> str:
        """Return a token with our signature over the given header and claims."""
        return self.sign(
            json_segment(self.header() if header is None else header),
            json_segment(self.claims() if claims is None else claims),
        )


async def start_harness(
    server_settings: Settings, store: SessionStore, keys: KeySet
) -> Harness:
    hasher = PasswordHasher(FAST_HASHER)
    server = await start_server(server_settings, store=store, keys=keys, hasher=hasher)
    await store.create_user("alice", hasher.hash_sync(PASSWORD), ("reader",))
    await store.create_user("bob", hasher.hash_sync(PASSWORD), ("reader",))
    channel = grpc.aio.insecure_channel(server.address)
    stub = auth_pb2_grpc.AuthServiceStub(channel)
    login = await stub.Login(auth_pb2.LoginRequest(username="alice", password=PASSWORD))
    return Harness(
        server,
        channel,
        stub,
        keys,
        store,
        login.session.user_id,
        login.session.session_id,
        login.access_token,
        login.refresh_token,
    )


async def stop_harness(harness: Harness, redis_prefix: str | None = None) -> None:
    store = harness.store
    if isinstance(store, RedisStore) and redis_prefix is not None:
        async for key in store.client.scan_iter(match=f"{redis_prefix}:*"):
            await store.client.delete(key)
    await harness.channel.close()
    await harness.server.stop(0)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


def assert_status(
    error: grpc.aio.AioRpcError, code: grpc.StatusCode, reason: str | None
) -> None:
    """Assert the status code, the ErrorInfo reason, and a clean message."""
    assert error.code() == code, error.details()
    info = error_info(error)
    if reason is None:
        assert info is None
        return
    assert info is not None, error.details()
    assert info.domain == "authgrpc"
    assert info.reason == reason, error.details()
    assert "Traceback" not in (error.details() or "")


async def assert_rejected(call: Any, code: grpc.StatusCode, reason: str | None) -> None:
    assert_status(await rpc_error(call), code, reason)


async def live_session_ids(harness: Harness) -> list[str]:
    """Return the ids of alice's live sessions, asked with her valid token."""
    response = await harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(harness.token)
    )
    return [session.session_id for session in response.sessions]
