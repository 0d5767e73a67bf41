"""Event-loop pauses while argon2 hashes run beside it, by lanes and by pool kind.

An event loop sleeps 2.5 ms and then works 0.3 ms, over and over, and the
script records how much longer than 2.5 ms each sleep took. Meanwhile 32
argon2id hashes (t=3, m=64 MiB) run on one idle-priority worker: a thread
or a process, with four lanes or one. The p99 oversleep next to the idle
figure shows how much a burst of logins slows the loop that serves
validations. Run it from the repository root:
``.venv/bin/python benchmarks/hash_pauses.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor

import argon2

SLEEP_S = 0.0025
WORK_S = 0.0003
HASHES = 32
HASHERS = {
    lanes: argon2.PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=lanes)
    for lanes in (1, 4)
}


def _idle_priority() -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _hash(lanes: int) -> str:
    return HASHERS[lanes].hash("a password for the benchmark")


async def _probe(stop: asyncio.Event) -> list[float]:
    oversleeps = []
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(SLEEP_S)
        busy_until = time.perf_counter() + WORK_S
        while time.perf_counter() < busy_until:
            pass
        oversleeps.append(time.perf_counter() - started - SLEEP_S - WORK_S)
    return oversleeps


async def _measure(pool: Executor | None, lanes: int) -> str:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    probe = asyncio.create_task(_probe(stop))
    if pool is None:
        await asyncio.sleep(3)
    else:
        await asyncio.gather(
            *(loop.run_in_executor(pool, _hash, lanes) for _ in range(HASHES))
        )
    stop.set()
    values = sorted(await probe)
    p50 = values[len(values) // 2] * 1000
    p99 = values[int(0.99 * (len(values) - 1))] * 1000
    return f"p50 {p50:5.2f} ms  p99 {p99:5.2f} ms  ({len(values)} sleeps)"


async def main() -> None:
    threads = ThreadPoolExecutor(max_workers=1, initializer=_idle_priority)
    processes = ProcessPoolExecutor(
        max_workers=1,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_idle_priority,
    )
    # Starts the worker process before anything is timed.
    await asyncio.get_running_loop().run_in_executor(processes, _hash, 1)
    cases: list[tuple[str, Executor | None, int]] = [
        ("idle", None, 1),
        ("thread, 4 lanes", threads, 4),
        ("process, 4 lanes", processes, 4),
        ("thread, 1 lane", threads, 1),
        ("process, 1 lane", processes, 1),
    ]
    try:
        for name, pool, lanes in cases:
            print(f"{name:>17}: {await _measure(pool, lanes)}", flush=True)
    finally:
        threads.shutdown()
        processes.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
