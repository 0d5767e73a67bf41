"""The Node.js example in clients/node, run against a real auth service and greeter.

The `node` fixture installs the example's npm packages with `npm ci` when
node_modules is missing or was installed from another package-lock.json.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "clients" / "node"
AUTHGRPC = str(Path(sys.executable).parent / "authgrpc")
PASSWORD = "correct-horse-battery"
NPM_CI_TIMEOUT = 240
START_TIMEOUT = 20
STOP_TIMEOUT = 20
CLIENT_TIMEOUT = 60
STREAM_COUNT = 3

# The session fixture's `npm ci` runs inside the first test's timeout.
pytestmark = pytest.mark.timeout(NPM_CI_TIMEOUT + 120)


def install_digest() -> str:
    """Return a digest of the files that decide what `npm ci` installs."""
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((NODE_DIR / name).read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def node() -> str:
    """Return the node executable, after installing clients/node's packages."""
    node_path = shutil.which("node")
    npm_path = shutil.which("npm")
    if node_path is None or npm_path is None:
        pytest.skip("node and npm are not on PATH; install Node.js 18 or newer")

    stamp = NODE_DIR / "node_modules" / ".authgrpc-install-digest"
    expected = install_digest()
    # Another pytest run on the same checkout may install at the same time,
    # and two `npm ci` runs in one folder delete each other's files.
    lock_name = hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:16]
    lock_path = Path(tempfile.gettempdir()) / f"authgrpc-npm-ci-{lock_name}.lock"
    with lock_path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not stamp.is_file() or stamp.read_text() != expected:
            result = subprocess.run(
                [npm_path, "ci", "--no-audit", "--no-fund", "--prefer-offline"],
                cwd=NODE_DIR,
                capture_output=True,
                text=True,
                timeout=NPM_CI_TIMEOUT,
            )
            assert result.returncode == 0, (
                f"npm ci in {NODE_DIR} failed with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
            stamp.write_text(expected)
    return node_path


class Service:
    """A gRPC server subprocess whose output goes to a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path):
        self.name = name
        self.log_path = logs / f"{name}.log"
        self.log = self.log_path.open("w")
        self.process = subprocess.Popen(
            command, env=env, stdout=self.log, stderr=subprocess.STDOUT
        )

    def log_text(self) -> str:
        return self.log_path.read_text()

    def wait_ready(self, address: str) -> None:
        """Wait until ``address`` accepts connections, or fail with the log."""
        deadline = time.monotonic() + START_TIMEOUT
        with grpc.insecure_channel(address) as channel:
            ready = grpc.channel_ready_future(channel)
            while self.process.poll() is None and time.monotonic() < deadline:
                try:
                    ready.result(timeout=0.2)
                    return
                except grpc.FutureTimeoutError:
                    continue
        self.stop()
        pytest.fail(
            f"{self.name} failed to start on {address} within {START_TIMEOUT} s, "
            f"exit code {self.process.returncode}, log:\n{self.log_text()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.log.close()


def service_env() -> dict[str, str]:
    """Return this process's environment without any AUTHGRPC_ setting."""
    return {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AUTHGRPC_")
    }


@pytest.fixture(scope="module")
def auth_address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start `authgrpc serve --dev` with in-memory sessions and user demo."""
    address = f"127.0.0.1:{free_port()}"
    env = {**service_env(), "AUTHGRPC_DEV_PASSWORD": PASSWORD}
    service = Service(
        "auth",
        [AUTHGRPC, "serve", "--dev", "--listen", address],
        env,
        tmp_path_factory.mktemp("node-client"),
    )
    try:
        service.wait_ready(address)
        yield address
    finally:
        service.stop()


@pytest.fixture(params=["sync", "aio"])
def greeter_address(
    request: pytest.FixtureRequest, auth_address: str, tmp_path: Path
) -> Iterator[str]:
    """Start the example greeter, validating through the auth service."""
    address = f"127.0.0.1:{free_port()}"
    command = [
        sys.executable,
        "-m",
        "authgrpc.example",
        "--listen",
        address,
        "--auth-target",
        auth_address,
    ]
    if request.param == "aio":
        command.append("--aio")
    service = Service(f"greeter-{request.param}", command, service_env(), tmp_path)
    try:
        service.wait_ready(address)
        yield address
    finally:
        service.stop()


def run_client(
    node: str, auth: str, greeter: str, password: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **service_env(),
        "AUTHGRPC_TARGET": auth,
        "GREETER_TARGET": greeter,
        "AUTHGRPC_USERNAME": "demo",
        "AUTHGRPC_PASSWORD": password,
    }
    return subprocess.run(
        [node, "example.js"],
        cwd=NODE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT,
    )


def test_full_flow(node: str, auth_address: str, greeter_address: str) -> None:
    result = run_client(node, auth_address, greeter_address, PASSWORD)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    lines = result.stdout.splitlines()

    assert result.returncode == 0, output
    assert lines[0].startswith("login ok: user demo, session "), output
    assert "ValidateSession ok: user demo" in result.stdout, output
    assert "SayHello with the login token: Hello, demo!" in lines, output
    for index in range(1, STREAM_COUNT + 1):
        assert f"StreamGreetings #{index}: Hello, demo!" in lines, output
    assert "StreamGreetings #4" not in result.stdout, output
    assert "Refresh ok: session " in result.stdout, output
    assert "SayHello with the refreshed token: Hello, demo!" in lines, output
    assert "Logout ok: session " in result.stdout, output
    assert (
        "SayHello after logout rejected as expected: UNAUTHENTICATED (SESSION_ENDED)"
        in result.stdout
    ), output
    assert (
        "StreamGreetings with the login token after logout rejected as expected: "
        "UNAUTHENTICATED (SESSION_ENDED)" in result.stdout
    ), output
    assert (
        "Refresh after logout rejected as expected: UNAUTHENTICATED (SESSION_ENDED)"
        in result.stdout
    ), output
    assert lines[-1] == "every step behaved as expected", output
    assert result.stderr == "", output


def test_wrong_password_fails(node: str, auth_address: str) -> None:
    # The greeter is never reached, so any loopback address will do.
    result = run_client(node, auth_address, f"127.0.0.1:{free_port()}", "wrong")
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"

    assert result.returncode == 1, output
    assert "login failed: UNAUTHENTICATED (INVALID_CREDENTIALS)" in result.stderr, (
        output
    )
    assert "every step behaved as expected" not in result.stdout, output


def test_missing_password_exit_code(node: str) -> None:
    result = run_client(node, "127.0.0.1:1", "127.0.0.1:1", "")

    assert result.returncode == 2, result.stderr
    assert "missing password" in result.stderr
    assert result.stdout == ""
