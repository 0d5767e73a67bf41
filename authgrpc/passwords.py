"""Usernames and passwords: normalization, size checks, and argon2id hashing.

Sizes are checked in bytes before any normalization or hashing, so an
oversized input costs nothing. Hashing runs in a bounded pool of threads
at the idle scheduling priority, one per core but one. argon2-cffi releases the
GIL while it hashes, so validations keep running on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import unicodedata
from concurrent.futures import ThreadPoolExecutor

import argon2
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from authgrpc.errors import InvalidArgument

MAX_USERNAME_BYTES = 256
MAX_PASSWORD_BYTES = 1024
MIN_PASSWORD_CHARACTERS = 8


def normalize_username(raw: str, field: str = "username") -> str:
    """Return the canonical form of a username: NFKC, case-folded, trimmed.

    Raises InvalidArgument when it is empty, too long (checked in bytes on
    the raw value), or contains control characters.
    """
    if len(raw.encode("utf-8", "surrogatepass")) > MAX_USERNAME_BYTES:
        raise InvalidArgument(
            field, f"{field} is longer than {MAX_USERNAME_BYTES} bytes"
        )
    folded = unicodedata.normalize("NFKC", raw).casefold()
    # Checked before trimming, because str.strip() also removes control
    # characters such as "\n" and "\x1f", which must be rejected.
    if any(unicodedata.category(char).startswith("C") for char in folded):
        raise InvalidArgument(
            field, f"{field} contains control or unassigned characters"
        )
    username = folded.strip()
    if not username:
        raise InvalidArgument(field, f"{field} is empty")
    return username


def check_password_size(password: str, field: str = "password") -> None:
    """Raise InvalidArgument for an empty password or one over the byte limit."""
    if not password:
        raise InvalidArgument(field, f"{field} is empty")
    if len(password.encode("utf-8", "surrogatepass")) > MAX_PASSWORD_BYTES:
        raise InvalidArgument(
            field, f"{field} is longer than {MAX_PASSWORD_BYTES} bytes"
        )


def check_new_password(password: str, field: str = "password") -> None:
    """Check a password that is being set: the size limits and a minimum length."""
    check_password_size(password, field)
    if len(password) < MIN_PASSWORD_CHARACTERS:
        raise InvalidArgument(
            field, f"{field} must be at least {MIN_PASSWORD_CHARACTERS} characters"
        )


def default_hash_workers() -> int:
    """Return one hashing thread per core but one, so validations keep a core."""
    return max(1, (os.cpu_count() or 2) - 1)


def default_hasher() -> argon2.PasswordHasher:
    """Return argon2id with t=3, m=64 MiB and one lane.

    That is above the OWASP password storage cheat sheet's minimum (m=19 MiB,
    t=2, p=1) on every parameter. RFC 9106's low-memory profile takes four
    lanes, and argon2 then starts four threads per hash, which spread over
    every core and slow the event loop's core down during a burst of
    logins. One lane keeps each hash on its own thread. Hashes made with
    other parameters still verify, and ``needs_rehash`` flags them.
    """
    return argon2.PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)


def _lower_thread_priority() -> None:
    """Run the calling hashing thread only when a core would otherwise idle.

    A hash keeps a core busy for about a fifth of a second with the GIL
    released, so at normal priority a burst of logins starves the event loop
    that serves validations. On Linux the policy applies to the calling
    thread, and the threads that argon2 starts for its lanes inherit it.
    SCHED_IDLE yields to any normal thread at once; nice 19 is the fallback
    where it is missing.
    """
    # Off Linux, or where neither is permitted, hashing runs at normal priority.
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        return
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


class PasswordHasher:
    """argon2id hashing with a bounded pool of worker threads.

    The default parameters (:func:`default_hasher`) are argon2id with t=3,
    m=64 MiB and p=1. ``verify`` against a fixed dummy hash when the user is
    unknown, so that unknown users and wrong passwords take the same time.
    """

    def __init__(
        self, hasher: argon2.PasswordHasher | None = None, workers: int | None = None
    ):
        self._hasher = hasher or default_hasher()
        self._pool = ThreadPoolExecutor(
            max_workers=workers or default_hash_workers(),
            thread_name_prefix="argon2",
            initializer=_lower_thread_priority,
        )
        self._dummy_hash = self._hasher.hash("dummy password for timing equalization")

    def hash_sync(self, password: str) -> str:
        """Hash a password on the calling thread."""
        return self._hasher.hash(password)

    async def hash(self, password: str) -> str:
        """Hash a password on the pool."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._hasher.hash, password
        )

    async def verify(self, password_hash: str | None, password: str) -> bool:
        """Return whether ``password`` matches.

        With no hash, verify against a dummy hash, so that the call takes the
        same time, and return False.
        """
        target = password_hash or self._dummy_hash
        matched = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._verify, target, password
        )
        # An empty hash is no hash: it was verified against the dummy hash above.
        return matched and bool(password_hash)

    def needs_rehash(self, password_hash: str) -> bool:
        """Return whether a hash was made with parameters other than the current."""
        try:
            return self._hasher.check_needs_rehash(password_hash)
        except InvalidHashError:
            return True

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return self._hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
