"""TLS certificates for a deployment: a certificate authority and a server certificate.

Generated with the ``cryptography`` package (never by hand): an ECDSA P-256 CA, self-signed,
and a server certificate it signs for the SuperLink's host names and addresses (subject
alternative names). The SuperLink presents the server certificate; every SuperNode and the
``flwr`` command verify it against the CA (``--root-certificates``). The CA's private key
signs nothing else and can be deleted once the server certificate exists.
"""

from __future__ import annotations

import datetime
import ipaddress
import pathlib
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


class Certificates(NamedTuple):
    """Paths of the PEM files :func:`generate` writes.

    Attributes:
      ca_cert: the CA certificate (``--root-certificates`` of SuperNodes, ``--ssl-ca-certfile``
        of the SuperLink, ``root-certificates`` of the ``flwr`` connection).
      server_cert: the SuperLink's certificate, signed by the CA.
      server_key: the SuperLink's private key (mode 0600).
    """

    ca_cert: pathlib.Path
    server_cert: pathlib.Path
    server_key: pathlib.Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def generate(
    directory, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), *, valid_days: int = 30
) -> Certificates:
    """Write ``ca.pem``, ``server.pem`` and ``server.key`` into ``directory``.

    Args:
      directory: output folder (created).
      hosts: names and IP addresses the server certificate is valid for (its subject
        alternative names); a SuperNode connecting to another name fails the TLS handshake.
      valid_days: validity of both certificates, from now.

    Returns:
      :class:`Certificates`.

    Examples:
      >>> import tempfile
      >>> from cryptography import x509
      >>> from fljax.deploy import certs
      >>> paths = certs.generate(tempfile.mkdtemp())
      >>> server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
      >>> ca = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
      >>> server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
      >>> sorted(str(ip) for ip in server.extensions.get_extension_for_class(
      ...     x509.SubjectAlternativeName).value.get_values_for_type(x509.IPAddress))
      ['127.0.0.1']
    """
    if not hosts:
        raise ValueError("hosts must name at least one host name or IP address")
    if valid_days < 1:
        raise ValueError(f"valid_days must be >= 1, got {valid_days}")
    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=valid_days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("fljax deployment CA")
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Certificates(out / "ca.pem", out / "server.pem", out / "server.key")
    paths.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths.server_key.touch(mode=0o600)
    paths.server_key.write_bytes(_pem_key(server_key))
    return paths
