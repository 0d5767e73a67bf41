"""Hostile request fields and metadata: Login inputs, authorization headers, ids.

The server runs on a MemoryStore, because none of these cases depends on
how sessions are stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from authgrpc.errors import Reason, error_info
from authgrpc.store import MemoryStore
from authgrpc.v1 import auth_pb2
from tests.conftest import make_keys
from tests.hostile_support import (
    PASSWORD,
    UNAUTHENTICATED,
    Harness,
    assert_rejected,
    assert_status,
    bearer,
    live_session_ids,
    rpc_error,
    settings,
    start_harness,
    stop_harness,
)

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def harness() -> AsyncIterator[Harness]:
    running = await start_harness(settings(), MemoryStore(), make_keys())
    yield running
    await stop_harness(running)


# Login fields.

BAD_USERNAMES = [
    pytest.param("", id="empty"),
    pytest.param("   ", id="only-spaces"),
    pytest.param("\u3000", id="ideographic-space"),
    pytest.param("a" * 257, id="257-bytes"),
    pytest.param("\u00e9" * 129, id="258-bytes-in-129-chars"),
    pytest.param("alice\u0000", id="nul-byte"),
    pytest.param("\u0000alice", id="leading-nul"),
    pytest.param("ali\u0000ce", id="inner-nul"),
    pytest.param("alice\n", id="trailing-newline"),
    pytest.param("alice\r\n", id="trailing-crlf"),
    pytest.param("\talice", id="leading-tab"),
    pytest.param("alice\u001f", id="unit-separator"),
    pytest.param("alice\u007f", id="delete"),
    pytest.param("alice\u0085", id="next-line"),
    pytest.param("al\u200bice", id="zero-width-space"),
    pytest.param("alice\u202e", id="right-to-left-override"),
    pytest.param("alice\ue000", id="private-use"),
    pytest.param("alice\u0378", id="unassigned"),
]


@pytest.mark.parametrize("username", BAD_USERNAMES)
async def test_bad_username_rejected(harness: Harness, username: str) -> None:
    error = await rpc_error(harness.login(username, PASSWORD))

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "username"
    assert PASSWORD not in (error.details() or "")


BAD_PASSWORDS = [
    pytest.param("p" * 1025, id="1025-bytes"),
    pytest.param("\u00e9" * 513, id="1026-bytes-in-513-chars"),
    pytest.param("\U0001f600" * 257, id="1028-bytes-in-257-emoji"),
]


@pytest.mark.parametrize("password", BAD_PASSWORDS)
async def test_oversized_password_rejected(harness: Harness, password: str) -> None:
    error = await rpc_error(harness.login("alice", password))

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "password"
    assert password[:16] not in (error.details() or "")


async def test_empty_password_rejected(harness: Harness) -> None:
    error = await rpc_error(harness.login("alice", ""))

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "password"


async def test_username_checked_first(harness: Harness) -> None:
    error = await rpc_error(harness.login("", ""))

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "username"


LIMIT_SIZED = [
    pytest.param("a" * 256, PASSWORD, id="256-byte-username"),
    pytest.param("alice", "p" * 1024, id="1024-byte-password"),
    pytest.param("alice", "pass\u0000word", id="nul-in-password"),
    pytest.param("alice", "\n" + PASSWORD, id="newline-in-password"),
]


@pytest.mark.parametrize(("username", "password"), LIMIT_SIZED)
async def test_limit_sized_fields_checked(
    harness: Harness, username: str, password: str
) -> None:
    # Within the limits, these are ordinary wrong credentials.
    await assert_rejected(
        harness.login(username, password),
        UNAUTHENTICATED,
        Reason.INVALID_CREDENTIALS,
    )


SAME_USER = [
    pytest.param("alice", id="plain"),
    pytest.param("ALICE", id="upper-case"),
    pytest.param("Alice", id="title-case"),
    pytest.param("aLiCe", id="mixed-case"),
    pytest.param("\uff21\uff2c\uff29\uff23\uff25", id="fullwidth-upper"),
    pytest.param("\uff41\uff4c\uff49\uff43\uff45", id="fullwidth-lower"),
    pytest.param("  alice  ", id="surrounding-spaces"),
    pytest.param("\u00a0alice\u3000", id="no-break-and-ideographic-space"),
]


@pytest.mark.parametrize("username", SAME_USER)
async def test_username_variant_logs_in(harness: Harness, username: str) -> None:
    response = await harness.login(username, PASSWORD)

    assert response.session.username == "alice"
    assert response.session.user_id == harness.user_id


async def test_password_is_case_sensitive(harness: Harness) -> None:
    await assert_rejected(
        harness.login("alice", PASSWORD.upper()),
        UNAUTHENTICATED,
        Reason.INVALID_CREDENTIALS,
    )


async def test_failures_look_identical(harness: Harness) -> None:
    await harness.store.create_user(
        "carol",
        harness.server.authenticator.hasher.hash_sync(PASSWORD),
        (),
    )
    carol = await harness.store.get_user_by_name("carol")
    assert carol is not None
    await harness.store.set_disabled(carol.user_id, True)

    unknown = await rpc_error(harness.login("mallory", PASSWORD))
    wrong = await rpc_error(harness.login("alice", "wrong password"))
    disabled = await rpc_error(harness.login("carol", PASSWORD))

    assert_status(unknown, UNAUTHENTICATED, Reason.INVALID_CREDENTIALS)
    assert_status(wrong, UNAUTHENTICATED, Reason.INVALID_CREDENTIALS)
    assert_status(disabled, UNAUTHENTICATED, Reason.INVALID_CREDENTIALS)
    assert unknown.details() == wrong.details()
    assert disabled.details() == wrong.details()
    assert error_info(unknown) == error_info(wrong)
    assert error_info(disabled) == error_info(wrong)
    assert unknown.trailing_metadata() == wrong.trailing_metadata()


# authorization metadata, through the interceptor on ListSessions.

BAD_AUTHORIZATION = [
    pytest.param([], Reason.TOKEN_MISSING, id="absent"),
    pytest.param([("authorization", "")], Reason.TOKEN_MISSING, id="empty"),
    pytest.param([("authorization", "Bearer")], Reason.TOKEN_MISSING, id="no-token"),
    pytest.param([("authorization", "Bearer ")], Reason.TOKEN_MISSING, id="space-only"),
    pytest.param(
        [("authorization", "Basic YWxpY2U6cGFzcw==")],
        Reason.TOKEN_MISSING,
        id="basic",
    ),
    pytest.param([("authorization", "Token abc")], Reason.TOKEN_MISSING, id="token"),
    pytest.param(
        [("authorization", "Bearer" + "x" * 20)], Reason.TOKEN_MISSING, id="no-space"
    ),
    pytest.param(
        [("authorization", "Bearer " + "a" * 9000)],
        Reason.TOKEN_MALFORMED,
        id="over-8-kib",
    ),
    pytest.param(
        [("authorization", "Bearer " + "a" * 5000)],
        Reason.TOKEN_MALFORMED,
        id="token-over-4-kib",
    ),
]


@pytest.mark.parametrize(("metadata", "reason"), BAD_AUTHORIZATION)
async def test_bad_authorization_rejected(
    harness: Harness, metadata: list[tuple[str, str]], reason: Reason
) -> None:
    list_call = harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=metadata
    )
    await assert_rejected(list_call, UNAUTHENTICATED, reason)

    logout_all = harness.stub.LogoutAll(auth_pb2.LogoutAllRequest(), metadata=metadata)
    await assert_rejected(logout_all, UNAUTHENTICATED, reason)
    assert await live_session_ids(harness) == [harness.session_id]


async def test_two_authorization_values_rejected(harness: Harness) -> None:
    metadata = [*bearer(harness.token), *bearer(harness.token)]

    list_call = harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=metadata
    )
    await assert_rejected(list_call, UNAUTHENTICATED, Reason.TOKEN_MALFORMED)

    logout_all = harness.stub.LogoutAll(auth_pb2.LogoutAllRequest(), metadata=metadata)
    await assert_rejected(logout_all, UNAUTHENTICATED, Reason.TOKEN_MALFORMED)
    assert await live_session_ids(harness) == [harness.session_id]


async def test_metadata_over_server_limit(harness: Harness) -> None:
    # The server caps all metadata at 16 KiB, so gRPC itself rejects this
    # before the interceptor runs, without an ErrorInfo.
    metadata = [("authorization", "Bearer " + "a" * 20_000)]
    call = harness.stub.ListSessions(auth_pb2.ListSessionsRequest(), metadata=metadata)
    error = await rpc_error(call)

    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_info(error) is None


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_scheme_any_case_accepted(harness: Harness, scheme: str) -> None:
    metadata = [("authorization", f"{scheme} {harness.token}")]
    response = await harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=metadata
    )

    assert [s.session_id for s in response.sessions] == [harness.session_id]


async def test_extra_spaces_accepted(harness: Harness) -> None:
    metadata = [("authorization", f"Bearer   {harness.token}  ")]
    response = await harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=metadata
    )

    assert [s.session_id for s in response.sessions] == [harness.session_id]


# Logout: the token may come in the body, in metadata, or both when equal.


async def test_logout_tokens_must_agree(harness: Harness) -> None:
    other = await harness.login()
    request = auth_pb2.LogoutRequest(access_token=other.access_token)
    error = await rpc_error(
        harness.stub.Logout(request, metadata=bearer(harness.token))
    )

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "access_token"
    assert sorted(await live_session_ids(harness)) == sorted(
        [harness.session_id, other.session.session_id]
    )


async def test_logout_without_token(harness: Harness) -> None:
    await assert_rejected(
        harness.stub.Logout(auth_pb2.LogoutRequest()),
        UNAUTHENTICATED,
        Reason.TOKEN_MISSING,
    )


async def test_logout_basic_header_rejected(harness: Harness) -> None:
    call = harness.stub.Logout(
        auth_pb2.LogoutRequest(),
        metadata=[("authorization", "Basic YWxpY2U6cGFzcw==")],
    )
    await assert_rejected(call, UNAUTHENTICATED, Reason.TOKEN_MISSING)
    assert await live_session_ids(harness) == [harness.session_id]


async def test_validate_empty_token(harness: Harness) -> None:
    request = auth_pb2.ValidateSessionRequest(access_token="")
    await assert_rejected(
        harness.stub.ValidateSession(request), UNAUTHENTICATED, Reason.TOKEN_MISSING
    )


# RevokeSession ids.

BAD_SESSION_IDS = [
    pytest.param("", id="empty"),
    pytest.param("s" * 65, id="65-chars"),
    pytest.param("s" * 10_000, id="10-kilobytes"),
]


@pytest.mark.parametrize("session_id", BAD_SESSION_IDS)
async def test_bad_session_id_rejected(harness: Harness, session_id: str) -> None:
    call = harness.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=session_id),
        metadata=bearer(harness.token),
    )
    error = await rpc_error(call)

    assert_status(error, INVALID_ARGUMENT, Reason.INVALID_ARGUMENT)
    info = error_info(error)
    assert info is not None
    assert info.metadata["field"] == "session_id"


@pytest.mark.parametrize(
    "session_id", ["../../etc/passwd", "*", "s\u0000", "a:b:c", "\u00e9"]
)
async def test_odd_session_id_not_revoked(harness: Harness, session_id: str) -> None:
    response = await harness.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=session_id),
        metadata=bearer(harness.token),
    )

    assert response.revoked is False
    assert await live_session_ids(harness) == [harness.session_id]


async def test_other_users_session_kept(harness: Harness) -> None:
    bob = await harness.login("bob")
    response = await harness.stub.RevokeSession(
        auth_pb2.RevokeSessionRequest(session_id=bob.session.session_id),
        metadata=bearer(harness.token),
    )

    assert response.revoked is False
    validation = await harness.stub.ValidateSession(
        auth_pb2.ValidateSessionRequest(access_token=bob.access_token)
    )
    assert validation.session.session_id == bob.session.session_id


async def test_logout_two_headers_rejected(harness: Harness) -> None:
    metadata = [*bearer(harness.token), *bearer(harness.token)]
    request = auth_pb2.LogoutRequest(access_token=harness.token)
    call = harness.stub.Logout(request, metadata=metadata)

    await assert_rejected(call, UNAUTHENTICATED, Reason.TOKEN_MALFORMED)
