"""The ``authgrpc`` command: run the server and manage users, sessions and keys.

Every option of ``serve`` and the store options of the other commands can
also be set by an environment variable: ``--redis-url`` is
``AUTHGRPC_REDIS_URL``, and so on. Flags win over variables.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from authgrpc.authenticator import peer_throttle_key, username_throttle_key
from authgrpc.config import Settings
from authgrpc.errors import AuthError, ConfigurationError, InvalidArgument
from authgrpc.keys import (
    ACTIVE_FILE,
    ALGORITHMS,
    DEFAULT_ALGORITHM,
    activate_key,
    generate_key_file,
    load_signing_keys,
    retire_key,
    rotate_key_directory,
)
from authgrpc.passwords import PasswordHasher, check_new_password, normalize_username
from authgrpc.store import SessionStore, ThrottlePolicy, UsernameTaken

log = logging.getLogger("authgrpc.cli")
DEV_USERNAME = "demo"


class CommandError(Exception):
    """A command failed for a reason the user can fix; printed without a traceback."""


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"AUTHGRPC_{name.upper().replace('-', '_')}", default)


def _option(
    parser: argparse.ArgumentParser,
    name: str,
    help_text: str,
    *,
    kind: Any = str,
    default: Any = None,
) -> None:
    env_value = _env(name)
    value = kind(env_value) if env_value is not None else default
    parser.add_argument(
        f"--{name}",
        type=kind,
        default=value,
        help=f"{help_text} (env AUTHGRPC_{name.upper().replace('-', '_')})",
    )


def _add_store_options(parser: argparse.ArgumentParser) -> None:
    _option(
        parser,
        "redis-url",
        "Redis URL: redis://, rediss://, redis+cluster:// or redis+sentinel://",
    )
    _option(
        parser,
        "redis-prefix",
        "prefix of every Redis key (default authgrpc; authgrpc-dev with serve --dev)",
    )
    _option(
        parser,
        "redis-timeout",
        "seconds to wait for Redis to connect or reply",
        kind=float,
        default=1.0,
    )


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="authgrpc", description="A gRPC authentication service."
    )
    parser.add_argument(
        "--log-level",
        default=_env("log-level", "INFO"),
        help="logging level (env AUTHGRPC_LOG_LEVEL)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the auth server")
    serve.add_argument(
        "--dev",
        action="store_true",
        help="development mode: no setup, in-memory store unless a Redis URL is set",
    )
    _option(serve, "listen", "HOST:PORT to listen on", default="127.0.0.1:50051")
    _add_store_options(serve)
    _option(
        serve,
        "signing-key",
        "PEM key file, HS256 secret file, or key directory",
        kind=Path,
    )
    _option(
        serve,
        "algorithm",
        f"signing algorithm: {', '.join(ALGORITHMS)}",
        default=DEFAULT_ALGORITHM,
    )
    _option(
        serve,
        "issuer",
        "the iss claim of issued tokens, required on verification",
        default="authgrpc",
    )
    _option(
        serve,
        "audience",
        "the aud claim of issued tokens, required on verification",
        default="authgrpc",
    )
    _option(
        serve,
        "access-token-ttl",
        "access token lifetime in seconds",
        kind=int,
        default=300,
    )
    _option(
        serve,
        "idle-timeout",
        "seconds a session lives without use",
        kind=int,
        default=1800,
    )
    _option(
        serve,
        "absolute-timeout",
        "seconds a session lives at most",
        kind=int,
        default=43200,
    )
    _option(
        serve,
        "touch-interval",
        "seconds between writes that extend an active session",
        kind=float,
        default=1.0,
    )
    _option(
        serve,
        "refresh-grace",
        "seconds in which a refresh may be retried with the same token",
        kind=float,
        default=10.0,
    )
    _option(
        serve,
        "max-sessions-per-user",
        "live sessions per user before the oldest ends (0: no limit)",
        kind=int,
        default=0,
    )
    _option(
        serve,
        "leeway",
        "seconds of clock skew allowed on exp, iat and nbf",
        kind=float,
        default=30.0,
    )
    _option(
        serve,
        "login-max-failures",
        "failed logins per username or peer before a lockout",
        kind=int,
        default=5,
    )
    _option(
        serve,
        "login-window",
        "seconds over which failed logins are counted",
        kind=int,
        default=900,
    )
    _option(
        serve,
        "login-lockout",
        "seconds of the first lockout; each further one doubles",
        kind=int,
        default=60,
    )
    _option(
        serve,
        "trusted-proxies",
        "comma-separated proxy addresses or networks whose x-forwarded-for is believed",
        default="",
    )
    _option(serve, "tls-cert", "PEM server certificate chain; enables TLS", kind=Path)
    _option(serve, "tls-key", "PEM private key of the server certificate", kind=Path)
    _option(
        serve,
        "tls-client-ca",
        "PEM CA bundle; when set, clients must present a certificate it signed",
        kind=Path,
    )
    _option(
        serve,
        "workers",
        "server processes sharing the port (above 1 needs --redis-url)",
        kind=int,
        default=1,
    )
    _option(
        serve,
        "grace-period",
        "seconds to finish in-flight calls on shutdown",
        kind=float,
        default=10.0,
    )
    _option(
        serve,
        "key-reload-interval",
        "seconds between checks of the key files for a rotation (0: only on SIGHUP)",
        kind=float,
        default=60.0,
    )
    _option(
        serve,
        "metrics-listen",
        "HOST:PORT for Prometheus metrics over HTTP (off when unset)",
    )
    _option(
        serve,
        "validation-cache",
        "on or off: keep validated sessions in memory; a session ended through "
        "another replica may then be accepted for up to 0.25 s more",
        default="off",
    )
    serve.add_argument(
        "--refuse-evicting-redis",
        action="store_true",
        default=_env("refuse-evicting-redis", "") in ("1", "true", "yes"),
        help="refuse to start when Redis may evict keys "
        "(env AUTHGRPC_REFUSE_EVICTING_REDIS)",
    )

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", required=True
    )
    add = user.add_parser("add", help="create a user")
    add.add_argument("name")
    add.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line of standard input",
    )
    add.add_argument(
        "--role",
        action="append",
        default=[],
        help="a role to grant; repeat for several",
    )
    passwd = user.add_parser(
        "passwd", help="set a user's password and end their sessions"
    )
    passwd.add_argument("name")
    passwd.add_argument(
        "--password-stdin",
        action="store_true",
        help="read the password as one line of standard input",
    )
    for action, text in (
        ("disable", "disable a user and end their sessions"),
        ("enable", "enable a disabled user"),
    ):
        user.add_parser(action, help=text).add_argument("name")
    roles = user.add_parser("roles", help="replace a user's roles")
    roles.add_argument("name")
    roles.add_argument("roles", nargs="*")
    user.add_parser("list", help="list users")
    unlock = user.add_parser(
        "unlock", help="clear the failed logins and lockout of a username or peer"
    )
    unlock.add_argument("name", nargs="?", help="the username to unlock")
    unlock.add_argument(
        "--peer",
        metavar="ADDRESS",
        help="a peer address to unlock, as the `login throttled` log line shows it",
    )
    for sub in user.choices.values():
        _add_store_options(sub)

    session = commands.add_parser(
        "session", help="manage a user's sessions"
    ).add_subparsers(dest="action", required=True)
    session_list = session.add_parser("list", help="list a user's live sessions")
    session_list.add_argument("name")
    revoke = session.add_parser("revoke", help="end one or all of a user's sessions")
    revoke.add_argument("name")
    target = revoke.add_mutually_exclusive_group(required=True)
    target.add_argument("session_id", nargs="?")
    target.add_argument(
        "--all", action="store_true", help="end every session of the user"
    )
    for sub in session.choices.values():
        _add_store_options(sub)

    keys = commands.add_parser("keys", help="manage signing keys").add_subparsers(
        dest="action", required=True
    )
    generate = keys.add_parser("generate", help="write a new private key file")
    generate.add_argument(
        "--out", type=Path, required=True, help="path of the new key file (mode 0600)"
    )
    rotate = keys.add_parser("rotate", help="add a new active key to a key directory")
    rotate.add_argument("--dir", type=Path, required=True, help="the key directory")
    rotate.add_argument(
        "--inactive",
        action="store_true",
        help="add the key for verification only; `keys activate` makes it sign later",
    )
    activate = keys.add_parser("activate", help="make a key of a key directory sign")
    activate.add_argument("--dir", type=Path, required=True, help="the key directory")
    activate.add_argument(
        "kid",
        help="the kid to activate; put -- before it, since a kid may start with -",
    )
    retire = keys.add_parser(
        "retire", help="delete a key that no longer signs from a key directory"
    )
    retire.add_argument("--dir", type=Path, required=True, help="the key directory")
    retire.add_argument(
        "kid", help="the kid to delete; put -- before it, since a kid may start with -"
    )
    jwks = keys.add_parser("jwks", help="print the public keys as a JWKS document")
    jwks.add_argument(
        "--signing-key",
        type=Path,
        default=_env("signing-key"),
        help="key file or directory (env AUTHGRPC_SIGNING_KEY)",
    )
    for sub in (generate, rotate, jwks):
        sub.add_argument(
            "--algorithm",
            default=_env("algorithm", DEFAULT_ALGORITHM),
            choices=ALGORITHMS,
            help="signing algorithm",
        )
    retire.set_defaults(algorithm=DEFAULT_ALGORITHM)
    activate.set_defaults(algorithm=DEFAULT_ALGORITHM)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return its exit status.

    The status is 0 on success, 1 when the command failed, and 2 for bad
    usage or configuration.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if not isinstance(logging.getLevelName(args.log_level.upper()), int):
        parser.error(
            f"--log-level must be DEBUG, INFO, WARNING or ERROR, not {args.log_level!r}"
        )
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "keys":
            return _keys(args)
        handler = {"user": _user, "session": _session}[args.command]
        return asyncio.run(_with_store(args, handler))
    except ConfigurationError as error:
        print(f"authgrpc: error: {error.message}", file=sys.stderr)
        return 2
    except (CommandError, AuthError) as error:
        print(f"authgrpc: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def settings_from(args: argparse.Namespace) -> Settings:
    """Build validated Settings from parsed ``serve`` arguments."""
    proxies = tuple(
        p.strip() for p in (args.trusted_proxies or "").split(",") if p.strip()
    )
    return Settings(
        listen=args.listen,
        redis_url=args.redis_url or None,
        redis_prefix=args.redis_prefix or ("authgrpc-dev" if args.dev else "authgrpc"),
        redis_timeout=args.redis_timeout,
        signing_key=args.signing_key,
        algorithm=args.algorithm,
        issuer=args.issuer,
        audience=args.audience,
        access_token_ttl=args.access_token_ttl,
        idle_timeout=args.idle_timeout,
        absolute_timeout=args.absolute_timeout,
        touch_interval=args.touch_interval,
        refresh_grace=args.refresh_grace,
        max_sessions_per_user=args.max_sessions_per_user,
        leeway=args.leeway,
        throttle=ThrottlePolicy(
            max_failures=args.login_max_failures,
            window_ms=args.login_window * 1000,
            lockout_ms=args.login_lockout * 1000,
        ),
        trusted_proxies=proxies,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_client_ca=args.tls_client_ca,
        grace_period=args.grace_period,
        key_reload_interval=args.key_reload_interval,
        metrics_listen=args.metrics_listen,
        refuse_evicting_redis=args.refuse_evicting_redis,
        validation_cache=_on_off("--validation-cache", args.validation_cache),
        dev=args.dev,
    )


def _on_off(option: str, value: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise ConfigurationError(f"{option} must be on or off, not {value!r}")
    return value.lower() == "on"


def _serve(args: argparse.Namespace) -> int:
    from authgrpc.server import AuthServer, serve

    settings = settings_from(args)
    if args.workers < 1:
        raise ConfigurationError(f"--workers must be at least 1, not {args.workers}")
    if args.workers > 1:
        from authgrpc.workers import Supervisor

        return Supervisor(settings, args.workers, args.log_level.upper()).run()

    async def before_start(running: AuthServer) -> None:
        if settings.dev:
            await _create_dev_user(running)

    asyncio.run(serve(settings, before_start=before_start))
    return 0


async def _create_dev_user(running: Any) -> None:
    """Create the ``demo`` user unless it exists, and print how to use it.

    An existing ``demo`` keeps its password: in a Redis that contains real users
    (a ``--redis-prefix`` of theirs), resetting it would take over an account.
    """
    password = os.environ.get("AUTHGRPC_DEV_PASSWORD") or secrets.token_urlsafe(12)
    store: SessionStore = running.store
    hasher: PasswordHasher = running.authenticator.hasher
    password_line = password
    if await store.get_user_by_name(DEV_USERNAME) is None:
        await store.create_user(DEV_USERNAME, await hasher.hash(password), ("admin",))
    else:
        password = "<its password>"
        password_line = (
            "unchanged, since the user already existed in this store "
            f"(`authgrpc user passwd {DEV_USERNAME}` sets one)"
        )
    address = running.address
    login = json.dumps({"username": DEV_USERNAME, "password": password})
    store_kind = "Redis" if running.settings.redis_url else "in-memory"
    service = "authgrpc.v1.AuthService"
    validate_body = '{\\"access_token\\": \\"$TOKEN\\"}'
    lines = [
        "",
        "authgrpc dev mode, NOT FOR PRODUCTION:",
        f"  ephemeral signing key, {store_kind} sessions",
        f"  user:     {DEV_USERNAME}",
        f"  password: {password_line}",
        "",
        "Try it with grpcurl:",
        f"  grpcurl -plaintext {address} list",
        f"  grpcurl -plaintext -d '{login}' {address} {service}/Login",
        "  TOKEN=<access_token from the Login response>",
        f'  grpcurl -plaintext -d "{validate_body}" {address} '
        f"{service}/ValidateSession",
        '  grpcurl -plaintext -H "authorization: Bearer $TOKEN" '
        f"{address} {service}/Logout",
        "",
    ]
    print("\n".join(lines), flush=True)


def _keys(args: argparse.Namespace) -> int:
    if args.action == "generate":
        kid = generate_key_file(args.out, args.algorithm)
        print(f"wrote {args.algorithm} key {kid} to {args.out}")
    elif args.action == "rotate":
        kid = rotate_key_directory(args.dir, args.algorithm, activate=not args.inactive)
        active = (args.dir / ACTIVE_FILE).read_text().strip() == kid
        effect = "it signs new tokens from now on" if active else "it verifies only"
        print(f"added {args.algorithm} key {kid} to {args.dir}; {effect}")
    elif args.action == "activate":
        activate_key(args.dir, args.kid)
        print(f"key {args.kid} of {args.dir} signs new tokens from now on")
    elif args.action == "retire":
        path = retire_key(args.dir, args.kid)
        print(f"deleted {path}; tokens signed by {args.kid} no longer verify")
    else:
        if args.signing_key is None:
            raise ConfigurationError(
                "pass --signing-key PATH (or set AUTHGRPC_SIGNING_KEY)"
            )
        keys = load_signing_keys(Path(args.signing_key), args.algorithm)
        print(json.dumps(keys.jwks(), indent=2, sort_keys=True))
    return 0


async def _with_store(
    args: argparse.Namespace,
    handler: Callable[[argparse.Namespace, SessionStore], Awaitable[int]],
) -> int:
    from authgrpc.redis_store import RedisStore

    if not args.redis_url:
        raise ConfigurationError(
            "pass --redis-url URL (or set AUTHGRPC_REDIS_URL) "
            "to reach the session store"
        )
    import redis

    store = RedisStore.from_url(
        args.redis_url,
        prefix=args.redis_prefix or "authgrpc",
        timeout=args.redis_timeout,
    )
    try:
        return await handler(args, store)
    except redis.exceptions.ResponseError as error:
        # A reachable Redis that rejects the connection's set-up, such as a
        # database index out of range.
        raise ConfigurationError(f"Redis rejected the command: {error}") from None
    finally:
        await store.close()


def _read_password(from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            raise CommandError(
                "no terminal to prompt for the password on; use --password-stdin"
            )
        try:
            password = getpass.getpass("Password: ")
            repeated = getpass.getpass("Repeat password: ")
        except EOFError:
            raise CommandError("no password given") from None
        if repeated != password:
            raise CommandError("the passwords do not match")
    try:
        check_new_password(password)
    except InvalidArgument as error:
        raise CommandError(error.message) from None
    return password


async def _find_user(store: SessionStore, raw_name: str) -> Any:
    name = _normalized(raw_name)
    user = await store.get_user_by_name(name)
    if user is None:
        raise CommandError(f"no user named {name!r}")
    return user


def _normalized(raw_name: str) -> str:
    try:
        return normalize_username(raw_name)
    except InvalidArgument as error:
        raise CommandError(error.message) from None


async def _user(args: argparse.Namespace, store: SessionStore) -> int:
    hasher = PasswordHasher(workers=1)
    try:
        if args.action == "add":
            name = _normalized(args.name)
            password_hash = hasher.hash_sync(_read_password(args.password_stdin))
            try:
                user = await store.create_user(name, password_hash, tuple(args.role))
            except UsernameTaken:
                raise CommandError(
                    f"user {name!r} already exists; "
                    "use `authgrpc user passwd` to change the password"
                ) from None
            print(f"created user {user.username} ({user.user_id})")
        elif args.action == "passwd":
            user = await _find_user(store, args.name)
            ended = await store.set_password_hash(
                user.user_id, hasher.hash_sync(_read_password(args.password_stdin))
            )
            print(f"changed the password of {user.username}; ended {ended} session(s)")
        elif args.action == "disable":
            user = await _find_user(store, args.name)
            ended = await store.set_disabled(user.user_id, True)
            print(f"disabled {user.username}; ended {ended} session(s)")
        elif args.action == "enable":
            user = await _find_user(store, args.name)
            await store.set_disabled(user.user_id, False)
            print(f"enabled {user.username}")
        elif args.action == "unlock":
            if args.name is None and args.peer is None:
                raise CommandError("name a username, or a peer address with --peer")
            if args.name is not None:
                name = _normalized(args.name)
                if await store.throttle_reset(username_throttle_key(name)):
                    print(f"cleared the failed logins of username {name}")
                else:
                    print(
                        f"no failed logins recorded for username {name}; a lockout "
                        "by peer needs --peer ADDRESS, as the `login throttled` "
                        "log line shows it",
                        file=sys.stderr,
                    )
            if args.peer is not None:
                if await store.throttle_reset(peer_throttle_key(args.peer)):
                    print(f"cleared the failed logins of peer {args.peer}")
                else:
                    print(
                        f"no failed logins recorded for peer {args.peer}; give the "
                        "address without a port, as the `login throttled` log "
                        "line shows it",
                        file=sys.stderr,
                    )
        elif args.action == "roles":
            user = await _find_user(store, args.name)
            await store.set_roles(user.user_id, tuple(args.roles))
            roles = ", ".join(args.roles) or "(none)"
            print(f"set the roles of {user.username} to {roles}")
        else:
            users = await store.list_users()
            if not users:
                print("no users", file=sys.stderr)
            for user in users:
                state = "disabled" if user.disabled else "active"
                print(
                    f"{user.username}\t{user.user_id}\t{state}\t{','.join(user.roles)}"
                )
    finally:
        hasher.close()
    return 0


async def _session(args: argparse.Namespace, store: SessionStore) -> int:
    user = await _find_user(store, args.name)
    if args.action == "list":
        records = await store.list_sessions(user.user_id)
        if not records:
            print(f"{user.username} has no live sessions", file=sys.stderr)
        for record in records:
            columns = [
                record.session_id,
                f"created {_iso(record.created_ms)}",
                f"last seen {_iso(record.last_seen_ms)}",
                f"peer {record.peer or '-'}",
                f"agent {record.user_agent or '-'}",
            ]
            print("\t".join(columns))
    elif args.all:
        ended = await store.end_all_sessions(user.user_id)
        print(f"ended {ended} session(s) of {user.username}")
    else:
        ended = await store.end_session(user.user_id, args.session_id)
        if not ended:
            raise CommandError(
                f"{user.username} has no live session {args.session_id!r}"
            )
        print(f"ended session {args.session_id} of {user.username}")
    return 0


def _iso(milliseconds: int) -> str:
    return datetime.fromtimestamp(milliseconds / 1000, UTC).isoformat(
        timespec="seconds"
    )


if __name__ == "__main__":
    sys.exit(main())
