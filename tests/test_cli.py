"""The `authgrpc` command, run as a subprocess against a real Redis."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import pytest

from authgrpc.errors import error_info
from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from tests.conftest import free_port

AUTHGRPC = str(Path(sys.executable).parent / "authgrpc")
PASSWORD = "a long passphrase"


def run(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AUTHGRPC, *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture
def env(redis_url: str, prefix: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    key = tmp_path / "signing.pem"
    environment = {
        **os.environ,
        "AUTHGRPC_REDIS_URL": redis_url,
        "AUTHGRPC_REDIS_PREFIX": prefix,
        "AUTHGRPC_SIGNING_KEY": str(key),
    }
    environment.pop("AUTHGRPC_DEV_PASSWORD", None)
    yield environment
    import redis

    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter(match=f"{prefix}:*"):
        client.delete(name)


class Server:
    def __init__(self, env: dict[str, str], *extra: str):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = [
            AUTHGRPC,
            "serve",
            "--listen",
            self.address,
            "--grace-period",
            "2",
            *extra,
        ]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.wait_ready()

    def wait_ready(self) -> None:
        channel = grpc.insecure_channel(self.address)
        try:
            grpc.channel_ready_future(channel).result(timeout=20)
        finally:
            channel.close()

    def stop(self) -> tuple[int, str]:
        self.process.send_signal(signal.SIGTERM)
        _, stderr = self.process.communicate(timeout=20)
        return self.process.returncode, stderr


def login(address: str, username: str, password: str) -> auth_pb2.LoginResponse:
    with grpc.insecure_channel(address) as channel:
        return auth_pb2_grpc.AuthServiceStub(channel).Login(
            auth_pb2.LoginRequest(username=username, password=password), timeout=10
        )


def validate(address: str, token: str) -> auth_pb2.ValidateSessionResponse:
    with grpc.insecure_channel(address) as channel:
        return auth_pb2_grpc.AuthServiceStub(channel).ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=token), timeout=10
        )


def test_user_add_and_list(env: dict[str, str]) -> None:
    added = run(
        "user",
        "add",
        "Alice",
        "--password-stdin",
        "--role",
        "admin",
        env=env,
        stdin=PASSWORD + "\n",
    )
    listed = run("user", "list", env=env)

    assert added.returncode == 0, added.stderr
    assert "created user alice" in added.stdout
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.startswith("alice\t")
    assert "\tactive\tadmin" in listed.stdout


def test_user_add_twice_fails(env: dict[str, str]) -> None:
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)

    again = run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)

    assert again.returncode == 1
    assert "already exists" in again.stderr


def test_user_add_short_password_fails(env: dict[str, str]) -> None:
    result = run("user", "add", "alice", "--password-stdin", env=env, stdin="short\n")

    assert result.returncode == 1
    assert "at least 8 characters" in result.stderr
    assert "short" not in result.stderr.replace("at least", "")


def test_serve_refuses_without_key(env: dict[str, str]) -> None:
    without_key = {k: v for k, v in env.items() if k != "AUTHGRPC_SIGNING_KEY"}

    result = run("serve", env=without_key)

    assert result.returncode == 2
    assert "no signing key" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_without_redis(env: dict[str, str]) -> None:
    without_redis = {k: v for k, v in env.items() if k != "AUTHGRPC_REDIS_URL"}
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)

    result = run("serve", env=without_redis)

    assert result.returncode == 2
    assert "no session store" in result.stderr


def test_serve_refuses_short_hmac_secret(env: dict[str, str], tmp_path: Path) -> None:
    secret = tmp_path / "short.secret"
    secret.write_text("c2hvcnQ\n")

    result = run("serve", "--algorithm", "HS256", "--signing-key", str(secret), env=env)

    assert result.returncode == 2
    assert "at least 32" in result.stderr


def test_session_survives_server_restart(env: dict[str, str]) -> None:
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    first = Server(env)
    token = login(first.address, "alice", PASSWORD).access_token
    code, log = first.stop()

    second = Server(env)
    try:
        validated = validate(second.address, token)
    finally:
        second.stop()

    assert code == 0
    assert "server started" in log
    assert "server stopped" in log
    assert PASSWORD not in log
    assert token not in log
    assert validated.principal.username == "alice"


def test_disable_ends_sessions(env: dict[str, str]) -> None:
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    server = Server(env)
    try:
        token = login(server.address, "alice", PASSWORD).access_token
        disabled = run("user", "disable", "alice", env=env)
        with pytest.raises(grpc.RpcError) as ended:
            validate(server.address, token)
        with pytest.raises(grpc.RpcError) as refused:
            login(server.address, "alice", PASSWORD)
    finally:
        server.stop()

    assert disabled.returncode == 0
    assert "ended 1 session(s)" in disabled.stdout
    assert error_info(ended.value).reason == "SESSION_ENDED"
    assert error_info(refused.value).reason == "INVALID_CREDENTIALS"


def test_session_list_and_revoke(env: dict[str, str]) -> None:
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    server = Server(env)
    try:
        first = login(server.address, "alice", PASSWORD)
        second = login(server.address, "alice", PASSWORD)
        listed = run("session", "list", "alice", env=env)
        revoked = run("session", "revoke", "alice", first.session.session_id, env=env)
        missing = run("session", "revoke", "alice", first.session.session_id, env=env)
        with pytest.raises(grpc.RpcError) as ended:
            validate(server.address, first.access_token)
        still = validate(server.address, second.access_token)
        everything = run("session", "revoke", "alice", "--all", env=env)
    finally:
        server.stop()

    assert first.session.session_id in listed.stdout
    assert second.session.session_id in listed.stdout
    assert revoked.returncode == 0
    assert missing.returncode == 1
    assert error_info(ended.value).reason == "SESSION_ENDED"
    assert still.session.session_id == second.session.session_id
    assert "ended 1 session(s)" in everything.stdout


def test_passwd_changes_password(env: dict[str, str]) -> None:
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)

    changed = run(
        "user",
        "passwd",
        "alice",
        "--password-stdin",
        env=env,
        stdin="another long passphrase\n",
    )
    server = Server(env)
    try:
        with pytest.raises(grpc.RpcError) as old:
            login(server.address, "alice", PASSWORD)
        new = login(server.address, "alice", "another long passphrase")
    finally:
        server.stop()

    assert changed.returncode == 0
    assert error_info(old.value).reason == "INVALID_CREDENTIALS"
    assert new.session.username == "alice"


def test_keys_rotate_retire_and_jwks(env: dict[str, str], tmp_path: Path) -> None:
    directory = tmp_path / "keys"

    first = run("keys", "rotate", "--dir", str(directory), env=env)
    second = run("keys", "rotate", "--dir", str(directory), env=env)
    jwks = run("keys", "jwks", "--signing-key", str(directory), env=env)
    kids = [key["kid"] for key in json.loads(jwks.stdout)["keys"]]
    active = (directory / "active").read_text().strip()
    refuse_active = run(
        "keys", "retire", "--dir", str(directory), "--", active, env=env
    )
    old = next(kid for kid in kids if kid != active)
    retired = run("keys", "retire", "--dir", str(directory), "--", old, env=env)
    after = run("keys", "jwks", "--signing-key", str(directory), env=env)

    assert first.returncode == second.returncode == 0
    assert len(kids) == 2
    assert refuse_active.returncode == 2
    assert "active key" in refuse_active.stderr
    assert retired.returncode == 0
    assert [key["kid"] for key in json.loads(after.stdout)["keys"]] == [active]
    assert oct((directory / f"{active}.pem").stat().st_mode & 0o777) == "0o600"


def test_key_rotation_without_restart(env: dict[str, str], tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    run("keys", "rotate", "--dir", str(directory), env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    server = Server({**env, "AUTHGRPC_SIGNING_KEY": str(directory)})
    try:
        before = login(server.address, "alice", PASSWORD).access_token
        run("keys", "rotate", "--dir", str(directory), env=env)
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        after = login(server.address, "alice", PASSWORD).access_token
        old_still_valid = validate(server.address, before)
        new_valid = validate(server.address, after)
    finally:
        server.stop()

    assert _kid(before) != _kid(after)
    assert _kid(after) == (directory / "active").read_text().strip()
    assert old_still_valid.principal.username == "alice"
    assert new_valid.principal.username == "alice"


def _kid(token: str) -> str:
    import jwt

    return str(jwt.get_unverified_header(token)["kid"])


def test_inactive_rotation_then_activate(env: dict[str, str], tmp_path: Path) -> None:
    directory = tmp_path / "keys"
    run("keys", "rotate", "--dir", str(directory), env=env)
    first = (directory / "active").read_text().strip()

    added = run("keys", "rotate", "--dir", str(directory), "--inactive", env=env)
    still = (directory / "active").read_text().strip()
    jwks = json.loads(
        run("keys", "jwks", "--signing-key", str(directory), env=env).stdout
    )
    second = next(key["kid"] for key in jwks["keys"] if key["kid"] != first)
    activated = run("keys", "activate", "--dir", str(directory), "--", second, env=env)

    assert "it verifies only" in added.stdout
    assert still == first
    assert activated.returncode == 0, activated.stderr
    assert (directory / "active").read_text().strip() == second


def test_sigterm_with_open_watch_is_quiet(env: dict[str, str]) -> None:
    import threading

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    server = Server(env)
    channel = grpc.insecure_channel(server.address)
    stream = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
    reader = threading.Thread(target=lambda: list_quietly(stream), daemon=True)
    reader.start()
    time.sleep(0.5)

    code, log = server.stop()
    channel.close()

    assert code == 0
    assert "server stopped" in log
    assert "Traceback" not in log


def list_quietly(stream: object) -> None:
    with contextlib.suppress(grpc.RpcError):
        for _ in stream:  # type: ignore[attr-defined]
            pass


def test_unlock_clears_a_lockout(env: dict[str, str]) -> None:
    run("keys", "generate", "--out", env["AUTHGRPC_SIGNING_KEY"], env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    server = Server(env, "--login-max-failures", "2")
    try:
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                login(server.address, "alice", "a wrong passphrase")
        with pytest.raises(grpc.RpcError) as locked:
            login(server.address, "alice", PASSWORD)
        by_name = run("user", "unlock", "Alice", env=env)
        with pytest.raises(grpc.RpcError) as by_peer_still:
            login(server.address, "alice", PASSWORD)
        by_peer = run("user", "unlock", "--peer", "127.0.0.1", env=env)
        unlocked = login(server.address, "alice", PASSWORD)
        neither = run("user", "unlock", env=env)
    finally:
        server.stop()

    assert locked.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert by_name.returncode == 0
    assert "username alice" in by_name.stdout
    assert by_peer_still.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert by_peer.returncode == 0
    assert unlocked.session.session_id
    assert neither.returncode != 0
    assert "--peer" in neither.stderr


def test_empty_lists_say_so(env: dict[str, str]) -> None:
    users = run("user", "list", env=env)
    run("user", "add", "alice", "--password-stdin", env=env, stdin=PASSWORD)
    sessions = run("session", "list", "alice", env=env)

    assert (users.returncode, users.stdout, users.stderr.strip()) == (0, "", "no users")
    assert sessions.returncode == 0
    assert sessions.stdout == ""
    assert "alice has no live sessions" in sessions.stderr


def test_dev_mode_keeps_existing_demo_password(env: dict[str, str]) -> None:
    run("user", "add", "demo", "--password-stdin", env=env, stdin=PASSWORD)
    dev_env = {k: v for k, v in env.items() if k != "AUTHGRPC_SIGNING_KEY"}
    server = Server(dev_env, "--dev")
    try:
        logged_in = login(server.address, "demo", PASSWORD)
    finally:
        server.process.send_signal(signal.SIGTERM)
        stdout, stderr = server.process.communicate(timeout=20)

    assert logged_in.access_token
    assert "password: unchanged" in stdout, stdout + stderr


@pytest.mark.parametrize(
    ("database", "message"),
    [
        ("99", "Redis rejected the command: DB index is out of range"),
        ("abc", "the Redis URL's path must be a database number, not 'abc'"),
    ],
)
def test_bad_database_in_url(
    env: dict[str, str], redis_url: str, database: str, message: str
) -> None:
    parts = urlsplit(redis_url)
    url = f"{parts.scheme}://{parts.netloc}/{database}"

    result = run("user", "list", "--redis-url", url, env=env)

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
