"""TLS and mutual TLS between clients, validators and the auth server."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import argon2
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from authgrpc.config import Settings
from authgrpc.keys import KeySet
from authgrpc.passwords import PasswordHasher
from authgrpc.server import AuthServer, start_server
from authgrpc.store import MemoryStore
from authgrpc.v1 import auth_pb2, auth_pb2_grpc
from authgrpc.validators import AsyncRemoteValidator

PASSWORD = "correct horse battery"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: bytes
    client_key: bytes
    stranger_cert: bytes
    stranger_key: bytes


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    ip: str | None = None,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("test CA", ca_key, None, ca_key, ca=True)
    other_ca_key = ec.generate_private_key(ec.SECP256R1())
    other_ca = _certificate("other CA", other_ca_key, None, other_ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate("auth", server_key, ca.subject, ca_key, ip="127.0.0.1")
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _certificate("greeter", client_key, ca.subject, ca_key)
    stranger_key = ec.generate_private_key(ec.SECP256R1())
    stranger = _certificate("stranger", stranger_key, other_ca.subject, other_ca_key)
    (directory / "ca.pem").write_bytes(_pem(ca))
    (directory / "server.pem").write_bytes(_pem(server))
    (directory / "server.key").write_bytes(_key_pem(server_key))
    return Pki(
        ca=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
        client_cert=_pem(client),
        client_key=_key_pem(client_key),
        stranger_cert=_pem(stranger),
        stranger_key=_key_pem(stranger_key),
    )


async def _serve(settings: Settings, keys: KeySet) -> AuthServer:
    store = MemoryStore()
    hasher = PasswordHasher(
        argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    )
    server = await start_server(settings, store=store, keys=keys, hasher=hasher)
    await store.create_user("alice", hasher.hash_sync(PASSWORD), ())
    return server


@pytest.fixture
async def mutual_tls_server(pki: Pki, keys: KeySet) -> AsyncIterator[AuthServer]:
    settings = Settings(
        listen="127.0.0.1:0",
        dev=True,
        tls_cert=pki.server_cert,
        tls_key=pki.server_key,
        tls_client_ca=pki.ca,
    )
    server = await _serve(settings, keys)
    yield server
    await server.stop(0)


@pytest.fixture
async def tls_server(pki: Pki, keys: KeySet) -> AsyncIterator[AuthServer]:
    settings = Settings(
        listen="127.0.0.1:0", dev=True, tls_cert=pki.server_cert, tls_key=pki.server_key
    )
    server = await _serve(settings, keys)
    yield server
    await server.stop(0)


async def _login(address: str, credentials: grpc.ChannelCredentials | None) -> object:
    channel = (
        grpc.aio.secure_channel(address, credentials)
        if credentials is not None
        else grpc.aio.insecure_channel(address)
    )
    async with channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        request = auth_pb2.LoginRequest(username="alice", password=PASSWORD)
        return await stub.Login(request, timeout=5)


async def test_tls_login_succeeds(tls_server: AuthServer, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())

    response = await _login(tls_server.address, credentials)

    assert isinstance(response, auth_pb2.LoginResponse)
    assert response.session.username == "alice"


async def test_plaintext_client_rejected(tls_server: AuthServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _login(tls_server.address, None)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_needs_client_cert(
    mutual_tls_server: AuthServer, pki: Pki
) -> None:
    without_cert = grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes())

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _login(mutual_tls_server.address, without_cert)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_rejects_foreign_cert(
    mutual_tls_server: AuthServer, pki: Pki
) -> None:
    stranger = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.stranger_key,
        certificate_chain=pki.stranger_cert,
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _login(mutual_tls_server.address, stranger)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_remote_validator_over_mutual_tls(
    mutual_tls_server: AuthServer, pki: Pki
) -> None:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=pki.client_key,
        certificate_chain=pki.client_cert,
    )
    login = await _login(mutual_tls_server.address, credentials)
    assert isinstance(login, auth_pb2.LoginResponse)
    validator = AsyncRemoteValidator(mutual_tls_server.address, credentials=credentials)

    try:
        validation = await validator.validate(login.access_token)
    finally:
        await validator.close()

    assert validation.principal.username == "alice"
    assert validation.session.session_id == login.session.session_id
