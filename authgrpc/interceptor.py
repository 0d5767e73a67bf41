"""Server interceptors that admit only calls carrying a valid bearer token.

:class:`AuthInterceptor` is for ``grpc.server`` and :class:`AsyncAuthInterceptor`
for ``grpc.aio.server``. Each reads ``authorization: Bearer <token>`` metadata,
checks the token with a validator within the call's deadline, checks the roles
that the method requires, and runs the handler with the caller's
:class:`~authgrpc.principal.Principal` current, so that
:func:`~authgrpc.principal.current_principal` returns it. A rejected call ends
with the status of :func:`authgrpc.errors.to_status`, including its ErrorInfo,
and its handler never runs. An unexpected exception from the validator ends the
call with UNAVAILABLE. Methods that the server does not implement pass through
untouched, so the server still returns UNIMPLEMENTED.

Installing one takes two lines::

    validator = RemoteValidator("127.0.0.1:50051")
    server = grpc.server(pool, interceptors=[AuthInterceptor(validator)])
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import re
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from typing import Any

import grpc

from authgrpc.errors import (
    CallerError,
    ConfigurationError,
    PermissionDenied,
    StoreUnavailable,
    to_status,
)
from authgrpc.metadata import bearer_token
from authgrpc.principal import Principal, reset_principal, set_principal
from authgrpc.validators import AsyncValidator, Validator

log = logging.getLogger("authgrpc.interceptor")

FAILED_CHECK_MESSAGE = "authentication check failed; try again later"
_METHOD_PATTERN = re.compile(r"^/[^/*\s]+/([^/*\s]+|\*)$")


class MethodPolicy:
    """The methods that run without a token, and the roles each protected one requires.

    Names are full gRPC method names (``/pkg.Service/Method``) or whole services
    (``/pkg.Service/*``). A method's required roles are the union of the roles
    listed for its exact name and for its service. A name that is both public
    and has required roles raises ConfigurationError, because a public method
    has no principal whose roles could be checked.
    """

    def __init__(
        self,
        public_methods: Iterable[str] = (),
        required_roles: Mapping[str, Iterable[str]] | None = None,
    ):
        if isinstance(public_methods, str):
            raise ConfigurationError(
                f"public_methods must be a collection of method names, "
                f"not the string {public_methods!r}"
            )
        self.public_methods = frozenset(public_methods)
        self.required_roles = {
            name: _role_set(name, roles)
            for name, roles in (required_roles or {}).items()
        }
        for name in (*self.public_methods, *self.required_roles):
            if not _METHOD_PATTERN.match(name):
                raise ConfigurationError(
                    f"invalid method name {name!r}: use /package.Service/Method "
                    f"or /package.Service/*"
                )
        self._roles_by_method: dict[str, frozenset[str]] = {}
        # A method is public by its own name or its service's, and needs the
        # roles of both names, so a clash can span the two.
        both = {
            name
            for name in self.required_roles
            if name in self.public_methods or _service_of(name) in self.public_methods
        } | {
            name
            for name in self.public_methods
            if _service_of(name) in self.required_roles
        }
        if both:
            raise ConfigurationError(
                f"methods {sorted(both)} are public and also require roles; choose one"
            )

    def is_public(self, method: str) -> bool:
        """Return whether ``method`` runs without a token."""
        return (
            method in self.public_methods or _service_of(method) in self.public_methods
        )

    def roles_for(self, method: str) -> frozenset[str]:
        """Return every role that the caller of ``method`` must hold."""
        exact = self.required_roles.get(method, frozenset())
        service = self.required_roles.get(_service_of(method), frozenset())
        return exact | service

    def authorize(self, method: str, principal: Principal) -> None:
        """Raise PermissionDenied unless ``principal`` has the roles of ``method``."""
        required = self._roles_by_method.get(method)
        if required is None:
            # A server's method names are few and fixed, so this stays small.
            required = self._roles_by_method[method] = self.roles_for(method)
        if not required:
            return
        missing = required.difference(principal.roles)
        if missing:
            raise PermissionDenied(
                f"the caller lacks the role(s) {', '.join(sorted(missing))} "
                f"that {method} requires"
            )


def _role_set(name: str, roles: Iterable[str]) -> frozenset[str]:
    if isinstance(roles, str):
        raise ConfigurationError(
            f"required roles of {name} must be a collection of role names, "
            f"not the string {roles!r}"
        )
    return frozenset(roles)


def _service_of(method: str) -> str:
    return method.rpartition("/")[0] + "/*"


class _ThrottledLog:
    """Logs a repeated warning at most once per ``interval`` seconds, with a count."""

    def __init__(self, interval: float = 10.0, logger: logging.Logger = log):
        self._log = logger
        self._interval = interval
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed = self._suppressed, 0
            self._next = now + self._interval
        self._log.warning(
            message + " (%d similar warnings suppressed)", *args, suppressed
        )


class _Admission:
    """The check that both interceptors run, without the gRPC call plumbing."""

    def __init__(self, policy: MethodPolicy):
        self.policy = policy
        self._unavailable_log = _ThrottledLog()

    def status_for(self, method: str, error: BaseException) -> grpc.Status:
        """Map a failed check to the status that ends the call, logging as it goes."""
        if isinstance(error, StoreUnavailable):
            self._unavailable_log.warning("rejected %s: %s", method, error.message)
            return to_status(error)
        if isinstance(error, CallerError):
            log.debug("rejected %s: %s: %s", method, error.reason.value, error.message)
            return to_status(error)
        log.error("authentication check of %s failed", method, exc_info=error)
        return to_status(StoreUnavailable(FAILED_CHECK_MESSAGE))


def validation_timeout(remaining: float | None) -> float | None:
    """Return how long a validator may take out of a call's ``remaining`` seconds.

    A tenth of the remaining time, from 20 ms to 500 ms, is kept back, so
    that a validator's UNAVAILABLE reaches the caller before its deadline.
    """
    if remaining is None:
        return None
    margin = min(0.5, max(0.02, remaining * 0.1))
    return max(0.0, float(remaining) - margin)


def _remaining(context: Any) -> float | None:
    return validation_timeout(context.time_remaining())


def _reject_sync(context: grpc.ServicerContext, status: grpc.Status) -> None:
    # context.abort_with_status() raises, and an outer interceptor that maps
    # every exception to INTERNAL would replace the status. Setting the status
    # and returning normally keeps it, since grpcio sends the status set on the
    # context when a handler returns.
    context.set_code(status.code)
    context.set_details(status.details)
    context.set_trailing_metadata(status.trailing_metadata)


class _Rejected:
    """The response of a rejected unary-response call; it serializes to no bytes."""


_REJECTED = _Rejected()


def _serializer_with_rejection(
    serializer: Callable[[Any], bytes] | None,
) -> Callable[[Any], bytes]:
    def serialize(message: Any) -> bytes:
        if message is _REJECTED:
            return b""
        if serializer is None:
            return message  # type: ignore[no-any-return]
        return serializer(message)

    return serialize


def _iterate_in(context: contextvars.Context, iterator: Iterator[Any]) -> Iterator[Any]:
    """Yield from ``iterator``, running each step inside ``context``."""
    try:
        while True:
            try:
                item = context.run(next, iterator)
            except StopIteration:
                return
            yield item
    finally:
        close = getattr(iterator, "close", None)
        if close is not None:
            context.run(close)


class AuthInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Admits calls to a ``grpc.server`` only with a valid token and roles.

    ``validator`` is a sync :class:`~authgrpc.validators.Validator`, such as
    :class:`~authgrpc.validators.LocalValidator` or
    :class:`~authgrpc.validators.RemoteValidator`. See :class:`MethodPolicy`
    for ``public_methods`` and ``required_roles``.

    The check runs in the server's thread pool, inside the handler, because
    grpcio runs ``intercept_service`` on its single serving thread. A rejected
    call's status is set on the context and the handler returns normally,
    without raising, so it survives outer interceptors that map exceptions.
    """

    def __init__(
        self,
        validator: Validator,
        public_methods: Iterable[str] = (),
        required_roles: Mapping[str, Iterable[str]] | None = None,
    ):
        self.validator = validator
        self.policy = MethodPolicy(public_methods, required_roles)
        self._admission = _Admission(self.policy)
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]
        ] = {}

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1] or handler
        wrapped = None if self.policy.is_public(method) else self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped or handler

    def admit(self, method: str, context: grpc.ServicerContext) -> Principal | None:
        """Return the caller's principal, or set the rejection status and return None.

        The status goes on ``context``; nothing is raised.
        """
        try:
            token = bearer_token(context.invocation_metadata())
            validation = self.validator.validate(token, timeout=_remaining(context))
            self.policy.authorize(method, validation.principal)
        except Exception as error:
            _reject_sync(context, self._admission.status_for(method, error))
            return None
        return validation.principal

    def _wrap(
        self, handler: grpc.RpcMethodHandler, method: str
    ) -> grpc.RpcMethodHandler:
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer

        def admitted(context: grpc.ServicerContext) -> contextvars.Context | None:
            principal = self.admit(method, context)
            if principal is None:
                return None
            call_context = contextvars.copy_context()
            call_context.run(set_principal, principal)
            return call_context

        if handler.unary_unary is not None or handler.stream_unary is not None:
            streaming_request = handler.unary_unary is None
            unary_behavior = (
                handler.stream_unary if streaming_request else handler.unary_unary
            )

            def unary_response(request: Any, context: grpc.ServicerContext) -> Any:
                call_context = admitted(context)
                if call_context is None:
                    return _REJECTED
                return call_context.run(unary_behavior, request, context)

            build = (
                grpc.stream_unary_rpc_method_handler
                if streaming_request
                else grpc.unary_unary_rpc_method_handler
            )
            return build(
                unary_response,
                request_deserializer=deserializer,
                response_serializer=_serializer_with_rejection(serializer),
            )

        streaming_request = handler.unary_stream is None
        stream_behavior = (
            handler.stream_stream if streaming_request else handler.unary_stream
        )

        def stream_response(
            request: Any, context: grpc.ServicerContext
        ) -> Iterator[Any]:
            call_context = admitted(context)
            if call_context is None:
                return iter(())
            responses = call_context.run(stream_behavior, request, context)
            return _iterate_in(call_context, iter(responses))

        build = (
            grpc.stream_stream_rpc_method_handler
            if streaming_request
            else grpc.unary_stream_rpc_method_handler
        )
        return build(
            stream_response,
            request_deserializer=deserializer,
            response_serializer=serializer,
        )


def _is_async(behavior: Any) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


async def _aiterate_with(
    principal: Principal, responses: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    """Yield from ``responses`` with ``principal`` current during each step.

    The principal is set and reset within one step, never across a ``yield``,
    so the reset happens in the context that made the change even when the
    generator is closed from another task.
    """
    try:
        while True:
            token = set_principal(principal)
            try:
                item = await anext(responses)
            except StopAsyncIteration:
                return
            finally:
                reset_principal(token)
            yield item
    finally:
        close = getattr(responses, "aclose", None)
        if close is not None:
            token = set_principal(principal)
            try:
                await close()
            finally:
                reset_principal(token)


def _blocking_iterator(
    requests: AsyncIterator[Any], loop: asyncio.AbstractEventLoop
) -> Iterator[Any]:
    """Iterate an async request stream from a worker thread."""

    async def receive() -> Any:
        return await anext(requests)

    while True:
        try:
            yield asyncio.run_coroutine_threadsafe(receive(), loop).result()
        except StopAsyncIteration:
            return


async def _next_in_thread(iterator: Iterator[Any]) -> Any:
    done = object()
    item = await asyncio.to_thread(next, iterator, done)
    if item is done:
        raise StopAsyncIteration
    return item


class _ThreadIterator:
    """Adapts a blocking response iterator to ``async for``, one thread hop per item."""

    def __init__(self, iterator: Iterator[Any]):
        self._iterator = iterator

    def __aiter__(self) -> _ThreadIterator:
        return self

    async def __anext__(self) -> Any:
        return await _next_in_thread(self._iterator)


class AsyncAuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Admits calls to a ``grpc.aio.server`` only with a valid token and roles.

    ``validator`` is an :class:`~authgrpc.validators.AsyncValidator`, such as
    :class:`~authgrpc.validators.AsyncLocalValidator` or
    :class:`~authgrpc.validators.AsyncRemoteValidator`. See
    :class:`MethodPolicy` for ``public_methods`` and ``required_roles``.

    A rejected call ends with ``context.abort_with_status``, which in grpc.aio
    sends the status at once, so an outer interceptor that maps the abort's
    exception to another code cannot change the status the caller receives. Handlers may
    be coroutines, async generators, or plain functions, which run in the
    default thread pool.
    """

    def __init__(
        self,
        validator: AsyncValidator,
        public_methods: Iterable[str] = (),
        required_roles: Mapping[str, Iterable[str]] | None = None,
    ):
        self.validator = validator
        self.policy = MethodPolicy(public_methods, required_roles)
        self._admission = _Admission(self.policy)
        # Wrapped handlers by method, built once: a server's handlers do not
        # change, and rebuilding one per call costs more than the check itself.
        self._wrapped: dict[
            str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler | None]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1] or handler
        wrapped = None if self.policy.is_public(method) else self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped or handler

    async def admit(self, method: str, context: grpc.aio.ServicerContext) -> Principal:
        """Return the caller's principal, or abort the call with the rejection status.

        ``context.abort_with_status`` raises, so nothing returns after a rejection.
        """
        try:
            token = bearer_token(context.invocation_metadata())
            validation = await self.validator.validate(
                token, timeout=_remaining(context)
            )
            self.policy.authorize(method, validation.principal)
        except Exception as error:
            status = self._admission.status_for(method, error)
        else:
            return validation.principal
        await context.abort_with_status(status)
        raise AssertionError("grpc.aio abort_with_status() returned instead of raising")

    def _wrap(
        self, handler: grpc.RpcMethodHandler, method: str
    ) -> grpc.RpcMethodHandler:
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary_response(
                    handler.unary_unary, method, streaming_request=False
                ),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary_response(
                    handler.stream_unary, method, streaming_request=True
                ),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream_response(
                    handler.unary_stream, method, streaming_request=False
                ),
                request_deserializer=deserializer,
                response_serializer=serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._stream_response(
                handler.stream_stream, method, streaming_request=True
            ),
            request_deserializer=deserializer,
            response_serializer=serializer,
        )

    def _unary_response(
        self, behavior: Any, method: str, *, streaming_request: bool
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        is_async = _is_async(behavior)

        async def unary_response(
            request: Any, context: grpc.aio.ServicerContext
        ) -> Any:
            principal = await self.admit(method, context)
            token = set_principal(principal)
            try:
                if is_async:
                    return await behavior(request, context)
                if streaming_request:
                    request = _blocking_iterator(request, asyncio.get_running_loop())
                return await asyncio.to_thread(behavior, request, context)
            finally:
                reset_principal(token)

        return unary_response

    def _stream_response(
        self, behavior: Any, method: str, *, streaming_request: bool
    ) -> Any:
        if inspect.iscoroutinefunction(behavior):
            # A coroutine handler streams with context.write() and returns None.
            async def write_stream(
                request: Any, context: grpc.aio.ServicerContext
            ) -> None:
                principal = await self.admit(method, context)
                token = set_principal(principal)
                try:
                    await behavior(request, context)
                finally:
                    reset_principal(token)

            return write_stream

        async def yield_stream(
            request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            principal = await self.admit(method, context)
            responses: AsyncIterator[Any]
            if inspect.isasyncgenfunction(behavior):
                responses = behavior(request, context)
            else:
                if streaming_request:
                    request = _blocking_iterator(request, asyncio.get_running_loop())
                token = set_principal(principal)
                try:
                    blocking = await asyncio.to_thread(behavior, request, context)
                finally:
                    reset_principal(token)
                responses = _ThreadIterator(iter(blocking))
            async for item in _aiterate_with(principal, responses):
                yield item

        return yield_stream


__all__ = [
    "FAILED_CHECK_MESSAGE",
    "AsyncAuthInterceptor",
    "AuthInterceptor",
    "MethodPolicy",
    "validation_timeout",
]
