"""Certificates the control plane trusts: signed by one CA, with the right names."""

import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from joule.cluster import pki


def _load(path):
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificates_are_signed_by_the_ca_and_name_their_holders(tmp_path):
    keys = pki.generate(tmp_path, "10.96.0.1", {"admin": pki.ADMIN, "scheduler": pki.SCHEDULER})
    ca = _load(keys.ca.cert)
    for pair in (keys.serving, keys.clients["admin"], keys.clients["scheduler"]):
        cert = _load(pair.cert)
        cert.verify_directly_issued_by(ca)

    admin = _load(keys.clients["admin"].cert).subject
    assert admin.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "joule-admin"
    assert admin.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    scheduler = _load(keys.clients["scheduler"].cert).subject
    assert scheduler.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "system:kube-scheduler"


def test_serving_certificate_covers_loopback_and_the_service_ip(tmp_path):
    keys = pki.generate(tmp_path, "10.96.0.1", {})
    sans = (
        _load(keys.serving.cert)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    ips = sans.get_values_for_type(x509.IPAddress)
    assert ipaddress.ip_address("127.0.0.1") in ips
    assert ipaddress.ip_address("10.96.0.1") in ips
    assert "kubernetes.default.svc" in sans.get_values_for_type(x509.DNSName)


def test_private_keys_are_not_readable_by_others(tmp_path):
    keys = pki.generate(tmp_path, "10.96.0.1", {"admin": pki.ADMIN})
    for path in (
        keys.ca.key,
        keys.serving.key,
        keys.clients["admin"].key,
        keys.service_account_key,
    ):
        assert path.stat().st_mode & 0o077 == 0, path


def test_service_account_key_pair_matches(tmp_path):
    from cryptography.hazmat.primitives import serialization

    keys = pki.generate(tmp_path, "10.96.0.1", {})
    private = serialization.load_pem_private_key(keys.service_account_key.read_bytes(), None)
    public = serialization.load_pem_public_key(keys.service_account_pub.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert private.public_key().public_numbers() == public.public_numbers()
