"""CPU per session check: redis-py's asyncio client against ScriptConnection.

Runs VALIDATE_SESSION against a private redis-server with 32 checks in
flight, the way one auth-server process sends them under load, and prints
the client's CPU time per call for each client and their ratio. Run it from
the repository root: ``.venv/bin/python benchmarks/redis_client.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from sessions import RedisProcess

from authgrpc.config import Settings
from authgrpc.redis_store import RedisStore, connect
from authgrpc.resp import ScriptConnection
from authgrpc.store import NewSession

CONCURRENCY = 32


async def cpu_per_check(store: RedisStore, calls: int) -> float:
    """Return the CPU microseconds per validate_session over ``calls`` calls."""
    limits = Settings(dev=True).limits
    user = await store.create_user(f"bench-{time.monotonic_ns()}", "hash", ())
    session = await store.create_session(
        user, NewSession(b"r" * 12, b"k" * 16, "127.0.0.1", "bench"), limits
    )
    ids = (user.user_id, session.session_id)

    async def worker(count: int) -> None:
        for _ in range(count):
            if await store.validate_session(*ids, limits) is None:
                raise RuntimeError("the session ended during the benchmark")

    await worker(200)  # warm-up: connections open, scripts loaded
    started = time.process_time()
    await asyncio.gather(*(worker(calls // CONCURRENCY) for _ in range(CONCURRENCY)))
    return (time.process_time() - started) / calls * 1e6


def measure(url: str, calls: int, pipelined: bool) -> float:
    # Without checks the store sends every command through redis-py, as it
    # does for a TLS, Sentinel or Cluster URL.
    checks = ScriptConnection.for_url(url) if pipelined else None
    store = RedisStore(connect(url), checks=checks)

    async def run() -> float:
        try:
            return await cpu_per_check(store, calls)
        finally:
            await store.close()

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    with TemporaryDirectory() as directory:
        server = RedisProcess(Path(directory))
        server.start()
        try:
            figures: dict[str, list[float]] = {"redis-py": [], "ScriptConnection": []}
            for _ in range(options.rounds):
                figures["redis-py"].append(measure(server.url, options.calls, False))
                figures["ScriptConnection"].append(
                    measure(server.url, options.calls, True)
                )
        finally:
            server.stop()
    best = {name: min(values) for name, values in figures.items()}
    for name, values in figures.items():
        rounds = " ".join(f"{value:.1f}" for value in values)
        print(f"{name:>16}: {best[name]:6.1f} us CPU per check (rounds: {rounds})")
    print(f"ratio: {best['redis-py'] / best['ScriptConnection']:.1f}x")


if __name__ == "__main__":
    main()
