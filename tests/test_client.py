"""AuthClient and AsyncAuthClient against a real auth server and the example greeter."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from authgrpc.client import AsyncAuthClient, AuthClient, NotLoggedInError
from authgrpc.errors import Reason, error_info
from authgrpc.example.service import build_server
from authgrpc.example.v1 import greeter_pb2, greeter_pb2_grpc
from authgrpc.validators import RemoteValidator
from tests.helpers_interceptor import PASSWORD, auth_target

__all__ = ["auth_target"]


@pytest.fixture
def greeter_target(auth_target: str) -> Iterator[str]:
    """The example greeter on a free port, validating through the auth server."""
    validator = RemoteValidator(auth_target)
    server, port = build_server(validator, "127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0).wait()
    validator.close()


def reason_of(error: grpc.RpcError) -> str | None:
    info = error_info(error)
    return None if info is None else info.reason


def say_hello(stub: greeter_pb2_grpc.GreeterServiceStub, **kwargs: object) -> str:
    request = greeter_pb2.SayHelloRequest()
    return str(stub.SayHello(request, timeout=5, **kwargs).greeting)


def test_call_credentials_then_logout(auth_target: str, greeter_target: str) -> None:
    client = AuthClient(auth_target)
    client.login("alice", PASSWORD)
    credentials = grpc.composite_channel_credentials(
        grpc.local_channel_credentials(), client.call_credentials()
    )
    with grpc.secure_channel(greeter_target, credentials) as channel:
        stub = greeter_pb2_grpc.GreeterServiceStub(channel)
        greeting = say_hello(stub)
        old_metadata = client.metadata()
        client.logout()
        with pytest.raises(grpc.RpcError) as logged_out:
            say_hello(stub)
    with grpc.insecure_channel(greeter_target) as channel:
        stub = greeter_pb2_grpc.GreeterServiceStub(channel)
        with pytest.raises(grpc.RpcError) as ended:
            say_hello(stub, metadata=old_metadata)
    client.close()

    assert greeting == "Hello, alice!"
    assert logged_out.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(logged_out.value) == Reason.TOKEN_MISSING
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(ended.value) == Reason.SESSION_ENDED
    assert client.tokens is None


def test_metadata_on_insecure_channel(auth_target: str, greeter_target: str) -> None:
    with (
        AuthClient(auth_target) as client,
        grpc.insecure_channel(greeter_target) as channel,
    ):
        stub = greeter_pb2_grpc.GreeterServiceStub(channel)
        client.login("alice", PASSWORD)
        greeting = say_hello(stub, metadata=client.metadata())
        with pytest.raises(grpc.RpcError) as caught:
            say_hello(stub)
        client.logout()

    assert greeting == "Hello, alice!"
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(caught.value) == Reason.TOKEN_MISSING


def test_refresh_and_validate(auth_target: str) -> None:
    with AuthClient(auth_target) as client:
        first = client.login("alice", PASSWORD)
        second = client.refresh()
        principal = client.validate()
        client.logout()

    assert second.refresh_token != first.refresh_token
    assert second.session_id == first.session_id
    assert principal.username == "alice"
    assert principal.session_id == first.session_id
    assert principal.roles == ("reader",)


def test_login_wrong_password(auth_target: str) -> None:
    with AuthClient(auth_target) as client:
        with pytest.raises(grpc.RpcError) as caught:
            client.login("alice", "wrong password")
        tokens = client.tokens

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(caught.value) == Reason.INVALID_CREDENTIALS
    assert tokens is None


def test_not_logged_in(auth_target: str, greeter_target: str) -> None:
    with AuthClient(auth_target) as client:
        with pytest.raises(NotLoggedInError):
            client.metadata()
        credentials = grpc.composite_channel_credentials(
            grpc.local_channel_credentials(), client.call_credentials()
        )
        with grpc.secure_channel(greeter_target, credentials) as channel:
            stub = greeter_pb2_grpc.GreeterServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                say_hello(stub)
        client.logout()

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert reason_of(caught.value) == Reason.TOKEN_MISSING


def test_auto_refresh_near_expiry(auth_target: str) -> None:
    with AuthClient(auth_target) as client:
        first = client.login("alice", PASSWORD)
        client._tokens.set(
            type(first)(first.access_token, first.refresh_token, 0.0, first.session_id)
        )
        token = client.access_token()
        refreshed = client.tokens
        client.logout()

    assert refreshed is not None
    assert refreshed.refresh_token != first.refresh_token
    assert token == refreshed.access_token


async def test_async_client_round_trip(auth_target: str) -> None:
    async with AsyncAuthClient(auth_target) as client:
        first = await client.login("alice", PASSWORD)
        principal = await client.validate()
        metadata = client.metadata()
        fresh = await client.ensure_fresh(margin=0)
        second = await client.refresh()
        await client.logout()
        tokens = client.tokens

    assert principal.username == "alice"
    assert metadata == [("authorization", f"Bearer {first.access_token}")]
    assert fresh == first
    assert second.session_id == first.session_id
    assert tokens is None


def test_greeter_streams_with_principal(auth_target: str) -> None:
    validator = RemoteValidator(auth_target)
    server, port = build_server(validator, "127.0.0.1:0")
    server.start()
    try:
        with (
            AuthClient(auth_target) as client,
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        ):
            client.login("alice", PASSWORD)
            stub = greeter_pb2_grpc.GreeterServiceStub(channel)
            streamed = stub.StreamGreetings(
                greeter_pb2.StreamGreetingsRequest(count=2),
                metadata=client.metadata(),
                timeout=5,
            )
            greetings = [(item.index, item.greeting) for item in streamed]
            client.logout()
    finally:
        server.stop(0).wait()
        validator.close()

    assert greetings == [(1, "Hello, alice!"), (2, "Hello, alice!")]
