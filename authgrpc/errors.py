"""Exceptions, machine-readable reasons, and their mapping to gRPC statuses.

Every exception the package raises on purpose derives from :class:`AuthError`::

    AuthError
    ├── CallerError            the caller's token or input is at fault
    │   ├── InvalidArgument        INVALID_ARGUMENT
    │   ├── Unauthenticated        UNAUTHENTICATED
    │   ├── PermissionDenied       PERMISSION_DENIED
    │   └── Throttled              RESOURCE_EXHAUSTED, with RetryInfo
    ├── StoreUnavailable       UNAVAILABLE: Redis or the auth service failed
    └── ConfigurationError     a setting or key file is invalid (never sent)

:func:`to_status` is the one place where an error becomes a ``grpc.Status``.
Each status carries a ``google.rpc.ErrorInfo`` whose ``reason`` is a
:class:`Reason` value, so that callers can branch on it without parsing the
message.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping

import grpc
from google.protobuf import duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "authgrpc"


class Reason(enum.StrEnum):
    """The ``ErrorInfo.reason`` values, documented in ``auth.proto``."""

    TOKEN_MISSING = "TOKEN_MISSING"
    TOKEN_MALFORMED = "TOKEN_MALFORMED"
    TOKEN_BAD_SIGNATURE = "TOKEN_BAD_SIGNATURE"
    TOKEN_EXPIRED = "TOKEN_EXPIRED"
    TOKEN_NOT_YET_VALID = "TOKEN_NOT_YET_VALID"
    TOKEN_CLAIMS_INVALID = "TOKEN_CLAIMS_INVALID"
    SESSION_ENDED = "SESSION_ENDED"
    REFRESH_TOKEN_INVALID = "REFRESH_TOKEN_INVALID"
    REFRESH_TOKEN_REUSED = "REFRESH_TOKEN_REUSED"
    INVALID_CREDENTIALS = "INVALID_CREDENTIALS"
    LOGIN_THROTTLED = "LOGIN_THROTTLED"
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"


class AuthError(Exception):
    """Root of every exception that authgrpc raises on purpose."""

    code = grpc.StatusCode.INTERNAL
    reason = Reason.STORE_UNAVAILABLE

    def __init__(self, message: str, *, metadata: Mapping[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class CallerError(AuthError):
    """The request or the credential it carries is at fault."""


class InvalidArgument(CallerError):
    """A request field is missing, empty or too large."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = Reason.INVALID_ARGUMENT

    def __init__(self, field: str, message: str):
        super().__init__(message, metadata={"field": field})
        self.field = field


class Unauthenticated(CallerError):
    """The credential is missing, invalid, expired or its session has ended."""

    code = grpc.StatusCode.UNAUTHENTICATED

    def __init__(self, reason: Reason, message: str):
        super().__init__(message)
        self.reason = reason


class PermissionDenied(CallerError):
    """The caller is authenticated but lacks a required role."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = Reason.PERMISSION_DENIED


class Throttled(CallerError):
    """Too many failed logins; the caller must wait ``retry_after`` seconds."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = Reason.LOGIN_THROTTLED

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class StoreUnavailable(AuthError):
    """The session store or the auth service did not respond in time."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = Reason.STORE_UNAVAILABLE


class ConfigurationError(AuthError):
    """A setting or key file is invalid. Raised at start-up, never sent."""


def to_status(error: AuthError) -> grpc.Status:
    """Build the gRPC status for ``error``: ErrorInfo, and RetryInfo if throttled."""
    info = error_details_pb2.ErrorInfo(
        reason=error.reason.value, domain=ERROR_DOMAIN, metadata=error.metadata
    )
    details = [info]
    if isinstance(error, Throttled):
        retry = error_details_pb2.RetryInfo(
            retry_delay=duration_pb2.Duration(
                seconds=max(1, math.ceil(error.retry_after))
            )
        )
        details.append(retry)
    status = status_pb2.Status(code=_CODES[error.code], message=error.message)
    for detail in details:
        status.details.add().Pack(detail)
    return rpc_status.to_status(status)


def error_info(
    call: grpc.RpcError | grpc.aio.AioRpcError,
) -> error_details_pb2.ErrorInfo | None:
    """Return the ErrorInfo of a failed call, or None if it carries none."""
    status = rpc_status.from_call(call)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_status(code: grpc.StatusCode, message: str, reason: str | None) -> AuthError:
    """Rebuild the AuthError that a remote auth service reported."""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        try:
            parsed = Reason(reason) if reason else Reason.TOKEN_MALFORMED
        except ValueError:
            parsed = Reason.TOKEN_MALFORMED
        return Unauthenticated(parsed, message)
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDenied(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return Unauthenticated(Reason.TOKEN_MALFORMED, message)
    return StoreUnavailable(f"auth service call failed: {code.name}")


_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT: code_pb2.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED: code_pb2.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED: code_pb2.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: code_pb2.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAVAILABLE: code_pb2.UNAVAILABLE,
    grpc.StatusCode.INTERNAL: code_pb2.INTERNAL,
}
