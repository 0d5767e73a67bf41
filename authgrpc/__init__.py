"""authgrpc: a gRPC authentication service and the library that trusts it.

Services that accept authgrpc tokens install an interceptor with a
validator::

    validator = authgrpc.RemoteValidator("auth.internal:50051")
    server = grpc.server(pool, interceptors=[authgrpc.AuthInterceptor(validator)])

and read the caller in their handlers with :func:`current_principal`.
"""

from authgrpc.cache import InvalidationListener, ValidationCache
from authgrpc.client import AsyncAuthClient, AuthClient, AuthMetadataPlugin
from authgrpc.errors import (
    AuthError,
    CallerError,
    ConfigurationError,
    InvalidArgument,
    PermissionDenied,
    Reason,
    StoreUnavailable,
    Throttled,
    Unauthenticated,
    error_info,
)
from authgrpc.interceptor import AsyncAuthInterceptor, AuthInterceptor
from authgrpc.principal import NoPrincipalError, Principal, current_principal
from authgrpc.validators import (
    AsyncLocalValidator,
    AsyncRemoteValidator,
    GrpcJwksFetcher,
    LocalValidator,
    RemoteValidator,
    Validation,
)

__all__ = [
    "AsyncAuthClient",
    "AsyncAuthInterceptor",
    "AsyncLocalValidator",
    "AsyncRemoteValidator",
    "AuthClient",
    "AuthError",
    "AuthInterceptor",
    "AuthMetadataPlugin",
    "CallerError",
    "ConfigurationError",
    "GrpcJwksFetcher",
    "InvalidArgument",
    "InvalidationListener",
    "LocalValidator",
    "NoPrincipalError",
    "PermissionDenied",
    "Principal",
    "Reason",
    "RemoteValidator",
    "StoreUnavailable",
    "Throttled",
    "Unauthenticated",
    "Validation",
    "ValidationCache",
    "current_principal",
    "error_info",
]
