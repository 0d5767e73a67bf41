"""Signing keys: generation, loading, rotation and publication as a JWKS.

A key set is either one PEM file (or, for HS256, one secret file) or a
directory of them. In a directory each key file is named ``<kid>.pem``
(``<kid>.secret`` for HS256) and the file ``active`` contains the kid of the
key that signs new tokens; every other key only verifies, until it is
retired by deleting its file. A single file's kid is its RFC 7638 JWK
thumbprint, truncated to 16 characters. An HS256 secret file holds the
secret base64url-encoded, as ``authgrpc keys generate`` writes it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from authgrpc.errors import ConfigurationError

ALGORITHMS = ("EdDSA", "ES256", "RS256", "HS256")
DEFAULT_ALGORITHM = "EdDSA"
MIN_HMAC_SECRET_BYTES = 32
ACTIVE_FILE = "active"
_KID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class SigningKey:
    """A key that signs tokens: an asymmetric private key or an HMAC secret."""

    kid: str
    algorithm: str
    private_key: PrivateKey | bytes = field(repr=False)

    @property
    def verification_key(self) -> PublicKey | bytes:
        """The key that verifies this key's signatures."""
        if isinstance(self.private_key, bytes):
            return self.private_key
        return self.private_key.public_key()


@dataclass(frozen=True)
class KeySet:
    """The active signing key (if any) and every key that verifies, by kid."""

    algorithm: str
    verification_keys: Mapping[str, PublicKey | bytes] = field(repr=False)
    signing_key: SigningKey | None = None
    loaded_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        # A key of another type than the algorithm's would let a verifier read
        # a public key as an HMAC secret or the reverse (algorithm confusion).
        for kid, key in self.verification_keys.items():
            _check_key(kid, key, self.algorithm)
        if (
            self.signing_key is not None
            and self.signing_key.algorithm != self.algorithm
        ):
            raise ConfigurationError(
                f"signing key {self.signing_key.kid!r} is for "
                f"{self.signing_key.algorithm}, but the key set is for {self.algorithm}"
            )

    def jwks(self) -> dict[str, Any]:
        """Return the public keys as a JWKS document; empty for HMAC keys."""
        keys = []
        for kid, key in sorted(self.verification_keys.items()):
            if isinstance(key, bytes):
                continue
            jwk = _public_jwk(key)
            jwk.update({"kid": kid, "alg": self.algorithm, "use": "sig"})
            keys.append(jwk)
        return {"keys": keys}


def is_valid_kid(kid: object) -> bool:
    """Return whether ``kid`` is a string of 1 to 64 base64url characters."""
    return isinstance(kid, str) and _KID_PATTERN.fullmatch(kid) is not None


def _check_key(kid: str, key: object, algorithm: str) -> None:
    expected: dict[str, type] = {
        "EdDSA": ed25519.Ed25519PublicKey,
        "ES256": ec.EllipticCurvePublicKey,
        "RS256": rsa.RSAPublicKey,
        "HS256": bytes,
    }
    if algorithm not in expected:
        raise ConfigurationError(
            f"unsupported algorithm {algorithm!r}; use one of {ALGORITHMS}"
        )
    if not isinstance(key, expected[algorithm]):
        raise ConfigurationError(
            f"key {kid!r} is a {type(key).__name__}, which cannot verify {algorithm}"
        )
    if isinstance(key, bytes) and len(key) < MIN_HMAC_SECRET_BYTES:
        raise ConfigurationError(
            f"HS256 secret {kid!r} is {len(key)} bytes; "
            f"at least {MIN_HMAC_SECRET_BYTES} are required"
        )


def generate_private_key(algorithm: str) -> PrivateKey | bytes:
    """Return a new Ed25519, P-256, RSA-3072 or 256-bit HMAC key for ``algorithm``."""
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "RS256":
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if algorithm == "HS256":
        return secrets.token_bytes(MIN_HMAC_SECRET_BYTES)
    raise ConfigurationError(
        f"unsupported algorithm {algorithm!r}; use one of {ALGORITHMS}"
    )


def key_file_bytes(key: PrivateKey | bytes) -> bytes:
    """Serialize a private key as unencrypted PKCS#8 PEM, or a secret as base64url."""
    if isinstance(key, bytes):
        return base64.urlsafe_b64encode(key).rstrip(b"=") + b"\n"
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_private_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` for its owner only, replacing the file atomically."""
    # A new directory is its owner's only, like the key files in it.
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def generate_key_file(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> str:
    """Write a new key to ``path`` and return its kid. Refuses to overwrite."""
    if path.exists():
        raise ConfigurationError(
            f"{path} already exists; remove it or choose another path"
        )
    key = generate_private_key(algorithm)
    write_private_file(path, key_file_bytes(key))
    return key_id(key, algorithm)


def rotate_key_directory(
    directory: Path, algorithm: str = DEFAULT_ALGORITHM, *, activate: bool = True
) -> str:
    """Add a new key to a key directory and return its kid.

    With ``activate`` the key signs new tokens at once. Without it the key
    only verifies until :func:`activate_key` makes it active, so that every
    replica can load it before any token it signed reaches them. The first
    key of a directory is always made active.
    """
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = generate_private_key(algorithm)
    kid = key_id(key, algorithm)
    suffix = ".secret" if algorithm == "HS256" else ".pem"
    key_path = directory / f"{kid}{suffix}"
    if key_path.exists():
        raise ConfigurationError(f"{key_path} already exists")
    write_private_file(key_path, key_file_bytes(key))
    if activate or not (directory / ACTIVE_FILE).exists():
        write_private_file(directory / ACTIVE_FILE, f"{kid}\n".encode())
    return kid


def activate_key(directory: Path, kid: str) -> None:
    """Make an existing key of a key directory the one that signs new tokens."""
    if kid not in _key_files(directory):
        raise ConfigurationError(f"no key with kid {kid!r} in {directory}")
    write_private_file(directory / ACTIVE_FILE, f"{kid}\n".encode())


def retire_key(directory: Path, kid: str) -> Path:
    """Delete a non-active key from a key directory and return its path."""
    keys = _key_files(directory)
    if kid not in keys:
        raise ConfigurationError(f"no key with kid {kid!r} in {directory}")
    if _read_active(directory) == kid:
        raise ConfigurationError(
            f"key {kid!r} is the active key; rotate to a new key before retiring it"
        )
    keys[kid].unlink()
    return keys[kid]


def load_signing_keys(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> KeySet:
    """Load a key file or key directory that can sign and verify.

    Raises ConfigurationError naming the file when a key is unreadable, of
    the wrong type for ``algorithm``, or (HS256) shorter than 32 bytes.
    """
    if path.is_dir():
        files = _key_files(path)
        if not files:
            raise ConfigurationError(
                f"key directory {path} contains no *.pem or *.secret files"
            )
        active = _read_active(path)
        if active not in files:
            raise ConfigurationError(
                f"{path / ACTIVE_FILE} names kid {active!r}, "
                f"but {path} has no such key file"
            )
        loaded = {kid: _load_private(file, algorithm) for kid, file in files.items()}
        signing = SigningKey(active, algorithm, loaded[active])
        verification = {
            kid: SigningKey(kid, algorithm, k).verification_key
            for kid, k in loaded.items()
        }
        return KeySet(algorithm, verification, signing)
    if not path.exists():
        raise ConfigurationError(
            f"signing key {path} does not exist; create one with "
            f"`authgrpc keys generate --out {path}`"
        )
    key = _load_private(path, algorithm)
    kid = key_id(key, algorithm)
    signing = SigningKey(kid, algorithm, key)
    return KeySet(algorithm, {kid: signing.verification_key}, signing)


def load_verification_keys(path: Path, algorithm: str = DEFAULT_ALGORITHM) -> KeySet:
    """Load keys that only verify: a JWKS file, or a key file or directory."""
    if path.is_file() and path.suffix == ".json":
        return keyset_from_jwks(path.read_text(), algorithm)
    keys = load_signing_keys(path, algorithm)
    return KeySet(algorithm, keys.verification_keys)


def keyset_from_jwks(document: str, algorithm: str = DEFAULT_ALGORITHM) -> KeySet:
    """Parse a JWKS document, keeping only signature keys for ``algorithm``."""
    try:
        parsed = json.loads(document)
        entries = parsed["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not an array")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(f"invalid JWKS document: {exc}") from None
    keys: dict[str, PublicKey | bytes] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("alg") != algorithm:
            continue
        if entry.get("use", "sig") != "sig" or "d" in entry:
            continue
        kid = entry.get("kid")
        if not isinstance(kid, str) or not _KID_PATTERN.match(kid):
            continue
        try:
            keys[kid] = jwt.PyJWK(entry, algorithm).key
        except jwt.PyJWTError as exc:
            raise ConfigurationError(
                f"invalid JWK {kid!r} in JWKS document: {exc}"
            ) from None
    return KeySet(algorithm, keys)


def key_id(key: PrivateKey | bytes, algorithm: str) -> str:
    """Return the RFC 7638 thumbprint of a key, truncated to 16 characters."""
    if isinstance(key, bytes):
        secret = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
        members: dict[str, Any] = {"k": secret, "kty": "oct"}
    else:
        jwk = _public_jwk(key.public_key())
        required = {
            "OKP": ("crv", "kty", "x"),
            "EC": ("crv", "kty", "x", "y"),
            "RSA": ("e", "kty", "n"),
        }
        members = {name: jwk[name] for name in required[jwk["kty"]]}
    canonical = json.dumps(members, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(canonical).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()[:16]


def _public_jwk(key: PublicKey) -> dict[str, Any]:
    if isinstance(key, ed25519.Ed25519PublicKey):
        return dict(jwt.algorithms.OKPAlgorithm.to_jwk(key, as_dict=True))
    if isinstance(key, ec.EllipticCurvePublicKey):
        return dict(jwt.algorithms.ECAlgorithm.to_jwk(key, as_dict=True))
    return dict(jwt.algorithms.RSAAlgorithm.to_jwk(key, as_dict=True))


def _key_files(directory: Path) -> dict[str, Path]:
    files: Iterable[Path] = [*directory.glob("*.pem"), *directory.glob("*.secret")]
    return {file.stem: file for file in sorted(files) if _KID_PATTERN.match(file.stem)}


def _read_active(directory: Path) -> str:
    try:
        return (directory / ACTIVE_FILE).read_text().strip()
    except FileNotFoundError:
        raise ConfigurationError(
            f"key directory {directory} has no {ACTIVE_FILE!r} file "
            "naming the signing kid; "
            f"create one with `authgrpc keys rotate --dir {directory}`"
        ) from None


def _load_private(path: Path, algorithm: str) -> PrivateKey | bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read key file {path}: {exc.strerror}"
        ) from None
    if algorithm == "HS256":
        return _load_secret(path, data)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            f"{path} is not an unencrypted PEM private key for {algorithm}; "
            "if it is an HS256 secret, pass --algorithm HS256, and otherwise "
            f"create a key with `authgrpc keys generate --algorithm {algorithm}`"
        ) from None
    expected: dict[str, type] = {
        "EdDSA": ed25519.Ed25519PrivateKey,
        "ES256": ec.EllipticCurvePrivateKey,
        "RS256": rsa.RSAPrivateKey,
    }
    if algorithm not in expected:
        raise ConfigurationError(
            f"unsupported algorithm {algorithm!r}; use one of {ALGORITHMS}"
        )
    if not isinstance(key, expected[algorithm]):
        raise ConfigurationError(
            f"{path} contains a {type(key).__name__}, which cannot sign {algorithm}"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise ConfigurationError(
            f"{path} is on curve {key.curve.name}; ES256 needs P-256"
        )
    if isinstance(key, rsa.RSAPrivateKey) and key.key_size < 2048:
        raise ConfigurationError(
            f"{path} is a {key.key_size}-bit RSA key; RS256 needs 2048 or more"
        )
    return key  # type: ignore[return-value]


def _load_secret(path: Path, data: bytes) -> bytes:
    text = data.strip()
    if not re.fullmatch(rb"[A-Za-z0-9_-]+", text):
        raise ConfigurationError(f"{path} must hold one base64url-encoded HS256 secret")
    secret = base64.urlsafe_b64decode(text + b"=" * (-len(text) % 4))
    if len(secret) < MIN_HMAC_SECRET_BYTES:
        raise ConfigurationError(
            f"HS256 secret in {path} is {len(secret)} bytes; "
            f"at least {MIN_HMAC_SECRET_BYTES} are required"
        )
    return secret
