"""A throwaway certificate authority for the local environment.

ECDSA P-256 keys throughout: they take milliseconds to make, and every consumer here (Go's
crypto/tls, Python's ssl, the API server's service-account token signer) accepts them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

# Backdated so that a component whose clock reads slightly behind still accepts fresh certificates.
_BACKDATE = datetime.timedelta(hours=1)
_VALIDITY = datetime.timedelta(days=365)


@dataclass(frozen=True)
class CertKey:
    """A PEM certificate and its PEM private key, as files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServiceAccountKeys:
    """The key pair the API server signs (private) and verifies (public) service-account tokens with."""

    private_key: Path
    public_key: Path


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _validity() -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.UTC)
    return now - _BACKDATE, now + _VALIDITY


@dataclass(frozen=True)
class CertificateAuthority:
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    files: CertKey

    @property
    def cert_file(self) -> Path:
        return self.files.cert

    @classmethod
    def create(cls, directory: Path, common_name: str = "checkpointer-local-ca") -> CertificateAuthority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        not_before, not_after = _validity()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        files = CertKey(directory / "ca.crt", directory / "ca.key")
        _write_cert(files.cert, cert)
        _write_key(files.key, key)
        return cls(cert, key, files)

    def _issue(
        self,
        directory: Path,
        name: str,
        subject: x509.Name,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> CertKey:
        key = _new_key()
        not_before, not_after = _validity()
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.private_key, hashes.SHA256())
        files = CertKey(directory / f"{name}.crt", directory / f"{name}.key")
        _write_cert(files.cert, cert)
        _write_key(files.key, key)
        return files

    def issue_server(self, directory: Path, name: str, hosts: Sequence[str]) -> CertKey:
        """A TLS serving certificate valid for `hosts` (DNS names and IP addresses, mixed)."""
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else name)])
        return self._issue(directory, name, subject, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def issue_client(self, directory: Path, name: str, user: str, groups: Sequence[str] = ()) -> CertKey:
        """A client certificate that Kubernetes reads as user `user` (CN) in `groups` (one O each)."""
        attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in groups]
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, user))
        return self._issue(directory, name, x509.Name(attributes), ExtendedKeyUsageOID.CLIENT_AUTH, [])


def create_service_account_keys(directory: Path) -> ServiceAccountKeys:
    key = _new_key()
    keys = ServiceAccountKeys(directory / "sa.key", directory / "sa.pub")
    _write_key(keys.private_key, key)
    keys.public_key.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return keys
