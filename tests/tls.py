"""Certificates for the TLS tests, made on the spot: a CA, a server certificate for 127.0.0.1 and localhost, and a
client certificate, all signed by the CA (PEM files in a folder)."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tasks.local import Tls


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _write(folder: Path, stem: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    cert, private = folder / f"{stem}.crt", folder / f"{stem}.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert), str(private)


def _certificate(
    subject: str, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey, key: ec.EllipticCurvePrivateKey, ca: bool
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )


def make_tls(folder: Path, name: str = "tilerec-test-ca", mutual: bool = False) -> Tls:
    """A CA named `name` and the certificates it signed, in `folder`; `mutual`: with a client certificate.

    Returns:
        Tls: the files, for a RedisServer and its clients.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate(name, _name(name), ca_key, ca_key, ca=True).sign(ca_key, hashes.SHA256())
    ca_file, _ = _write(folder, "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    usage = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    server = (
        _certificate("127.0.0.1", ca.subject, ca_key, server_key, ca=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(usage, critical=False)  # a replica presents it to its master
        .sign(ca_key, hashes.SHA256())
    )
    cert, key = _write(folder, "server", server, server_key)
    if not mutual:
        return Tls(cert, key, ca_file)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = (
        _certificate("tilerec-client", ca.subject, ca_key, client_key, ca=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_cert, client_private = _write(folder, "client", client, client_key)
    return Tls(cert, key, ca_file, client_cert, client_private)
