"""Run the example greeter behind an auth interceptor.

Remote validation, through the auth service's ValidateSession::

    python -m authgrpc.example --listen 127.0.0.1:50061 --auth-target 127.0.0.1:50051

Local validation, against the auth service's Redis, with its public keys from
a JWKS file, a key file or directory, or else from its GetJwks method::

    python -m authgrpc.example --redis-url redis://127.0.0.1:6379/0 --keys jwks.json

``--aio`` serves with ``grpc.aio`` instead of the threaded server.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc

from authgrpc.errors import AuthError
from authgrpc.example.service import build_async_server, build_server
from authgrpc.validators import (
    AsyncLocalValidator,
    AsyncRemoteValidator,
    GrpcJwksFetcher,
    LocalValidator,
    RemoteValidator,
)

log = logging.getLogger("authgrpc.example")

DEFAULT_AUTH_TARGET = "127.0.0.1:50051"
GRACE_SECONDS = 5.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m authgrpc.example",
        description="Serve the example greeter to callers with a valid token.",
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:50061",
        help="HOST:PORT to serve on (default: %(default)s)",
    )
    parser.add_argument(
        "--auth-target",
        help=f"HOST:PORT of the auth service (default: {DEFAULT_AUTH_TARGET}); "
        "validates through its ValidateSession unless --redis-url is given",
    )
    parser.add_argument(
        "--auth-ca",
        type=Path,
        help="PEM file of the CA that signed the auth service's TLS certificate; "
        "without it the auth service is reached in plaintext",
    )

    parser.add_argument(
        "--redis-url",
        help="validate locally against the auth service's Redis at this URL",
    )
    parser.add_argument(
        "--keys",
        type=Path,
        help="with --redis-url: a JWKS file, key file or key directory that verifies "
        "tokens; without it the keys come from the auth service's GetJwks",
    )
    parser.add_argument("--redis-prefix", default="authgrpc", help="Redis key prefix")
    parser.add_argument("--issuer", default="authgrpc", help="expected token issuer")
    parser.add_argument(
        "--audience", default="authgrpc", help="expected token audience"
    )
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=30 * 60,
        help="the auth service's idle timeout in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--touch-interval",
        type=float,
        default=1.0,
        help="the auth service's touch interval, in seconds (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=1.0,
        help="seconds to wait for the auth service or Redis (default: %(default)s)",
    )

    parser.add_argument(
        "--require-role",
        action="append",
        default=[],
        metavar="ROLE",
        help="a role every greeter method requires; repeat for several",
    )

    parser.add_argument("--aio", action="store_true", help="serve with grpc.aio")

    args = parser.parse_args(argv)
    if args.keys is not None and args.redis_url is None:
        parser.error("--keys needs --redis-url")
    return args


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if args.auth_ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=args.auth_ca.read_bytes())


def _local_options(args: argparse.Namespace) -> dict[str, Any]:
    fetcher = None
    if args.keys is None or args.auth_target is not None:
        fetcher = GrpcJwksFetcher(
            args.auth_target or DEFAULT_AUTH_TARGET,
            credentials=_credentials(args),
            timeout=args.timeout,
        )
    return {
        "issuer": args.issuer,
        "audience": args.audience,
        "redis_url": args.redis_url,
        "prefix": args.redis_prefix,
        "idle_timeout": args.idle_timeout,
        "touch_interval": args.touch_interval,
        "redis_timeout": args.timeout,
        "jwks_fetcher": fetcher,
    }


def _redacted(url: str) -> str:
    """Return ``url`` without its user name and password, for logs."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


def _required_roles(args: argparse.Namespace) -> dict[str, list[str]] | None:
    if not args.require_role:
        return None
    return {"/authgrpc.example.v1.GreeterService/*": args.require_role}


def serve(args: argparse.Namespace) -> None:
    """Serve with ``grpc.server`` until SIGINT or SIGTERM."""
    validator: LocalValidator | RemoteValidator
    if args.redis_url is not None:
        validator = LocalValidator(args.keys, **_local_options(args))
        mode = f"local validation against {_redacted(args.redis_url)}"
    else:
        target = args.auth_target or DEFAULT_AUTH_TARGET
        validator = RemoteValidator(
            target, credentials=_credentials(args), timeout=args.timeout
        )
        mode = f"remote validation at {target}"
    server, port = build_server(
        validator, args.listen, required_roles=_required_roles(args)
    )
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    log.info("greeter serving on port %d with %s", port, mode)
    stop.wait()
    log.info("greeter stopping, grace %.0f s", GRACE_SECONDS)
    server.stop(GRACE_SECONDS).wait()
    validator.close()
    log.info("greeter stopped")


async def serve_async(args: argparse.Namespace) -> None:
    """Serve with ``grpc.aio.server`` until SIGINT or SIGTERM."""
    validator: AsyncLocalValidator | AsyncRemoteValidator
    if args.redis_url is not None:
        validator = AsyncLocalValidator.from_url(args.keys, **_local_options(args))
        mode = f"local validation against {_redacted(args.redis_url)}"
    else:
        target = args.auth_target or DEFAULT_AUTH_TARGET
        validator = AsyncRemoteValidator(
            target, credentials=_credentials(args), timeout=args.timeout
        )
        mode = f"remote validation at {target}"
    server, port = await build_async_server(
        validator, args.listen, required_roles=_required_roles(args)
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await server.start()
    log.info("greeter serving on port %d with grpc.aio and %s", port, mode)
    await stop.wait()
    log.info("greeter stopping, grace %.0f s", GRACE_SECONDS)
    await server.stop(GRACE_SECONDS)
    await validator.close()
    log.info("greeter stopped")


def main(argv: list[str] | None = None) -> int:
    """Run the example server; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.aio:
            asyncio.run(serve_async(args))
        else:
            serve(args)
    except AuthError as error:
        log.error("cannot start the greeter: %s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
