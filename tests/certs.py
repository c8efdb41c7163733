"""Certificates for TLS tests, made with `cryptography`: a CA, a server certificate for 127.0.0.1 and
localhost, and a client certificate, written as PEM files into a folder. Nothing is downloaded and
nothing outlives the test's folder.

    pki = make_pki(tmp_path)
    grpc.ssl_server_credentials([(pki.read("server_key"), pki.read("server_cert"))],
                                root_certificates=pki.read("ca"), require_client_auth=True)
    DepthClient(f"127.0.0.1:{port}", tls_ca=pki.ca, tls_cert=pki.client_cert, tls_key=pki.client_key)
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_HOSTS = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class Pki:
    """The PEM files of one CA and the two certificates it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def read(self, name: str) -> bytes:
        """A file's bytes by its field name: "ca", "server_cert", "server_key", "client_cert", "client_key"."""
        path: Path = getattr(self, name)
        return path.read_bytes()


def make_pki(folder: Path, *, name: str = "depthd test", hosts: tuple[str, ...] = SERVER_HOSTS, days: int = 1) -> Pki:
    """A CA named `name`, a server certificate whose subjectAltName holds each of `hosts` (IP addresses as
    IP entries, names as DNS entries), and a client certificate, valid for `days`, written into `folder`
    (created if needed) as ca.pem, server.pem, server.key, client.pem, client.key. Keys are EC P-256."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"{name} CA")
    ca = (
        _builder(ca_name, ca_name, ca_key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server_key, server = _leaf(ca, ca_key, f"{name} server", days, ExtendedKeyUsageOID.SERVER_AUTH, hosts)
    client_key, client = _leaf(ca, ca_key, f"{name} client", days, ExtendedKeyUsageOID.CLIENT_AUTH, ())
    pki = Pki(
        ca=folder / "ca.pem",
        server_cert=folder / "server.pem",
        server_key=folder / "server.key",
        client_cert=folder / "client.pem",
        client_key=folder / "client.key",
    )
    _write(pki.ca, ca.public_bytes(serialization.Encoding.PEM))
    _write(pki.server_cert, server.public_bytes(serialization.Encoding.PEM))
    _write(pki.server_key, _private_pem(server_key))
    _write(pki.client_cert, client.public_bytes(serialization.Encoding.PEM))
    _write(pki.client_key, _private_pem(client_key))
    return pki


def _leaf(
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    days: int,
    usage: x509.ObjectIdentifier,
    hosts: tuple[str, ...],
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        _builder(_name(common_name), ca.subject, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(host) for host in hosts]), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _builder(subject: x509.Name, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _write(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    if path.suffix == ".key":
        path.chmod(0o600)
