"""Certificates and keys of a federation, made with ``cryptography``.

``fedcore federation certs --out certs/ --sites hospital-0,hospital-1`` writes::

    certs/ca.crt  certs/ca.key            the federation's CA (keep ca.key offline)
    certs/server.crt certs/server.key     the SuperLink's TLS certificate and key
    certs/sites.json                      what the coordinator registers and trusts:
                                          per site its SuperNode public key and its
                                          ledger-signing public key
    certs/<site>/ca.crt                   what a hospital installs: the CA to trust,
    certs/<site>/node.key node.pub        its SuperNode authentication key pair (EC P-384, SSH format,
                                          Flower's node authentication),
    certs/<site>/signing.key signing.pub  its own ledger-signing key (ECDSA P-256, PEM);
                                          the coordinator only ever sees signing.pub

Private keys are written with mode 0600. The coordinator's directory needs
``ca.crt``, ``server.crt``, ``server.key`` and ``sites.json``; a hospital's needs
only its own folder.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcore.errors import DataError
from fedcore.plugins.ledgers.keys import fingerprint, generate_private_key, public_pem

SITES_FILE = "sites.json"
SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_VALID_DAYS = 825


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcore federation"), x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def check_site_names(sites: Sequence[str]) -> list[str]:
    """Site names as given, refusing empty, duplicate or path-unsafe names."""
    names = [s.strip() for s in sites if s.strip()]
    if not names:
        raise DataError("no site names given", where="--sites", hint="give names, e.g. --sites hospital-0,hospital-1")
    for name in names:
        if not SITE_NAME.match(name) or name in {"server", "ca"}:
            raise DataError(
                f"site name '{name}' is not usable", where="--sites", hint="use letters, digits, '-', '_' or '.' (not 'server')"
            )
    if len(set(names)) != len(names):
        raise DataError("a site name is given twice", where="--sites", hint="give every hospital its own name")
    return names


@dataclass(frozen=True)
class FederationCerts:
    """Paths of a federation's certificates (as written by :func:`make_certs`)."""

    root: Path

    @property
    def ca(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def sites_file(self) -> Path:
        return self.root / SITES_FILE

    def site(self, name: str) -> Path:
        return self.root / name

    def registry(self) -> dict[str, dict[str, str]]:
        """``sites.json``: per site its node public key (SSH) and ledger-signing public key (PEM)."""
        try:
            return dict(json.loads(self.sites_file.read_text()))
        except (OSError, ValueError) as exc:
            raise DataError(
                f"cannot read the federation's site registry ({exc.__class__.__name__})",
                where=str(self.sites_file),
                hint="point --certs at the directory written by 'fedcore federation certs'",
            ) from exc


def make_certs(out: Path, sites: Sequence[str], hosts: Sequence[str] = ()) -> FederationCerts:
    """Write a CA, the SuperLink's TLS pair (valid for localhost and ``hosts``) and every site's keys."""
    names = check_site_names(sites)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcore federation CA"))
        .issuer_name(_name("fedcore federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcore SuperLink"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    certs = FederationCerts(Path(out))
    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(certs.ca, ca_pem)
    _write(certs.root / "ca.key", _pem_key(ca_key), private=True)
    _write(certs.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write(certs.server_key, _pem_key(server_key), private=True)
    registry: dict[str, dict[str, str]] = {}
    for name in names:
        folder = certs.site(name)
        node_key = ec.generate_private_key(ec.SECP384R1())
        node_pub = node_key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(folder / "ca.crt", ca_pem)
        _write(
            folder / "node.key",
            node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
            private=True,
        )
        _write(folder / "node.pub", node_pub + b"\n")
        signing = generate_private_key("ecdsa-p256")
        _write(folder / "signing.key", _pem_key(signing), private=True)  # type: ignore[arg-type]
        _write(folder / "signing.pub", public_pem(signing.public_key()).encode())
        registry[name] = {
            "node_public_key": node_pub.decode(),
            "signing_public_key": public_pem(signing.public_key()),
            "signing_fingerprint": fingerprint(signing.public_key()),
        }
    _write(certs.sites_file, json.dumps(registry, indent=1).encode())
    return certs
