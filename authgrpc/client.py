"""Clients of the auth service that keep the tokens and attach them to other calls.

:class:`AuthClient` is the sync client and :class:`AsyncAuthClient` the asyncio
one. After :meth:`~AuthClient.login`, a client attaches the access token to
calls on other channels in one of two ways:

- :meth:`~AuthClient.call_credentials` returns ``grpc.CallCredentials``,
  which gRPC sends only over a channel with channel credentials. Compose them
  with TLS credentials, or with ``grpc.local_channel_credentials()`` for a
  plaintext channel to a server on the same host::

      creds = grpc.composite_channel_credentials(
          grpc.local_channel_credentials(), client.call_credentials()
      )
      channel = grpc.secure_channel("127.0.0.1:50061", creds)

- :meth:`~AuthClient.metadata` returns the ``authorization`` entry to pass as
  ``metadata=`` on each call, which works on any channel, including
  ``grpc.insecure_channel``. Send it in plaintext only on loopback, since
  anyone who reads the token can use it until the session ends.

Failed calls raise ``grpc.RpcError`` unchanged; use
:func:`authgrpc.errors.error_info` to read the ErrorInfo reason.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

import grpc

from authgrpc.metadata import AUTHORIZATION
from authgrpc.principal import Principal
from authgrpc.v1 import auth_pb2, auth_pb2_grpc

log = logging.getLogger("authgrpc.client")

DEFAULT_TIMEOUT = 5.0
REFRESH_MARGIN_SECONDS = 30.0


class NotLoggedInError(RuntimeError):
    """A call needs tokens, but the client has not logged in or has logged out."""


@dataclass(frozen=True, slots=True)
class Tokens:
    """The tokens of one session, as the last Login or Refresh returned them."""

    access_token: str
    refresh_token: str
    expires_at: float
    session_id: str

    def expires_within(self, seconds: float) -> bool:
        """Return whether the access token expires within ``seconds`` from now."""
        return self.expires_at - time.time() <= seconds


def _tokens_from(response: Any) -> Tokens:
    return Tokens(
        access_token=response.access_token,
        refresh_token=response.refresh_token,
        expires_at=response.access_token_expire_time.ToMilliseconds() / 1000,
        session_id=response.session.session_id,
    )


def _principal_from(response: Any) -> Principal:
    principal = response.principal
    return Principal(
        principal.user_id,
        principal.username,
        tuple(principal.roles),
        response.session.session_id,
    )


def _authorization(token: str) -> tuple[str, str]:
    return (AUTHORIZATION, f"Bearer {token}")


class _TokenHolder:
    """The current tokens, shared with gRPC's credential threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: Tokens | None = None

    def get(self) -> Tokens | None:
        with self._lock:
            return self._tokens

    def require(self) -> Tokens:
        tokens = self.get()
        if tokens is None:
            raise NotLoggedInError("not logged in: call login() first")
        return tokens

    def set(self, tokens: Tokens | None) -> None:
        with self._lock:
            self._tokens = tokens


class AuthMetadataPlugin(grpc.AuthMetadataPlugin):  # type: ignore[misc]
    """Adds ``authorization: Bearer <access token>`` to every call.

    ``token`` returns the access token to send. When it raises
    NotLoggedInError the call goes out without a token, so the server rejects
    it with UNAUTHENTICATED. When it raises anything else, the call fails with
    UNAVAILABLE before it is sent, because gRPC fails a call whose credentials
    plugin reports an error.
    """

    def __init__(self, token: Any):
        self._token = token

    def __call__(
        self,
        context: grpc.AuthMetadataContext,
        callback: grpc.AuthMetadataPluginCallback,
    ) -> None:
        try:
            token = self._token()
        except NotLoggedInError:
            callback((), None)
            return
        except Exception as error:
            log.warning("access token lookup failed, failing the call: %s", error)
            callback(None, error)
            return
        callback((_authorization(token),), None)


class AuthClient:
    """A sync client of the auth service at ``target`` that keeps one session's tokens.

    ``credentials`` are channel credentials for TLS; without them the channel
    is plaintext. ``timeout`` is each call's deadline in seconds. With
    ``auto_refresh``, :meth:`access_token` and the call credentials refresh
    the tokens when the access token expires within 30 seconds.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        auto_refresh: bool = True,
    ):
        self.target = target
        self.timeout = timeout
        self.auto_refresh = auto_refresh
        if credentials is None:
            self._channel = grpc.insecure_channel(target)
        else:
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        self._tokens = _TokenHolder()
        self._refresh_lock = threading.Lock()

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, or None before login and after logout."""
        return self._tokens.get()

    def login(self, username: str, password: str) -> Tokens:
        """Log in, keep the new session's tokens, and return them."""
        request = auth_pb2.LoginRequest(username=username, password=password)
        response = self._stub.Login(request, timeout=self.timeout)
        tokens = _tokens_from(response)
        self._tokens.set(tokens)
        return tokens

    def refresh(self) -> Tokens:
        """Exchange the refresh token for new tokens, keep them, and return them."""
        with self._refresh_lock:
            current = self._tokens.require()
            request = auth_pb2.RefreshRequest(refresh_token=current.refresh_token)
            response = self._stub.Refresh(request, timeout=self.timeout)
            tokens = _tokens_from(response)
            self._tokens.set(tokens)
            return tokens

    def access_token(self) -> str:
        """Return the access token, refreshed first if it is about to expire."""
        tokens = self._tokens.require()
        if self.auto_refresh and tokens.expires_within(REFRESH_MARGIN_SECONDS):
            try:
                tokens = self.refresh()
            except grpc.RpcError as error:
                log.warning(
                    "access token refresh failed, sending the current token: %s: %s",
                    error.code().name,
                    error.details(),
                )
        return tokens.access_token

    def metadata(self) -> list[tuple[str, str]]:
        """Return ``[("authorization", "Bearer <access token>")]`` for ``metadata=``."""
        return [_authorization(self.access_token())]

    def call_credentials(self) -> grpc.CallCredentials:
        """Return call credentials that attach the current access token to each call."""
        return grpc.metadata_call_credentials(
            AuthMetadataPlugin(self.access_token), name="authgrpc"
        )

    def validate(self) -> Principal:
        """Return who the access token belongs to, as ValidateSession reports it."""
        request = auth_pb2.ValidateSessionRequest(
            access_token=self._tokens.require().access_token
        )
        return _principal_from(
            self._stub.ValidateSession(request, timeout=self.timeout)
        )

    def logout(self) -> None:
        """End the session and forget its tokens; without a session, do nothing."""
        tokens = self._tokens.get()
        if tokens is None:
            return
        request = auth_pb2.LogoutRequest(access_token=tokens.access_token)
        self._stub.Logout(request, timeout=self.timeout)
        self._tokens.set(None)

    def close(self) -> None:
        """Close the channel. The session stays live; call :meth:`logout` to end it."""
        self._channel.close()

    def __enter__(self) -> AuthClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncAuthClient:
    """The asyncio counterpart of :class:`AuthClient`.

    Its call credentials send the current access token and never refresh it,
    because gRPC runs credential plugins on its own threads; call
    :meth:`refresh`, or :meth:`ensure_fresh` before a call, instead. The
    channel opens on first use, so that it belongs to the running event loop.
    """

    def __init__(
        self,
        target: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.target = target
        self.timeout = timeout
        self._credentials = credentials
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._tokens = _TokenHolder()

    @property
    def tokens(self) -> Tokens | None:
        """The current tokens, or None before login and after logout."""
        return self._tokens.get()

    def _auth(self) -> Any:
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials)
            self._stub = auth_pb2_grpc.AuthServiceStub(self._channel)
        return self._stub

    async def login(self, username: str, password: str) -> Tokens:
        """Log in, keep the new session's tokens, and return them."""
        request = auth_pb2.LoginRequest(username=username, password=password)
        response = await self._auth().Login(request, timeout=self.timeout)
        tokens = _tokens_from(response)
        self._tokens.set(tokens)
        return tokens

    async def refresh(self) -> Tokens:
        """Exchange the refresh token for new tokens, keep them, and return them."""
        current = self._tokens.require()
        request = auth_pb2.RefreshRequest(refresh_token=current.refresh_token)
        response = await self._auth().Refresh(request, timeout=self.timeout)
        tokens = _tokens_from(response)
        self._tokens.set(tokens)
        return tokens

    async def ensure_fresh(self, margin: float = REFRESH_MARGIN_SECONDS) -> Tokens:
        """Refresh the tokens if the access token expires within ``margin`` seconds."""
        tokens = self._tokens.require()
        if tokens.expires_within(margin):
            tokens = await self.refresh()
        return tokens

    def access_token(self) -> str:
        """Return the current access token."""
        return self._tokens.require().access_token

    def metadata(self) -> list[tuple[str, str]]:
        """Return ``[("authorization", "Bearer <access token>")]`` for ``metadata=``."""
        return [_authorization(self.access_token())]

    def call_credentials(self) -> grpc.CallCredentials:
        """Return call credentials that attach the current access token to each call."""
        return grpc.metadata_call_credentials(
            AuthMetadataPlugin(self.access_token), name="authgrpc"
        )

    async def validate(self) -> Principal:
        """Return who the access token belongs to, as ValidateSession reports it."""
        request = auth_pb2.ValidateSessionRequest(access_token=self.access_token())
        return _principal_from(
            await self._auth().ValidateSession(request, timeout=self.timeout)
        )

    async def logout(self) -> None:
        """End the session and forget its tokens; without a session, do nothing."""
        tokens = self._tokens.get()
        if tokens is None:
            return
        request = auth_pb2.LogoutRequest(access_token=tokens.access_token)
        await self._auth().Logout(request, timeout=self.timeout)
        self._tokens.set(None)

    async def close(self) -> None:
        """Close the channel. The session stays live; call :meth:`logout` to end it."""
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> AsyncAuthClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
