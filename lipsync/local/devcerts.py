"""Development certificates (`lipsync-admin dev-certs --out DIR`, and the tests): a CA,
server certificates for both services and client certificates, made with the
`cryptography` package (the `tools` extra). For development and tests only: the CA key
lies next to the certificates; production certificates come from your PKI or
cert-manager (docs/SECURITY.md)."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

# The names the services are reached by: locally, in docker compose, in Kubernetes.
INFERENCE_NAMES = [
    "localhost",
    "inference",
    "lipsync-inference",
    "lipsync-inference.lipsync",
    "lipsync-inference.lipsync.svc",
    "lipsync-inference.lipsync.svc.cluster.local",
]
COMPOSITING_NAMES = [
    "localhost",
    "compositing",
    "lipsync-compositing",
    "lipsync-compositing.lipsync",
    "lipsync-compositing.lipsync.svc",
    "lipsync-compositing.lipsync.svc.cluster.local",
]
LOOPBACK = ["127.0.0.1", "::1"]


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes
    cert: object  # cryptography.x509.Certificate
    key: object  # the private key

    def write(self, out: Path, stem: str) -> tuple[Path, Path]:
        cert_path, key_path = out / f"{stem}.pem", out / f"{stem}-key.pem"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return cert_path, key_path


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _pems(cert, key) -> Issued:
    from cryptography.hazmat.primitives import serialization

    return Issued(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        cert,
        key,
    )


def make_ca(common_name: str = "lipsync development CA", days: int = 825) -> Issued:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
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
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _pems(cert, key)


def issue(
    ca: Issued,
    common_name: str,
    dns_names: list[str] | None = None,
    ips: list[str] | None = None,
    *,
    server: bool = True,
    client: bool = False,
    days: int = 397,
) -> Issued:
    """A certificate signed by `ca` for `common_name`, with SANs `dns_names` and `ips`,
    for TLS servers and/or clients (extended key usage)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = _key()
    now = dt.datetime.now(dt.UTC)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + (
        [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.cert.subject)  # type: ignore[attr-defined]
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),  # type: ignore[attr-defined]
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names or []]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips or []]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    return _pems(cert, key)


def write_dev_certs(out: str | Path, extra_names: list[str] | None = None) -> dict[str, Path]:
    """Write the development set into `out`; returns {file role: path}:

    ca.pem (+ ca-key.pem), inference.pem/-key.pem and compositing.pem/-key.pem (servers,
    SANs: localhost, 127.0.0.1, ::1, the compose and Kubernetes service names, and
    `extra_names`), compositing-client.pem/-key.pem (the compositing service's client
    certificate for the inference service), client.pem/-key.pem (a client of the
    compositing port, for when it requires client certificates: the gateway, scripts).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = list(extra_names or [])
    ca = make_ca()
    paths: dict[str, Path] = {}
    paths["ca"], paths["ca_key"] = ca.write(out, "ca")
    for stem, names in (("inference", INFERENCE_NAMES), ("compositing", COMPOSITING_NAMES)):
        cert = issue(ca, f"lipsync-{stem}", names + extra, LOOPBACK, server=True)
        paths[stem], paths[f"{stem}_key"] = cert.write(out, stem)
    client = issue(ca, "lipsync-compositing", server=False, client=True)
    paths["compositing_client"], paths["compositing_client_key"] = client.write(
        out, "compositing-client"
    )
    other = issue(ca, "lipsync-client", server=False, client=True)
    paths["client"], paths["client_key"] = other.write(out, "client")
    return paths
