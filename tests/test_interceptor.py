"""AuthInterceptor and AsyncAuthInterceptor on real servers, with sessions in Redis."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import pytest

from authgrpc.errors import ConfigurationError, Reason
from authgrpc.example.v1 import greeter_pb2
from authgrpc.interceptor import (
    FAILED_CHECK_MESSAGE,
    AsyncAuthInterceptor,
    AuthInterceptor,
    MethodPolicy,
)
from authgrpc.keys import KeySet
from authgrpc.principal import NoPrincipalError, current_principal
from authgrpc.tokens import TokenIssuer
from authgrpc.validators import AsyncLocalValidator, LocalValidator, Validation
from tests.conftest import RedisProcess, make_keys
from tests.helpers_interceptor import (
    ANONYMOUS,
    AUDIENCE,
    GREETER,
    ISSUER,
    KINDS,
    AsyncErrorMappingInterceptor,
    ErrorMappingInterceptor,
    Running,
    Sessions,
    bearer,
    call,
    expect_error,
    reason_of,
    sessions,
    start_aio,
    start_sync,
)

__all__ = ["sessions"]

FLAVOURS = ["sync", "aio"]
Roles = Mapping[str, list[str]] | None


def _local_options(redis_url: str, prefix: str) -> dict[str, Any]:
    return {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "redis_url": redis_url,
        "prefix": prefix,
        "idle_timeout": 60,
        "redis_timeout": 0.5,
    }


def start_protected(
    flavour: str,
    keys: KeySet,
    redis_url: str,
    prefix: str,
    *,
    public_methods: tuple[str, ...] = (),
    required_roles: Roles = None,
    outer: bool | None = None,
    max_workers: int = 4,
) -> Running:
    """Start a greeter behind the auth interceptor of ``flavour``.

    ``outer`` adds an exception-to-INTERNAL interceptor outside (True) or
    inside (False) the auth interceptor.
    """
    options = _local_options(redis_url, prefix)
    if flavour == "sync":
        validator = LocalValidator(keys, **options)
        auth = AuthInterceptor(validator, public_methods, required_roles)
        interceptors: list[Any] = [auth]
        if outer is not None:
            mapper = ErrorMappingInterceptor()
            interceptors = [mapper, auth] if outer else [auth, mapper]
        return start_sync(interceptors, max_workers=max_workers)

    def make() -> list[Any]:
        validator = AsyncLocalValidator.from_url(keys, **options)
        auth = AsyncAuthInterceptor(validator, public_methods, required_roles)
        if outer is None:
            return [auth]
        mapper = AsyncErrorMappingInterceptor()
        return [mapper, auth] if outer else [auth, mapper]

    return start_aio(make)


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def protected(
    flavour: str, keys: KeySet, redis_url: str, prefix: str
) -> Iterator[Running]:
    running = start_protected(flavour, keys, redis_url, prefix)
    yield running
    running.stop()


def assert_rejected(
    error: grpc.RpcError, code: grpc.StatusCode, reason: Reason | str
) -> None:
    assert error.code() == code
    assert reason_of(error) == reason


@pytest.mark.parametrize("kind", KINDS)
def test_no_token_unauthenticated(protected: Running, kind: str) -> None:
    error = expect_error(protected.stub, kind)

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
    assert protected.calls.handled == []


@pytest.mark.parametrize("kind", KINDS)
def test_bad_token_unauthenticated(protected: Running, kind: str) -> None:
    error = expect_error(protected.stub, kind, bearer("not-a-jwt"))

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MALFORMED)
    assert protected.calls.handled == []


@pytest.mark.parametrize("kind", KINDS)
def test_valid_token_reaches_handler(
    protected: Running, sessions: Sessions, kind: str
) -> None:
    session = sessions.create("alice")

    greetings = call(protected.stub, kind, bearer(session.token))

    assert greetings
    assert set(greetings) == {"alice"}
    assert len(protected.calls.handled) == 1
    assert protected.calls.handled[0][1] == "alice"


@pytest.mark.parametrize("kind", KINDS)
def test_ended_session_rejected_next_call(
    protected: Running, sessions: Sessions, kind: str
) -> None:
    session = sessions.create("alice")
    assert call(protected.stub, kind, bearer(session.token))

    sessions.end(session)
    error = expect_error(protected.stub, kind, bearer(session.token))

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.SESSION_ENDED)
    assert len(protected.calls.handled) == 1


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ([("authorization", "Basic YWxpY2U6c2VjcmV0")], Reason.TOKEN_MISSING),
        ([("authorization", "Bearer ")], Reason.TOKEN_MISSING),
        ([("authorization", "")], Reason.TOKEN_MISSING),
        (
            [("authorization", "Bearer a"), ("authorization", "Bearer b")],
            Reason.TOKEN_MALFORMED,
        ),
        ([("authorization", "Bearer " + "a" * 9000)], Reason.TOKEN_MALFORMED),
    ],
    ids=["basic", "empty-bearer", "empty", "two-values", "oversized"],
)
def test_malformed_authorization_rejected(
    protected: Running, metadata: list[tuple[str, str]], reason: Reason
) -> None:
    error = expect_error(protected.stub, "unary_unary", metadata)

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, reason)
    assert protected.calls.handled == []


def test_foreign_key_bad_signature(protected: Running, sessions: Sessions) -> None:
    session = sessions.create("alice")
    foreign = TokenIssuer(
        make_keys(), issuer=ISSUER, audience=AUDIENCE, lifetime_seconds=60
    )
    token = foreign.issue(session.record.user_id, session.record.session_id).token

    error = expect_error(protected.stub, "unary_unary", bearer(token))

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_BAD_SIGNATURE)
    assert protected.calls.handled == []


def test_expired_token_rejected(
    protected: Running, sessions: Sessions, keys: KeySet
) -> None:
    session = sessions.create("alice")
    issuer = TokenIssuer(keys, issuer=ISSUER, audience=AUDIENCE, lifetime_seconds=-120)
    token = issuer.issue(session.record.user_id, session.record.session_id).token

    error = expect_error(protected.stub, "unary_unary", bearer(token))

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_EXPIRED)


def test_wrong_audience_rejected(
    protected: Running, sessions: Sessions, keys: KeySet
) -> None:
    session = sessions.create("alice")
    issuer = TokenIssuer(keys, issuer=ISSUER, audience="other", lifetime_seconds=60)
    token = issuer.issue(session.record.user_id, session.record.session_id).token

    error = expect_error(protected.stub, "unary_unary", bearer(token))

    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_CLAIMS_INVALID)


@pytest.mark.parametrize("kind", KINDS)
def test_aio_sync_handlers_get_principal(
    keys: KeySet, redis_url: str, prefix: str, sessions: Sessions, kind: str
) -> None:
    options = _local_options(redis_url, prefix)
    running = start_aio(
        lambda: [AsyncAuthInterceptor(AsyncLocalValidator.from_url(keys, **options))],
        sync_handlers=True,
    )
    session = sessions.create("alice")
    try:
        rejected = expect_error(running.stub, kind)
        greetings = call(running.stub, kind, bearer(session.token))
    finally:
        running.stop()

    assert_rejected(rejected, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
    assert greetings
    assert set(greetings) == {"alice"}
    assert len(running.calls.handled) == 1


def test_unknown_method_unimplemented(protected: Running) -> None:
    method = protected.channel.unary_unary("/nope.v1.Missing/Call")

    with pytest.raises(grpc.RpcError) as caught:
        method(b"", timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_health_protected_by_default(protected: Running) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        protected.health_check()

    assert_rejected(caught.value, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)


def test_public_service_wildcard(
    flavour: str, keys: KeySet, redis_url: str, prefix: str
) -> None:
    public = ("/grpc.health.v1.Health/*",)
    running = start_protected(flavour, keys, redis_url, prefix, public_methods=public)
    try:
        response = running.health_check()
        error = expect_error(running.stub, "unary_unary")
    finally:
        running.stop()

    assert response.status == response.SERVING
    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)


def test_public_method_exact_name(
    flavour: str, keys: KeySet, redis_url: str, prefix: str
) -> None:
    public = (f"{GREETER}/SayHello",)
    running = start_protected(flavour, keys, redis_url, prefix, public_methods=public)
    try:
        greetings = call(running.stub, "unary_unary")
        error = expect_error(running.stub, "unary_stream")
        with pytest.raises(grpc.RpcError) as health_error:
            running.health_check()
    finally:
        running.stop()

    assert greetings == [ANONYMOUS]
    assert_rejected(error, grpc.StatusCode.UNAUTHENTICATED, Reason.TOKEN_MISSING)
    assert health_error.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_principal_not_leaked_to_next_call(
    keys: KeySet, redis_url: str, prefix: str, sessions: Sessions
) -> None:
    public = (f"{GREETER}/SayHello",)
    running = start_protected(
        "sync", keys, redis_url, prefix, public_methods=public, max_workers=1
    )
    session = sessions.create("alice")
    try:
        streamed = call(running.stub, "unary_stream", bearer(session.token))
        public_call = call(running.stub, "unary_unary")
    finally:
        running.stop()

    assert streamed == ["alice", "alice"]
    assert public_call == [ANONYMOUS]


@pytest.mark.parametrize(
    "outer", [True, False], ids=["mapper-outside", "mapper-inside"]
)
def test_stacked_with_error_mapper(
    flavour: str,
    keys: KeySet,
    redis_url: str,
    prefix: str,
    sessions: Sessions,
    outer: bool,
) -> None:
    running = start_protected(flavour, keys, redis_url, prefix, outer=outer)
    session = sessions.create("alice")
    try:
        rejected = {kind: expect_error(running.stub, kind) for kind in KINDS}
        admitted = {
            kind: call(running.stub, kind, bearer(session.token)) for kind in KINDS
        }
        with pytest.raises(grpc.RpcError) as boom:
            request = greeter_pb2.SayHelloRequest(message="boom")
            running.stub.SayHello(request, metadata=bearer(session.token), timeout=5)
    finally:
        running.stop()

    for kind in KINDS:
        assert rejected[kind].code() == grpc.StatusCode.UNAUTHENTICATED, kind
        assert reason_of(rejected[kind]) == Reason.TOKEN_MISSING, kind
        assert set(admitted[kind]) == {"alice"}, kind
    assert boom.value.code() == grpc.StatusCode.INTERNAL


def test_missing_role_permission_denied(
    flavour: str, keys: KeySet, redis_url: str, prefix: str, sessions: Sessions
) -> None:
    roles = {f"{GREETER}/SayHello": ["admin"], f"{GREETER}/*": ["reader"]}
    running = start_protected(flavour, keys, redis_url, prefix, required_roles=roles)
    reader = sessions.create("reader-only", roles=("reader",))
    admin = sessions.create("admin", roles=("reader", "admin"))
    nobody = sessions.create("no-roles")
    try:
        denied = expect_error(running.stub, "unary_unary", bearer(reader.token))
        reader_stream = call(running.stub, "unary_stream", bearer(reader.token))
        admin_hello = call(running.stub, "unary_unary", bearer(admin.token))
        nobody_stream = expect_error(running.stub, "unary_stream", bearer(nobody.token))
    finally:
        running.stop()

    assert_rejected(denied, grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED)
    assert "admin" in (denied.details() or "")
    assert reader_stream == ["reader-only", "reader-only"]
    assert admin_hello == ["admin"]
    assert_rejected(
        nobody_stream, grpc.StatusCode.PERMISSION_DENIED, Reason.PERMISSION_DENIED
    )
    assert [name for _, name in running.calls.handled] == ["reader-only", "admin"]


class _ExplodingValidator:
    def validate(self, token: str, timeout: float | None = None) -> Validation:
        raise RuntimeError("secret internal detail")


class _AsyncExplodingValidator:
    async def validate(self, token: str, timeout: float | None = None) -> Validation:
        raise RuntimeError("secret internal detail")


@pytest.mark.parametrize("kind", KINDS)
def test_validator_crash_unavailable(
    flavour: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    if flavour == "sync":
        running = start_sync([AuthInterceptor(_ExplodingValidator())])
    else:
        running = start_aio(lambda: [AsyncAuthInterceptor(_AsyncExplodingValidator())])
    try:
        error = expect_error(running.stub, kind, bearer("any-token"))
    finally:
        running.stop()

    assert_rejected(error, grpc.StatusCode.UNAVAILABLE, Reason.STORE_UNAVAILABLE)
    assert error.details() == FAILED_CHECK_MESSAGE
    assert running.calls.handled == []
    assert "secret internal detail" in caplog.text


def test_redis_stopped_then_recovers(
    flavour: str, keys: KeySet, redis_process: RedisProcess, prefix: str
) -> None:
    sessions = Sessions(redis_process.url, prefix, keys)
    running = start_protected(flavour, keys, redis_process.url, prefix)
    try:
        before = sessions.create("alice")
        assert call(running.stub, "unary_unary", bearer(before.token)) == ["alice"]

        redis_process.stop()
        started = time.monotonic()
        down = expect_error(
            running.stub, "unary_unary", bearer(before.token), timeout=3
        )
        elapsed = time.monotonic() - started
        handled_while_down = len(running.calls.handled)

        redis_process.start()
        after = sessions.create("alice")
        recovered = call(running.stub, "unary_unary", bearer(after.token))
    finally:
        running.stop()

    assert_rejected(down, grpc.StatusCode.UNAVAILABLE, Reason.STORE_UNAVAILABLE)
    assert elapsed < 3
    assert handled_while_down == 1
    assert recovered == ["alice"]


def test_frozen_redis_unavailable_within_deadline(
    flavour: str, keys: KeySet, redis_process: RedisProcess, prefix: str
) -> None:
    sessions = Sessions(redis_process.url, prefix, keys)
    options = _local_options(redis_process.url, prefix) | {"redis_timeout": 5.0}
    if flavour == "sync":
        running = start_sync([AuthInterceptor(LocalValidator(keys, **options))])
    else:
        running = start_aio(
            lambda: [
                AsyncAuthInterceptor(AsyncLocalValidator.from_url(keys, **options))
            ]
        )
    try:
        session = sessions.create("alice")
        assert call(running.stub, "unary_unary", bearer(session.token)) == ["alice"]
        redis_process.freeze()
        started = time.monotonic()
        error = expect_error(
            running.stub, "unary_unary", bearer(session.token), timeout=0.8
        )
        elapsed = time.monotonic() - started
        redis_process.thaw()
        recovered = _retry(
            lambda: call(running.stub, "unary_unary", bearer(session.token))
        )
    finally:
        redis_process.thaw()
        running.stop()

    assert_rejected(error, grpc.StatusCode.UNAVAILABLE, Reason.STORE_UNAVAILABLE)
    assert elapsed < 0.8
    assert recovered == ["alice"]


def _retry(action: Callable[[], list[str]], attempts: int = 20) -> list[str]:
    for _ in range(attempts - 1):
        try:
            return action()
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            time.sleep(0.1)
    return action()


def test_current_principal_outside_call() -> None:
    with pytest.raises(NoPrincipalError):
        current_principal()


@pytest.mark.parametrize(
    ("public", "roles"),
    [
        (("*",), None),
        (("/pkg.Service",), None),
        (("/pkg.Service/Method*",), None),
        ("/pkg.Service/*", None),
        ((), {"pkg.Service/Method": ["admin"]}),
        ((), {"/pkg.Service/Method": "admin"}),
        (("/pkg.Service/Method",), {"/pkg.Service/Method": ["admin"]}),
        (("/pkg.Service/*",), {"/pkg.Service/Method": ["admin"]}),
        (("/pkg.Service/Method",), {"/pkg.Service/*": ["admin"]}),
    ],
    ids=[
        "star",
        "no-method",
        "partial-wildcard",
        "string-not-list",
        "no-leading-slash",
        "roles-as-string",
        "public-with-roles",
        "public-service-method-roles",
        "public-method-service-roles",
    ],
)
def test_policy_rejects_bad_names(public: Any, roles: Any) -> None:
    with pytest.raises(ConfigurationError):
        MethodPolicy(public, roles)


def test_policy_roles_union() -> None:
    policy = MethodPolicy(
        required_roles={"/pkg.S/M": ["admin"], "/pkg.S/*": ["reader"]},
    )

    assert policy.roles_for("/pkg.S/M") == {"admin", "reader"}
    assert policy.roles_for("/pkg.S/Other") == {"reader"}
    assert policy.roles_for("/pkg.T/M") == frozenset()
