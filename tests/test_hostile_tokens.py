"""Forged, tampered and malformed access and refresh tokens against a real server.

Each token goes to ValidateSession in the request body, to Logout and to the
protected ListSessions and LogoutAll as ``authorization`` metadata, so that
both the servicer and the auth interceptor are covered. A rejected LogoutAll
must leave alice's session live, which shows that no handler ran.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from authgrpc.errors import ConfigurationError, Reason
from authgrpc.keys import KeySet, SigningKey, key_id, keyset_from_jwks
from authgrpc.redis_store import RedisStore
from authgrpc.server import start_server
from authgrpc.store import MemoryStore
from authgrpc.v1 import auth_pb2
from tests.conftest import make_keys
from tests.hostile_support import (
    UNAUTHENTICATED,
    Harness,
    assert_rejected,
    b64url,
    b64url_decode,
    bearer,
    json_segment,
    live_session_ids,
    settings,
    start_harness,
    stop_harness,
)

ATTACKER_ED25519 = ed25519.Ed25519PrivateKey.generate()
ATTACKER_KID = key_id(ATTACKER_ED25519, "EdDSA")
ATTACKER_P256 = ec.generate_private_key(ec.SECP256R1())
ATTACKER_RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
LEEWAY = 30


@pytest.fixture
async def harness(redis_url: str, prefix: str) -> AsyncIterator[Harness]:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    running = await start_harness(settings(leeway=LEEWAY), store, make_keys())
    yield running
    await stop_harness(running, prefix)


@pytest.fixture
def jwks_listener() -> Iterator[socket.socket]:
    """A loopback TCP socket that a verifier fetching ``jku`` or ``x5u`` would reach."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    yield listener
    listener.close()


def assert_no_connection(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


async def assert_token_rejected(
    harness: Harness,
    token: str,
    reason: str,
    *,
    logout_succeeds: bool = False,
) -> None:
    """Assert every way of presenting ``token`` fails with ``reason``."""
    request = auth_pb2.ValidateSessionRequest(access_token=token)
    await assert_rejected(
        harness.stub.ValidateSession(request), UNAUTHENTICATED, reason
    )

    list_call = harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(token)
    )
    await assert_rejected(list_call, UNAUTHENTICATED, reason)

    logout_all = harness.stub.LogoutAll(
        auth_pb2.LogoutAllRequest(), metadata=bearer(token)
    )
    await assert_rejected(logout_all, UNAUTHENTICATED, reason)
    assert await live_session_ids(harness) == [harness.session_id]

    logout = harness.stub.Logout(auth_pb2.LogoutRequest(), metadata=bearer(token))
    if logout_succeeds:
        await logout
        assert await live_session_ids_or_none(harness) is None
    else:
        await assert_rejected(logout, UNAUTHENTICATED, reason)
        assert await live_session_ids(harness) == [harness.session_id]


async def live_session_ids_or_none(harness: Harness) -> list[str] | None:
    try:
        return await live_session_ids(harness)
    except grpc.aio.AioRpcError as error:
        assert error.code() == UNAUTHENTICATED
        return None


async def assert_accepted(harness: Harness, token: str) -> None:
    request = auth_pb2.ValidateSessionRequest(access_token=token)
    response = await harness.stub.ValidateSession(request)
    assert response.principal.user_id == harness.user_id
    assert response.session.session_id == harness.session_id
    listed = await harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(token)
    )
    assert [s.session_id for s in listed.sessions] == [harness.session_id]


# Tampering: each builder changes one segment of alice's real token.


def replace_char(text: str, index: int) -> str:
    """Swap the base64url character at ``index`` for another one."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    old = text[index]
    new = alphabet[(alphabet.index(old) + 32) % 64]
    return text[:index] + new + text[index + 1 :]


def segments(h: Harness) -> list[str]:
    return h.token.split(".")


def header_first_char(h: Harness) -> str:
    header, payload, signature = segments(h)
    return f"{replace_char(header, 0)}.{payload}.{signature}"


def header_reencoded(h: Harness) -> str:
    header, payload, signature = segments(h)
    spaced = b64url_decode(header).replace(b":", b": ")
    return f"{b64url(spaced)}.{payload}.{signature}"


def header_kid_flipped(h: Harness) -> str:
    header, payload, signature = segments(h)
    decoded = b64url_decode(header)
    kid = h.header()["kid"].encode()
    flipped = decoded.replace(kid, bytes([kid[0] ^ 0x01]) + kid[1:])
    return f"{b64url(flipped)}.{payload}.{signature}"


def payload_char_flipped(h: Harness) -> str:
    header, payload, signature = segments(h)
    return f"{header}.{replace_char(payload, len(payload) // 2)}.{signature}"


def payload_sub_flipped(h: Harness) -> str:
    header, payload, signature = segments(h)
    decoded = b64url_decode(payload)
    user = h.user_id.encode()
    flipped = decoded.replace(user, bytes([user[0] ^ 0x01]) + user[1:])
    return f"{header}.{b64url(flipped)}.{signature}"


def signature_char_flipped(h: Harness) -> str:
    header, payload, signature = segments(h)
    return f"{header}.{payload}.{replace_char(signature, len(signature) // 2)}"


def signature_byte_flipped(h: Harness) -> str:
    header, payload, signature = segments(h)
    raw = bytearray(b64url_decode(signature))
    raw[0] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def signature_padded(h: Harness) -> str:
    return h.token + "=="


def signature_spare_bits(h: Harness) -> str:
    # An Ed25519 signature is 64 bytes, so its 86th character carries four
    # unused bits. Setting one decodes to the same bytes under lax decoders.
    header, payload, signature = segments(h)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(signature[-1]) ^ 0x01]
    return f"{header}.{payload}.{signature[:-1]}{last}"


def signature_truncated(h: Harness) -> str:
    return h.token[:-1]


def signature_removed(h: Harness) -> str:
    header, payload, _ = segments(h)
    return f"{header}.{payload}."


def signature_of_other_token(h: Harness) -> str:
    header, payload, _ = segments(h)
    other = h.forge(claims=h.claims(jti="another-token-id"))
    return f"{header}.{payload}.{other.split('.')[2]}"


TAMPERED = [
    pytest.param(header_first_char, Reason.TOKEN_MALFORMED, id="header-first-char"),
    pytest.param(header_reencoded, Reason.TOKEN_BAD_SIGNATURE, id="header-reencoded"),
    pytest.param(header_kid_flipped, Reason.TOKEN_BAD_SIGNATURE, id="header-kid-byte"),
    pytest.param(payload_char_flipped, Reason.TOKEN_BAD_SIGNATURE, id="payload-char"),
    pytest.param(
        payload_sub_flipped, Reason.TOKEN_BAD_SIGNATURE, id="payload-sub-byte"
    ),
    pytest.param(signature_char_flipped, Reason.TOKEN_BAD_SIGNATURE, id="sig-char"),
    pytest.param(signature_byte_flipped, Reason.TOKEN_BAD_SIGNATURE, id="sig-byte"),
    pytest.param(signature_padded, Reason.TOKEN_MALFORMED, id="sig-padded"),
    pytest.param(signature_spare_bits, Reason.TOKEN_MALFORMED, id="sig-spare-bits"),
    pytest.param(signature_truncated, Reason.TOKEN_MALFORMED, id="sig-truncated"),
    pytest.param(signature_removed, Reason.TOKEN_BAD_SIGNATURE, id="sig-removed"),
    pytest.param(
        signature_of_other_token, Reason.TOKEN_BAD_SIGNATURE, id="sig-swapped"
    ),
]


@pytest.mark.parametrize(("build", "reason"), TAMPERED)
async def test_tampered_token_rejected(
    harness: Harness, build: Callable[[Harness], str], reason: Reason
) -> None:
    await assert_token_rejected(harness, build(harness), reason)


async def test_untampered_token_accepted(harness: Harness) -> None:
    await assert_accepted(harness, harness.token)


# alg "none" and algorithm confusion.

NONE_SPELLINGS = ["none", "None", "NONE", "nOnE"]


@pytest.mark.parametrize("alg", NONE_SPELLINGS)
@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
async def test_alg_none_rejected(harness: Harness, alg: str, signed: bool) -> None:
    header = json_segment(harness.header(alg=alg))
    payload = json_segment(harness.claims())
    signature = harness.token.split(".")[2] if signed else ""
    token = f"{header}.{payload}.{signature}"
    await assert_token_rejected(harness, token, Reason.TOKEN_BAD_SIGNATURE)


@pytest.mark.parametrize("alg", [None, "", "HS256", "EdDSA ", "eddsa", ["EdDSA"]])
async def test_unexpected_alg_rejected(harness: Harness, alg: object) -> None:
    token = harness.forge(header=harness.header(alg=alg))
    await assert_token_rejected(harness, token, Reason.TOKEN_BAD_SIGNATURE)


def public_key_forms(harness: Harness) -> dict[str, bytes]:
    """Return our Ed25519 public key in every encoding an attacker might HMAC with."""
    key = harness.keys.signing_key
    assert key is not None
    assert isinstance(key.private_key, ed25519.Ed25519PrivateKey)
    public = key.private_key.public_key()
    encoding = serialization.Encoding
    formats = serialization.PublicFormat
    return {
        "pem": public.public_bytes(encoding.PEM, formats.SubjectPublicKeyInfo),
        "der": public.public_bytes(encoding.DER, formats.SubjectPublicKeyInfo),
        "raw": public.public_bytes(encoding.Raw, formats.Raw),
        "openssh": public.public_bytes(encoding.OpenSSH, formats.OpenSSH),
    }


@pytest.mark.parametrize("form", ["pem", "der", "raw", "openssh"])
async def test_hs256_with_public_key(harness: Harness, form: str) -> None:
    secret = public_key_forms(harness)[form]
    header = json_segment(harness.header(alg="HS256"))
    payload = json_segment(harness.claims())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256)
    token = f"{header}.{payload}.{b64url(signature.digest())}"
    await assert_token_rejected(harness, token, Reason.TOKEN_BAD_SIGNATURE)


ATTACKER_SIGNERS = [
    pytest.param("RS256", ATTACKER_RSA, id="rs256"),
    pytest.param("ES256", ATTACKER_P256, id="es256"),
    pytest.param("EdDSA", ATTACKER_ED25519, id="eddsa"),
]


@pytest.mark.parametrize(("alg", "key"), ATTACKER_SIGNERS)
@pytest.mark.parametrize("kid", ["ours", "theirs"])
async def test_attacker_key_rejected(
    harness: Harness, alg: str, key: object, kid: str
) -> None:
    header = harness.header(alg=alg)
    if kid == "theirs":
        header["kid"] = ATTACKER_KID
    token = jwt.encode(harness.claims(), key, algorithm=alg, headers=header)  # type: ignore[arg-type]
    await assert_token_rejected(harness, token, Reason.TOKEN_BAD_SIGNATURE)


# kid values.

KID_CASES = [
    pytest.param(7, Reason.TOKEN_MALFORMED, id="number"),
    pytest.param({"kid": "x"}, Reason.TOKEN_MALFORMED, id="object"),
    pytest.param(["x"], Reason.TOKEN_MALFORMED, id="list"),
    pytest.param(None, Reason.TOKEN_MALFORMED, id="null"),
    pytest.param("", Reason.TOKEN_MALFORMED, id="empty"),
    pytest.param("k" * 10_240, Reason.TOKEN_MALFORMED, id="ten-kilobytes"),
    pytest.param("k" * 65, Reason.TOKEN_MALFORMED, id="sixty-five-chars"),
    pytest.param("../../etc/passwd", Reason.TOKEN_MALFORMED, id="path-traversal"),
    pytest.param("kid\u0000", Reason.TOKEN_MALFORMED, id="nul-byte"),
    pytest.param("AAAAAAAAAAAAAAAA", Reason.TOKEN_BAD_SIGNATURE, id="unknown"),
]


@pytest.mark.parametrize(("kid", "reason"), KID_CASES)
async def test_bad_kid_rejected(harness: Harness, kid: object, reason: Reason) -> None:
    token = harness.forge(header=harness.header(kid=kid))
    await assert_token_rejected(harness, token, reason)


async def test_missing_kid_rejected(harness: Harness) -> None:
    header = harness.header()
    del header["kid"]
    await assert_token_rejected(
        harness, harness.forge(header=header), Reason.TOKEN_MALFORMED
    )


# Headers that point at other keys must be ignored.


def self_signed_certificate() -> str:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authgrpc")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ATTACKER_ED25519.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ATTACKER_ED25519, None)
    )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


@pytest.mark.parametrize("parameter", ["jku", "x5u", "jwk", "x5c"])
@pytest.mark.parametrize("kid", ["ours", "theirs"])
async def test_key_pointer_ignored(
    harness: Harness, jwks_listener: socket.socket, parameter: str, kid: str
) -> None:
    port = jwks_listener.getsockname()[1]
    attacker_jwk = jwt.algorithms.OKPAlgorithm.to_jwk(
        ATTACKER_ED25519.public_key(), as_dict=True
    )
    attacker_jwk.update({"kid": ATTACKER_KID, "alg": "EdDSA", "use": "sig"})
    values: dict[str, object] = {
        "jku": f"http://127.0.0.1:{port}/jwks.json",
        "x5u": f"http://127.0.0.1:{port}/cert.pem",
        "jwk": attacker_jwk,
        "x5c": [self_signed_certificate()],
    }
    header = harness.header(**{parameter: values[parameter]})
    if kid == "theirs":
        header["kid"] = ATTACKER_KID
    header_segment = json_segment(header)
    payload_segment = json_segment(harness.claims())
    signing_input = f"{header_segment}.{payload_segment}".encode()
    signature = b64url(ATTACKER_ED25519.sign(signing_input))
    token = f"{header_segment}.{payload_segment}.{signature}"

    await assert_token_rejected(harness, token, Reason.TOKEN_BAD_SIGNATURE)

    assert_no_connection(jwks_listener)


# Encodings and structure.


def structure_cases(h: Harness) -> dict[str, str]:
    header, payload, signature = h.token.split(".")
    header_json = json_segment(h.header())
    nul_header = b64url(b'{"alg":"EdDSA"\x00}')
    non_utf8_header = b64url(b"\xff\xfe{}")
    return {
        "one-segment": header,
        "two-segments": f"{header}.{payload}",
        "four-segments": f"{h.token}.{signature}",
        "five-segments": f"{h.token}.{header}.{payload}",
        "empty-header": f".{payload}.{signature}",
        "empty-payload": f"{header}..{signature}",
        "only-dots": "..",
        "many-dots": "." * 200,
        "bang-in-header": f"{header[:-1]}!.{payload}.{signature}",
        "plus-slash": f"{header}.{payload}.{signature[:-2]}+/",
        "padded-header": f"{header}=.{payload}.{signature}",
        "inner-space": f"{header}. {payload}.{signature}",
        "header-not-json": f"{b64url(b'hello')}.{payload}.{signature}",
        "header-array": f"{json_segment([h.header()])}.{payload}.{signature}",
        "header-string": f"{json_segment('at+jwt')}.{payload}.{signature}",
        "header-nul-byte": f"{nul_header}.{payload}.{signature}",
        "header-not-utf8": f"{non_utf8_header}.{payload}.{signature}",
        "header-deep": f"{b64url(b'[' * 2000 + b']' * 2000)}.{payload}.{signature}",
        "payload-not-json": h.sign(header_json, b64url(b"sub=alice")),
        "payload-array": h.sign(header_json, json_segment([h.claims()])),
        "payload-number": h.sign(header_json, json_segment(1)),
        "payload-null": h.sign(header_json, json_segment(None)),
        "payload-not-utf8": h.sign(header_json, b64url(b'{"sub":"\xff"}')),
        "payload-nul-byte": h.sign(header_json, b64url(b'{"sub":\x00}')),
        "payload-nan-exp": h.sign(
            header_json,
            b64url(json_segment_text(h.claims()).replace(b'"exp":0', b'"exp":NaN')),
        ),
        "payload-inf-exp": h.sign(
            header_json,
            b64url(json_segment_text(h.claims()).replace(b'"exp":0', b'"exp":1e999')),
        ),
        "payload-duplicate-sub": h.sign(
            header_json,
            b64url(
                json_segment_text(h.claims()).replace(
                    b'"exp":0', b'"exp":%d,"sub":"someone-else"' % (time.time() + 60)
                )
            ),
        ),
    }


def json_segment_text(claims: dict[str, object]) -> bytes:
    """Return claims as JSON text with ``"exp":0``, for cases to replace by hand."""
    return json.dumps({**claims, "exp": 0}, separators=(",", ":")).encode()


STRUCTURE_IDS = [
    "one-segment",
    "two-segments",
    "four-segments",
    "five-segments",
    "empty-header",
    "empty-payload",
    "only-dots",
    "many-dots",
    "bang-in-header",
    "plus-slash",
    "padded-header",
    "inner-space",
    "header-not-json",
    "header-array",
    "header-string",
    "header-nul-byte",
    "header-not-utf8",
    "header-deep",
    "payload-not-json",
    "payload-array",
    "payload-number",
    "payload-null",
    "payload-not-utf8",
    "payload-nul-byte",
    "payload-nan-exp",
    "payload-inf-exp",
    "payload-duplicate-sub",
]


@pytest.mark.parametrize("case", STRUCTURE_IDS)
async def test_malformed_structure_rejected(harness: Harness, case: str) -> None:
    token = structure_cases(harness)[case]
    await assert_token_rejected(harness, token, Reason.TOKEN_MALFORMED)


# These cannot travel as gRPC metadata, which is printable ASCII, so they go
# only in the ValidateSession request body.
BODY_ONLY = [
    pytest.param(lambda t: " " + t, id="leading-space"),
    pytest.param(lambda t: t + "\n", id="trailing-newline"),
    pytest.param(lambda t: t + "\t", id="trailing-tab"),
    pytest.param(lambda t: t.replace(".", "\u0000.", 1), id="nul-byte"),
    pytest.param(lambda t: t + "\u00e9", id="non-ascii"),
    pytest.param(lambda t: t.replace(".", "\uff0e"), id="fullwidth-dots"),
]


@pytest.mark.parametrize("mangle", BODY_ONLY)
async def test_mangled_body_token_rejected(
    harness: Harness, mangle: Callable[[str], str]
) -> None:
    request = auth_pb2.ValidateSessionRequest(access_token=mangle(harness.token))
    await assert_rejected(
        harness.stub.ValidateSession(request), UNAUTHENTICATED, Reason.TOKEN_MALFORMED
    )


# Claims.


@dataclass(frozen=True)
class ClaimCase:
    changes: dict[str, object]
    reason: Reason
    removed: str | None = None


def claim_cases() -> list[object]:
    cases: list[object] = []
    for name in ("sub", "sid", "jti"):
        for label, value in [("number", 12), ("list", ["x"]), ("empty", "")]:
            cases.append(
                pytest.param(
                    ClaimCase({name: value}, Reason.TOKEN_MALFORMED),
                    id=f"{name}-{label}",
                )
            )
        cases.append(
            pytest.param(
                ClaimCase({name: "x" * 129}, Reason.TOKEN_MALFORMED),
                id=f"{name}-too-long",
            )
        )
    now = int(time.time())
    for name in ("exp", "iat", "nbf"):
        for label, value in [
            ("string", str(now)),
            ("float", now + 0.5),
            ("bool", True),
            ("negative", -1),
            ("huge", 10**30),
            ("null", None),
        ]:
            cases.append(
                pytest.param(
                    ClaimCase({name: value}, Reason.TOKEN_MALFORMED),
                    id=f"{name}-{label}",
                )
            )
    for name in ("iss", "aud", "sub", "sid", "iat", "exp", "jti"):
        cases.append(
            pytest.param(
                ClaimCase({}, Reason.TOKEN_MALFORMED, removed=name),
                id=f"{name}-missing",
            )
        )
    cases += [
        pytest.param(
            ClaimCase({"iss": "other"}, Reason.TOKEN_CLAIMS_INVALID), id="iss-wrong"
        ),
        pytest.param(
            ClaimCase({"iss": "AUTHGRPC"}, Reason.TOKEN_CLAIMS_INVALID), id="iss-case"
        ),
        pytest.param(
            ClaimCase({"aud": "other"}, Reason.TOKEN_CLAIMS_INVALID), id="aud-wrong"
        ),
        pytest.param(
            ClaimCase({"aud": ""}, Reason.TOKEN_CLAIMS_INVALID), id="aud-empty"
        ),
        pytest.param(
            ClaimCase({"aud": ["authgrpc"]}, Reason.TOKEN_CLAIMS_INVALID),
            id="aud-list-of-ours",
        ),
        pytest.param(
            ClaimCase({"aud": ["other", "authgrpc"]}, Reason.TOKEN_CLAIMS_INVALID),
            id="aud-list-with-ours",
        ),
        pytest.param(ClaimCase({"aud": 1}, Reason.TOKEN_MALFORMED), id="aud-number"),
        pytest.param(
            ClaimCase({"aud": [1]}, Reason.TOKEN_MALFORMED), id="aud-list-number"
        ),
        pytest.param(
            ClaimCase({"iss": ["authgrpc"]}, Reason.TOKEN_MALFORMED), id="iss-list"
        ),
        pytest.param(ClaimCase({"iss": None}, Reason.TOKEN_MALFORMED), id="iss-null"),
    ]
    return cases


@pytest.mark.parametrize("case", claim_cases())
async def test_bad_claims_rejected(harness: Harness, case: ClaimCase) -> None:
    claims = harness.claims(**case.changes)
    if case.removed is not None:
        del claims[case.removed]
    await assert_token_rejected(harness, harness.forge(claims=claims), case.reason)


async def assert_lookup_rejected(harness: Harness, token: str, reason: str) -> None:
    request = auth_pb2.ValidateSessionRequest(access_token=token)
    await assert_rejected(
        harness.stub.ValidateSession(request), UNAUTHENTICATED, reason
    )
    list_call = harness.stub.ListSessions(
        auth_pb2.ListSessionsRequest(), metadata=bearer(token)
    )
    await assert_rejected(list_call, UNAUTHENTICATED, reason)
    assert await live_session_ids(harness) == [harness.session_id]


async def test_unknown_sid_rejected(harness: Harness) -> None:
    token = harness.forge(claims=harness.claims(sid="no-such-session"))
    await assert_lookup_rejected(harness, token, Reason.SESSION_ENDED)


async def test_other_users_sub_rejected(harness: Harness) -> None:
    bob = await harness.login("bob")
    token = harness.forge(claims=harness.claims(sub=bob.session.user_id))
    await assert_lookup_rejected(harness, token, Reason.SESSION_ENDED)


@pytest.mark.parametrize("typ", [None, "JWT", "jwt", "AT+JWT", "application/at+jwt", 1])
async def test_wrong_typ_rejected(harness: Harness, typ: object) -> None:
    header = harness.header(typ=typ)
    if typ is None:
        del header["typ"]
    await assert_token_rejected(
        harness, harness.forge(header=header), Reason.TOKEN_MALFORMED
    )


# Times, against the server's 30-second leeway.

TIME_CASES = [
    pytest.param({"iat": +120}, Reason.TOKEN_NOT_YET_VALID, id="iat-future"),
    pytest.param({"nbf": +120}, Reason.TOKEN_NOT_YET_VALID, id="nbf-future"),
    pytest.param(
        {"iat": +120, "exp": +600}, Reason.TOKEN_NOT_YET_VALID, id="iat-future-long"
    ),
    pytest.param({"exp": -120}, Reason.TOKEN_EXPIRED, id="exp-past"),
    pytest.param({"exp": -LEEWAY - 1}, Reason.TOKEN_EXPIRED, id="exp-just-past-leeway"),
]


@pytest.mark.parametrize(("offsets", "reason"), TIME_CASES)
async def test_token_times_rejected(
    harness: Harness, offsets: dict[str, int], reason: Reason
) -> None:
    now = int(time.time())
    token = harness.forge(
        claims=harness.claims(**{name: now + delta for name, delta in offsets.items()})
    )
    # Logout ignores exp, so it ends the session of an expired token.
    await assert_token_rejected(
        harness, token, reason, logout_succeeds=reason == Reason.TOKEN_EXPIRED
    )


WITHIN_LEEWAY = [
    pytest.param({"iat": +10}, id="iat-future"),
    pytest.param({"nbf": +10}, id="nbf-future"),
    pytest.param({"exp": -10}, id="exp-past"),
    pytest.param({"nbf": -10}, id="nbf-past"),
]


@pytest.mark.parametrize("offsets", WITHIN_LEEWAY)
async def test_leeway_times_accepted(harness: Harness, offsets: dict[str, int]) -> None:
    now = int(time.time())
    token = harness.forge(
        claims=harness.claims(**{name: now + delta for name, delta in offsets.items()})
    )
    await assert_accepted(harness, token)


# Size limits.


async def test_token_over_limit_rejected(harness: Harness) -> None:
    claims = harness.claims(pad="p" * 4096)
    await assert_token_rejected(
        harness, harness.forge(claims=claims), Reason.TOKEN_MALFORMED
    )


async def test_token_at_limit_accepted(harness: Harness) -> None:
    base = harness.forge(claims=harness.claims(pad=""))
    padding = 4096 - len(base)
    token = harness.forge(claims=harness.claims(pad="p" * (padding * 3 // 4)))
    assert len(token) <= 4096
    assert len(token) > 4090
    await assert_accepted(harness, token)


async def test_megabyte_token_fast(redis_url: str, prefix: str) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    big = settings(max_message_bytes=4 * 1024 * 1024)
    harness = await start_harness(big, store, make_keys())
    try:
        header, payload, signature = harness.token.split(".")
        token = f"{header}.{payload}{'A' * 1024 * 1024}.{signature}"
        request = auth_pb2.ValidateSessionRequest(access_token=token)
        started = time.perf_counter()
        await assert_rejected(
            harness.stub.ValidateSession(request),
            UNAUTHENTICATED,
            Reason.TOKEN_MALFORMED,
        )
        elapsed = time.perf_counter() - started
        # Sending 1 MB over loopback takes a few milliseconds; decoding and
        # verifying it would take far longer.
        assert elapsed < 0.5
    finally:
        await stop_harness(harness, prefix)


async def test_megabyte_body_over_message_limit(harness: Harness) -> None:
    token = "A" * 1024 * 1024
    request = auth_pb2.ValidateSessionRequest(access_token=token)
    await assert_rejected(
        harness.stub.ValidateSession(request), grpc.StatusCode.RESOURCE_EXHAUSTED, None
    )


# Refresh tokens.


def refresh_cases(h: Harness, bob_refresh: str) -> dict[str, str]:
    prefix, user_id, session_id, secret = h.refresh_token.split(".")
    _, bob_id, bob_session, bob_secret = bob_refresh.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    spare = alphabet[alphabet.index(secret[-1]) ^ 0x01]
    return {
        "empty": "",
        "garbage": "not a refresh token",
        "access-token": h.token,
        "wrong-prefix": f"rt2.{user_id}.{session_id}.{secret}",
        "no-prefix": f"{user_id}.{session_id}.{secret}",
        "short-secret": f"{prefix}.{user_id}.{session_id}.{secret[:-1]}",
        "padded-secret": f"{prefix}.{user_id}.{session_id}.{secret}=",
        "spare-bits": f"{prefix}.{user_id}.{session_id}.{secret[:-1]}{spare}",
        "wrong-secret": f"{prefix}.{user_id}.{session_id}.{'A' * 43}",
        "other-users-secret": f"{prefix}.{user_id}.{session_id}.{bob_secret}",
        "bad-user-chars": f"{prefix}.../{session_id}.{secret}",
        "nul-byte": f"{prefix}.{user_id}\u0000.{session_id}.{secret}",
        "oversized": f"{prefix}.{user_id}.{session_id}.{secret}" + "A" * 300,
        "trailing-newline": f"{h.refresh_token}\n",
        "unknown-session": f"{prefix}.{user_id}.{'S' * 22}.{secret}",
        "bobs-session-alices-user": f"{prefix}.{user_id}.{bob_session}.{secret}",
        "alices-session-bobs-user": f"{prefix}.{bob_id}.{session_id}.{secret}",
    }


REFRESH_CASES = [
    ("empty", Reason.REFRESH_TOKEN_INVALID),
    ("garbage", Reason.REFRESH_TOKEN_INVALID),
    ("access-token", Reason.REFRESH_TOKEN_INVALID),
    ("wrong-prefix", Reason.REFRESH_TOKEN_INVALID),
    ("no-prefix", Reason.REFRESH_TOKEN_INVALID),
    ("short-secret", Reason.REFRESH_TOKEN_INVALID),
    ("padded-secret", Reason.REFRESH_TOKEN_INVALID),
    ("spare-bits", Reason.REFRESH_TOKEN_INVALID),
    ("wrong-secret", Reason.REFRESH_TOKEN_INVALID),
    ("other-users-secret", Reason.REFRESH_TOKEN_INVALID),
    ("bad-user-chars", Reason.REFRESH_TOKEN_INVALID),
    ("nul-byte", Reason.REFRESH_TOKEN_INVALID),
    ("oversized", Reason.REFRESH_TOKEN_INVALID),
    ("trailing-newline", Reason.REFRESH_TOKEN_INVALID),
    ("unknown-session", Reason.SESSION_ENDED),
    ("bobs-session-alices-user", Reason.SESSION_ENDED),
    ("alices-session-bobs-user", Reason.SESSION_ENDED),
]


@pytest.mark.parametrize(
    ("case", "reason"), [pytest.param(c, r, id=c) for c, r in REFRESH_CASES]
)
async def test_bad_refresh_rejected(
    harness: Harness, case: str, reason: Reason
) -> None:
    bob = await harness.login("bob")
    token = refresh_cases(harness, bob.refresh_token)[case]

    call = harness.stub.Refresh(auth_pb2.RefreshRequest(refresh_token=token))
    await assert_rejected(call, UNAUTHENTICATED, reason)

    # A wrong guess must not end anyone's session, nor spend the real token.
    assert await live_session_ids(harness) == [harness.session_id]
    rotated = await harness.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=harness.refresh_token)
    )
    assert rotated.session.session_id == harness.session_id


async def test_refresh_after_logout_rejected(harness: Harness) -> None:
    await harness.stub.Logout(auth_pb2.LogoutRequest(access_token=harness.token))
    call = harness.stub.Refresh(
        auth_pb2.RefreshRequest(refresh_token=harness.refresh_token)
    )
    await assert_rejected(call, UNAUTHENTICATED, Reason.SESSION_ENDED)


async def test_refresh_reuse_ends_session(redis_url: str, prefix: str) -> None:
    store = RedisStore.from_url(redis_url, prefix=prefix)
    harness = await start_harness(settings(refresh_grace=0), store, make_keys())
    try:
        request = auth_pb2.RefreshRequest(refresh_token=harness.refresh_token)
        await harness.stub.Refresh(request)

        await assert_rejected(
            harness.stub.Refresh(request), UNAUTHENTICATED, Reason.REFRESH_TOKEN_REUSED
        )
        validate = harness.stub.ValidateSession(
            auth_pb2.ValidateSessionRequest(access_token=harness.token)
        )
        await assert_rejected(validate, UNAUTHENTICATED, Reason.SESSION_ENDED)
    finally:
        await stop_harness(harness, prefix)


# Other algorithms.


def hs256_keys(secret: bytes) -> KeySet:
    kid = key_id(secret, "HS256")
    signing = SigningKey(kid, "HS256", secret)
    return KeySet("HS256", {kid: secret}, signing)


def test_short_hmac_secret_rejected() -> None:
    with pytest.raises(ConfigurationError, match="at least 32"):
        hs256_keys(b"s" * 31)


async def test_short_secret_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "short.secret"
    path.write_text(b64url(b"s" * 31) + "\n")
    with pytest.raises(ConfigurationError, match="at least 32"):
        await start_server(
            settings(algorithm="HS256", signing_key=path), store=MemoryStore()
        )


def test_mismatched_key_type_rejected() -> None:
    public = ATTACKER_ED25519.public_key()
    with pytest.raises(ConfigurationError, match="cannot verify HS256"):
        KeySet("HS256", {"kid": public})
    with pytest.raises(ConfigurationError, match="cannot verify EdDSA"):
        KeySet("EdDSA", {"kid": b"s" * 32})


def test_jwks_hmac_key_ignored() -> None:
    document = '{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"EdDSA","kid":"x"}]}'
    with pytest.raises(ConfigurationError, match="invalid JWK"):
        keyset_from_jwks(document, "EdDSA")


@pytest.mark.parametrize("algorithm", ["ES256", "RS256", "HS256"])
async def test_other_algorithm_round_trip(algorithm: str) -> None:
    keys = hs256_keys(b"k" * 32) if algorithm == "HS256" else make_keys(algorithm)
    harness = await start_harness(settings(algorithm=algorithm), MemoryStore(), keys)
    try:
        assert jwt.get_unverified_header(harness.token)["alg"] == algorithm
        await assert_accepted(harness, harness.token)

        eddsa = jwt.encode(
            harness.claims(),
            ATTACKER_ED25519,
            algorithm="EdDSA",
            headers=harness.header(alg="EdDSA"),
        )
        await assert_token_rejected(harness, eddsa, Reason.TOKEN_BAD_SIGNATURE)
        await assert_token_rejected(
            harness, signature_byte_flipped(harness), Reason.TOKEN_BAD_SIGNATURE
        )
    finally:
        await stop_harness(harness)
