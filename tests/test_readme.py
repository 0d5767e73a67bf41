"""Run the README's grpcurl walkthrough as printed against `authgrpc serve --dev`."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = ("127.0.0.1", 50051)
PASSWORD = "correct-horse-battery"
UNAUTHENTICATED_EXIT = 64 + 16  # grpcurl exits with 64 plus the gRPC status code


def walkthrough_commands(readme: Path = ROOT / "README.md") -> list[str]:
    """Return the lines of the shell block after the walkthrough mark in ``readme``."""
    text = readme.read_text()
    match = re.search(r"<!-- walkthrough -->\n```sh\n(.*?)```", text, re.DOTALL)
    assert match is not None, f"{readme} has no walkthrough block"
    return [line for line in match.group(1).splitlines() if line.strip()]


def wait_for_port(
    address: tuple[str, int], process: subprocess.Popen[str], timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited early with {process.returncode}")
        try:
            socket.create_connection(address, timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address} after {timeout} s")


@pytest.fixture
def dev_server() -> Iterator[subprocess.Popen[str]]:
    with socket.socket() as probe:
        if probe.connect_ex(ADDRESS) == 0:
            pytest.fail(
                f"{ADDRESS[0]}:{ADDRESS[1]} is in use; "
                "stop what listens there to run the walkthrough"
            )
    env = {**os.environ, "AUTHGRPC_DEV_PASSWORD": PASSWORD}
    env.pop("AUTHGRPC_REDIS_URL", None)
    command = [str(Path(sys.executable).parent / "authgrpc"), "serve", "--dev"]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_port(ADDRESS, process)
    yield process
    process.terminate()
    process.wait(15)


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough needs jq")
def test_walkthrough_runs_as_printed(dev_server: subprocess.Popen[str]) -> None:
    commands = walkthrough_commands()
    script = "\n".join(f'{line}\necho "__exit=$?"' for line in commands)

    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    exits = [
        int(code) for code in re.findall(r"^__exit=(\d+)$", result.stdout, re.MULTILINE)
    ]
    assert len(exits) == len(commands), result.stdout + result.stderr
    validate_lines = [i for i, line in enumerate(commands) if "ValidateSession" in line]
    expected = [0] * len(commands)
    expected[validate_lines[-1]] = UNAUTHENTICATED_EXIT
    assert exits == expected, result.stdout + result.stderr
    assert "authgrpc.v1.AuthService" in result.stdout
    assert '"username": "demo"' in result.stdout
    assert "SESSION_ENDED" in result.stderr
    assert '"status": "SERVING"' in result.stdout


GREETER = ("127.0.0.1", 50061)


@pytest.fixture
def greeter(dev_server: subprocess.Popen[str]) -> Iterator[subprocess.Popen[str]]:
    command = [
        sys.executable,
        "-m",
        "authgrpc.example",
        "--listen",
        f"{GREETER[0]}:{GREETER[1]}",
        "--auth-target",
        f"{ADDRESS[0]}:{ADDRESS[1]}",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    wait_for_port(GREETER, process)
    yield process
    process.terminate()
    process.wait(15)


@pytest.mark.skipif(shutil.which("jq") is None, reason="the walkthrough needs jq")
def test_grpcurl_client_runs_as_printed(greeter: subprocess.Popen[str]) -> None:
    commands = walkthrough_commands(ROOT / "clients" / "grpcurl" / "README.md")
    script = "\n".join(f'{line}\necho "__exit=$?"' for line in commands)

    result = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )

    exits = [
        int(code) for code in re.findall(r"^__exit=(\d+)$", result.stdout, re.MULTILINE)
    ]
    expected = [0, 0, 0, 0, UNAUTHENTICATED_EXIT, 0, UNAUTHENTICATED_EXIT]
    assert exits == expected, result.stdout + result.stderr
    assert "demo" in result.stdout
    assert result.stdout.count('"greeting"') == 4
    assert "Message: authorization metadata is missing" in result.stderr
    assert "Message: session has ended" in result.stderr


def test_python_client_example_runs(greeter: subprocess.Popen[str]) -> None:
    env = {**os.environ, "AUTHGRPC_PASSWORD": PASSWORD}
    example = ROOT / "clients" / "python" / "example.py"

    result = subprocess.run(
        [sys.executable, str(example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo" in result.stdout
    assert "SESSION_ENDED" in result.stdout + result.stderr
