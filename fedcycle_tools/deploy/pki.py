"""What a deployment needs to be secure by default: a CA, the SuperLink's TLS certificate and
one authentication key pair per SuperNode (site).

    python -m fedcycle_tools.deploy certs --out deploy/secrets --host superlink.example.org \
        --host 203.0.113.7 --site hospital-a --site hospital-b

writes
    ca.crt, ca.key                 the CA (keep ca.key offline; sites get ca.crt only)
    superlink.crt, superlink.key   the SuperLink's certificate, with every --host as subjectAltName
    sites/<site>.key, <site>.pub   a site's ECDSA P-384 key pair in OpenSSH format; the site keeps
                                   the .key, the coordinator registers the .pub
    superexec/<owner>.secret       the secret a SuperLink or SuperNode shares with its SuperExec

Private keys are written with mode 0600 and are never to be committed (.gitignore covers them).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Pki:
    root: Path

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def superlink_cert(self) -> Path:
        return self.root / "superlink.crt"

    @property
    def superlink_key(self) -> Path:
        return self.root / "superlink.key"

    def site_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.key"

    def site_pub(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub"

    def superexec_secret(self, owner: str) -> Path:
        """Shared by the SuperLink (owner 'superlink') or a site's SuperNode and its SuperExec."""
        return write_secret(self.root / "superexec" / f"{owner}.secret")


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    os.fchmod(fd, mode)  # os.open's mode only applies to a file it creates: one rewritten keeps its old mode
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def write_secret(path: Path) -> Path:
    """A random 32-byte secret shared by a SuperLink or SuperNode and its SuperExec; kept if present."""
    if not path.exists():
        _write(path, secrets.token_bytes(32), private=True)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcycle"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_pki(out: Path, hosts: list[str], sites: list[str], days: int = 365) -> Pki:
    """The CA (reused if `out` has one), a SuperLink certificate for `hosts`, a key pair per site.

    Without `hosts`, an existing SuperLink certificate is kept (adding a site changes nothing else)."""
    pki = Pki(Path(out))
    if not hosts and not pki.superlink_cert.exists():
        raise ValueError("--host: give at least one host name or address that the sites dial")
    for site in sites:
        _check_site_name(site)
    ca_key, ca_cert = _ensure_ca(pki, days)
    if hosts:
        _superlink_cert(pki, ca_key, ca_cert, hosts, days)
    pki.superexec_secret("superlink")
    make_site_keys(pki, sites)
    return pki


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def _ensure_ca(pki: Pki, days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The existing CA, so that adding a site or a host later keeps the others valid; else a new one."""
    ca_key_path = pki.root / "ca.key"
    if pki.ca_cert.exists() and ca_key_path.exists():
        return (
            serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None),
            x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()),
        )
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcycle CA")).issuer_name(_name("fedcycle CA"))
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(key, hashes.SHA384())
    )
    _write(ca_key_path, _pem_key(key), private=True)
    _write(pki.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _superlink_cert(pki: Pki, ca_key, ca_cert: x509.Certificate, hosts: list[str], days: int) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    start, end = _validity(days)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write(pki.superlink_key, _pem_key(key), private=True)
    _write(pki.superlink_cert, cert.public_bytes(serialization.Encoding.PEM))


def _check_site_name(site: str) -> None:
    if not SITE_NAME.match(site):
        raise ValueError(f"--site {site!r}: use letters, digits, '.', '_' or '-' (at most 63)")


def make_site_keys(pki: Pki, sites: list[str]) -> None:
    """An ECDSA P-384 key pair per site, in OpenSSH format; an existing key is kept (it is the site's identity)."""
    for site in sites:
        _check_site_name(site)
        if pki.site_key(site).exists():
            continue
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write(pki.site_key(site), private, private=True)
        _write(pki.site_pub(site), public + f" {site}\n".encode())
        pki.superexec_secret(site)
