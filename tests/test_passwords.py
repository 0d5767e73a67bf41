"""Password hashing and username rules, on their own."""

from __future__ import annotations

import asyncio
import os

import argon2
import pytest

from authgrpc.errors import InvalidArgument
from authgrpc.passwords import (
    PasswordHasher,
    check_new_password,
    default_hasher,
    normalize_username,
)

FAST = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
DUMMY_PLAINTEXT = "dummy password for timing equalization"


async def test_verify_accepts_right_password() -> None:
    hasher = PasswordHasher(FAST, workers=1)

    matched = await hasher.verify(
        hasher.hash_sync("a long passphrase"), "a long passphrase"
    )

    assert matched is True


@pytest.mark.parametrize("stored", [None, ""], ids=["none", "empty"])
async def test_missing_hash_never_matches(stored: str | None) -> None:
    hasher = PasswordHasher(FAST, workers=1)

    matched = await hasher.verify(stored, DUMMY_PLAINTEXT)

    assert matched is False


async def test_corrupt_hash_never_matches() -> None:
    hasher = PasswordHasher(FAST, workers=1)

    matched = await hasher.verify("not an argon2 hash", "anything")

    assert matched is False


def test_weaker_parameters_need_rehash() -> None:
    hasher = PasswordHasher(FAST, workers=1)
    weak = argon2.PasswordHasher(time_cost=1, memory_cost=512, parallelism=1)

    assert hasher.needs_rehash(weak.hash("x")) is True
    assert hasher.needs_rehash(hasher.hash_sync("x")) is False


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Alice", "alice"),
        ("  bob  ", "bob"),
        ("\uff21\uff2c\uff29", "ali"),
        ("Stra\u00dfe", "strasse"),
    ],
)
def test_usernames_normalized(raw: str, expected: str) -> None:
    assert normalize_username(raw) == expected


def test_short_new_password_rejected() -> None:
    with pytest.raises(InvalidArgument) as caught:
        check_new_password("short")

    assert caught.value.field == "password"


async def test_hashing_threads_run_at_idle_priority() -> None:
    hasher = PasswordHasher(FAST, workers=1)
    try:
        policy = await asyncio.get_running_loop().run_in_executor(
            hasher._pool, os.sched_getscheduler, 0
        )
    finally:
        hasher.close()
    assert policy == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == os.SCHED_OTHER


def test_default_parameters_hash_on_one_lane() -> None:
    parameters = argon2.extract_parameters(default_hasher().hash("a password"))
    assert parameters.parallelism == 1
    assert parameters.memory_cost >= 19 * 1024
    assert parameters.time_cost >= 2
    assert parameters.type is argon2.Type.ID
