"""Local and remote validators against a real Redis and a real auth server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from authgrpc.errors import Reason, StoreUnavailable, Unauthenticated
from authgrpc.keys import KeySet, key_file_bytes
from authgrpc.tokens import TokenIssuer
from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from authgrpc.validators import (
    AsyncLocalValidator,
    AsyncRemoteValidator,
    GrpcJwksFetcher,
    LocalValidator,
    RemoteValidator,
    Validation,
)
from tests.conftest import RedisProcess, free_port, make_keys
from tests.helpers_interceptor import (
    AUDIENCE,
    ISSUER,
    Session,
    Sessions,
    auth_target,
    sessions,
)

__all__ = ["auth_target", "sessions"]


def local_validator(
    keys: Any, redis_url: str, prefix: str, **extra: Any
) -> LocalValidator:
    return LocalValidator(
        keys,
        issuer=ISSUER,
        audience=AUDIENCE,
        redis_url=redis_url,
        prefix=prefix,
        idle_timeout=60,
        **extra,
    )


def assert_validation(validation: Validation, session: Session, username: str) -> None:
    assert validation.principal.user_id == session.record.user_id
    assert validation.principal.username == username
    assert validation.principal.session_id == session.record.session_id
    assert validation.session.session_id == session.record.session_id
    assert validation.claims.session_id == session.record.session_id
    assert validation.claims.user_id == session.record.user_id


def test_local_validator_live_session(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    session = sessions.create("alice", roles=("reader", "admin"))

    with local_validator(keys, redis_url, prefix) as validator:
        validation = validator.validate(session.token, timeout=2)

    assert_validation(validation, session, "alice")
    assert validation.principal.roles == ("reader", "admin")


def test_local_validator_ended_session(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    session = sessions.create("alice")
    sessions.end(session)

    with (
        local_validator(keys, redis_url, prefix) as validator,
        pytest.raises(Unauthenticated) as caught,
    ):
        validator.validate(session.token)

    assert caught.value.reason == Reason.SESSION_ENDED


def test_local_validator_passed_deadline(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    session = sessions.create("alice")

    with (
        local_validator(keys, redis_url, prefix) as validator,
        pytest.raises(StoreUnavailable),
    ):
        validator.validate(session.token, timeout=0)


def test_local_validator_key_paths(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str, tmp_path: Path
) -> None:
    assert keys.signing_key is not None
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(json.dumps(keys.jwks()))
    pem_path = tmp_path / "signing.pem"
    pem_path.write_bytes(key_file_bytes(keys.signing_key.private_key))
    session = sessions.create("alice")

    for path in (jwks_path, str(pem_path)):
        with local_validator(path, redis_url, prefix) as validator:
            validation = validator.validate(session.token)
        assert validation.principal.username == "alice", path


def test_local_validator_refetches_unknown_kid(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    fetched: list[int] = []

    def fetch() -> KeySet:
        fetched.append(1)
        return KeySet(keys.algorithm, keys.verification_keys)

    session = sessions.create("alice")
    stale = KeySet(keys.algorithm, make_keys().verification_keys)
    foreign_keys = make_keys()
    foreign = TokenIssuer(
        foreign_keys, issuer=ISSUER, audience=AUDIENCE, lifetime_seconds=60
    )
    foreign_token = foreign.issue(
        session.record.user_id, session.record.session_id
    ).token

    with local_validator(stale, redis_url, prefix, jwks_fetcher=fetch) as validator:
        validation = validator.validate(session.token)
        with pytest.raises(Unauthenticated) as caught:
            validator.validate(foreign_token)

    assert validation.principal.username == "alice"
    assert caught.value.reason == Reason.TOKEN_BAD_SIGNATURE
    assert len(fetched) == 1


def test_local_validator_frozen_redis_deadline(
    keys: KeySet, redis_process: RedisProcess, prefix: str
) -> None:
    session = Sessions(redis_process.url, prefix, keys).create("alice")
    validator = local_validator(keys, redis_process.url, prefix, redis_timeout=5.0)
    redis_process.freeze()
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            validator.validate(session.token, timeout=0.3)
    finally:
        elapsed = time.monotonic() - started
        redis_process.thaw()
        validator.close()

    assert elapsed < 1.0


def test_jwks_fetcher_from_auth_server(
    auth_target: str, sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    fetcher = GrpcJwksFetcher(auth_target)
    session = sessions.create("alice")
    try:
        fetched = fetcher()
        with local_validator(
            None, redis_url, prefix, jwks_fetcher=fetcher
        ) as validator:
            validation = validator.validate(session.token)
    finally:
        fetcher.close()

    assert set(fetched.verification_keys) == set(keys.verification_keys)
    assert validation.principal.username == "alice"


def test_jwks_fetcher_unreachable() -> None:
    fetcher = GrpcJwksFetcher(f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            fetcher()
    finally:
        fetcher.close()


async def test_async_local_validator_from_url(
    sessions: Sessions, keys: KeySet, redis_url: str, prefix: str
) -> None:
    live = await sessions.create_async("alice")
    ended = await sessions.create_async("alice")
    await sessions.end_async(ended)
    validator = AsyncLocalValidator.from_url(
        keys, issuer=ISSUER, audience=AUDIENCE, redis_url=redis_url, prefix=prefix
    )
    try:
        validation = await validator.validate(live.token, timeout=2)
        with pytest.raises(Unauthenticated) as caught:
            await validator.validate(ended.token, timeout=2)
    finally:
        await validator.close()

    assert_validation(validation, live, "alice")
    assert caught.value.reason == Reason.SESSION_ENDED


async def test_async_local_validator_frozen_redis(
    keys: KeySet, redis_process: RedisProcess, prefix: str
) -> None:
    session = await Sessions(redis_process.url, prefix, keys).create_async("alice")
    validator = AsyncLocalValidator.from_url(
        keys,
        issuer=ISSUER,
        audience=AUDIENCE,
        redis_url=redis_process.url,
        prefix=prefix,
        redis_timeout=5.0,
    )
    redis_process.freeze()
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable):
            await validator.validate(session.token, timeout=0.3)
    finally:
        elapsed = time.monotonic() - started
        redis_process.thaw()
        await validator.close()

    assert elapsed < 1.0


def test_remote_validator_live_and_ended(auth_target: str, sessions: Sessions) -> None:
    session = sessions.create("alice")

    with RemoteValidator(auth_target) as validator:
        validation = validator.validate(session.token, timeout=2)
        sessions.end(session)
        with pytest.raises(Unauthenticated) as caught:
            validator.validate(session.token, timeout=2)

    assert_validation(validation, session, "alice")
    assert caught.value.reason == Reason.SESSION_ENDED


def test_remote_validator_keeps_reason(auth_target: str, sessions: Sessions) -> None:
    session = sessions.create("alice")
    foreign = TokenIssuer(
        make_keys(), issuer=ISSUER, audience=AUDIENCE, lifetime_seconds=60
    )
    token = foreign.issue(session.record.user_id, session.record.session_id).token

    with RemoteValidator(auth_target) as validator:
        with pytest.raises(Unauthenticated) as bad_signature:
            validator.validate(token)
        with pytest.raises(Unauthenticated) as malformed:
            validator.validate("not-a-jwt")

    assert bad_signature.value.reason == Reason.TOKEN_BAD_SIGNATURE
    assert malformed.value.reason == Reason.TOKEN_MALFORMED


def test_remote_validator_unreachable() -> None:
    with (
        RemoteValidator(f"127.0.0.1:{free_port()}", timeout=0.5) as validator,
        pytest.raises(StoreUnavailable),
    ):
        validator.validate("any-token")


class _SlowAuthService(auth_pb2_grpc.AuthServiceServicer):  # type: ignore[misc]
    def __init__(self) -> None:
        self.release = threading.Event()

    def ValidateSession(self, request: Any, context: Any) -> Any:
        self.release.wait(5)
        return auth_pb2.ValidateSessionResponse()


@pytest.fixture
def slow_auth_target() -> Iterator[str]:
    """An auth service whose ValidateSession takes 5 seconds to return."""
    servicer = _SlowAuthService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    auth_pb2_grpc.add_AuthServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    servicer.release.set()
    server.stop(0).wait()


@pytest.mark.parametrize(("own", "caller"), [(0.3, None), (5.0, 0.3)])
def test_remote_validator_deadline(
    slow_auth_target: str, own: float, caller: float | None
) -> None:
    started = time.monotonic()
    with (
        RemoteValidator(slow_auth_target, timeout=own) as validator,
        pytest.raises(StoreUnavailable) as caught,
    ):
        validator.validate("any-token", timeout=caller)
    elapsed = time.monotonic() - started

    assert elapsed < 1.5
    assert "DEADLINE_EXCEEDED" in caught.value.message


async def test_async_remote_validator(auth_target: str, sessions: Sessions) -> None:
    session = await sessions.create_async("alice")
    validator = AsyncRemoteValidator(auth_target)
    try:
        validation = await validator.validate(session.token, timeout=2)
        await sessions.end_async(session)
        with pytest.raises(Unauthenticated) as caught:
            await validator.validate(session.token, timeout=2)
    finally:
        await validator.close()

    assert_validation(validation, session, "alice")
    assert caught.value.reason == Reason.SESSION_ENDED


async def test_async_remote_validator_unreachable() -> None:
    validator = AsyncRemoteValidator(f"127.0.0.1:{free_port()}", timeout=0.5)
    try:
        with pytest.raises(StoreUnavailable):
            await validator.validate("any-token")
        with pytest.raises(StoreUnavailable):
            await validator.validate("any-token", timeout=0)
    finally:
        await validator.close()
