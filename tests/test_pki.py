"""What `python -m fedcycle_tools.deploy certs` writes: a CA, a SuperLink certificate, site key pairs."""

from __future__ import annotations

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)

from fedcycle_tools.deploy.__main__ import main
from fedcycle_tools.deploy.pki import make_pki


def test_certs_command_writes_a_working_pki(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path), "--host", "superlink.example.org", "--host", "203.0.113.7",
                 "--site", "hospital-a", "--site", "hospital-b"]) == 0
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["superlink.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.7")]
    for site in ("hospital-a", "hospital-b"):
        key = load_ssh_private_key((tmp_path / "sites" / f"{site}.key").read_bytes(), password=None)
        pub = load_ssh_public_key((tmp_path / "sites" / f"{site}.pub").read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
    for private in ("ca.key", "superlink.key", "sites/hospital-a.key", "superexec/superlink.secret", "superexec/hospital-a.secret"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600, private
    assert "register on the coordinator" in capsys.readouterr().out


def test_adding_a_site_keeps_the_ca_the_certificate_and_the_other_sites_keys(tmp_path):
    make_pki(tmp_path, ["localhost"], ["a"])
    ca, key_a = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "sites" / "a.key").read_bytes()
    cert = (tmp_path / "superlink.crt").read_bytes()
    assert main(["certs", "--out", str(tmp_path), "--site", "b"]) == 0  # no --host: the certificate stays
    assert (tmp_path / "superlink.crt").read_bytes() == cert and (tmp_path / "sites" / "b.key").exists()
    (tmp_path / "superlink.key").chmod(0o644)  # loosened by hand, say; it is rewritten 0600 with the new certificate
    make_pki(tmp_path, ["localhost", "new.example.org"], ["a", "c"])
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "sites" / "a.key").read_bytes() == key_a
    assert (tmp_path / "superlink.crt").read_bytes() != cert
    assert stat.S_IMODE((tmp_path / "superlink.key").stat().st_mode) == 0o600


def test_bad_names_are_refused_before_anything_is_written(tmp_path, capsys):
    assert main(["certs", "--out", str(tmp_path / "x"), "--host", "h", "--site", "bad/name"]) == 2
    assert "--site 'bad/name'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--host"):
        make_pki(tmp_path / "fresh", [], ["a"])
