"""TLS for the gRPC ports: server credentials that re-read their PEM files when they change
(certificate rotation without a restart), channel credentials for clients, and the
plaintext health-only port Kubernetes' gRPC probes need (they cannot speak TLS).
docs/SECURITY.md describes the settings."""

from __future__ import annotations

import logging
import os
import ssl
import threading
from concurrent import futures
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from grpc_health.v1 import health

    from lipsync.config import ClientTLSConfig, TLSConfig

log = logging.getLogger(__name__)


class TLSConfigError(ValueError):
    """A TLS setting names files that are missing or do not fit together."""


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TLSConfigError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _check_pair(cert_file: str, key_file: str, ca_file: str | None) -> None:
    """Refuse a certificate that does not match its key, or an unreadable CA (the check
    Python's ssl module makes; grpc's own errors would only show at the handshake)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(cert_file, key_file)
        if ca_file:
            ctx.load_verify_locations(ca_file)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"TLS files {cert_file}, {key_file}: {exc}") from None


class _CertificateFiles:
    """The server's certificate configuration, re-read when a file's mtime or size
    changes. grpc calls `fetch` before handshakes; None keeps the current one. A new
    set that does not load (a rotation half written) keeps the old one, with a warning."""

    def __init__(self, cert_file: str, key_file: str, client_ca_file: str | None):
        self.files = [f for f in (cert_file, key_file, client_ca_file) if f]
        self.cert_file, self.key_file, self.client_ca_file = cert_file, key_file, client_ca_file
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.reloads = 0

    def _stat(self) -> tuple[tuple[int, int], ...]:
        out = []
        for f in self.files:
            try:
                st = os.stat(f)
                out.append((st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((-1, -1))
        return tuple(out)

    def load(self) -> grpc.ServerCertificateConfiguration:
        _check_pair(self.cert_file, self.key_file, self.client_ca_file)
        cert = _read(self.cert_file, "certificate")
        key = _read(self.key_file, "private key")
        ca = _read(self.client_ca_file, "client CA") if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp:
                return None
            try:
                config = self.load()
            except TLSConfigError as exc:
                log.warning("TLS files changed but do not load (keeping the old ones): %s", exc)
                return None
            self._stamp = stamp
            self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert_file)
        return config


def server_credentials(
    cert_file: str | None, key_file: str | None, client_ca_file: str | None = None
) -> grpc.ServerCredentials | None:
    """Credentials for a server port; None (plaintext) without `cert_file`. With
    `client_ca_file`, only clients presenting a certificate that CA signed connect."""
    if not cert_file:
        if key_file or client_ca_file:
            raise TLSConfigError("tls.key_file / client_ca_file need tls.cert_file")
        return None
    if not key_file:
        raise TLSConfigError("tls.cert_file needs tls.key_file")
    files = _CertificateFiles(cert_file, key_file, client_ca_file)
    return grpc.dynamic_ssl_server_credentials(
        files.load(), files.fetch, require_client_authentication=bool(client_ca_file)
    )


def server_credentials_of(tls: TLSConfig) -> grpc.ServerCredentials | None:
    return server_credentials(tls.cert_file, tls.key_file, tls.client_ca_file)


def channel_credentials(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> grpc.ChannelCredentials | None:
    """Credentials for a client channel; None (plaintext) without `ca_file`. With
    `cert_file` and `key_file`, the client presents that certificate (mutual TLS).
    Read once: a client certificate rotated on disk is used by channels made after."""
    if not ca_file:
        if cert_file or key_file:
            raise TLSConfigError("a client certificate needs the CA file of the server too")
        return None
    if bool(cert_file) != bool(key_file):
        raise TLSConfigError("a client certificate needs both cert_file and key_file")
    if cert_file and key_file:
        _check_pair(cert_file, key_file, ca_file)
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_file, "CA"),
        private_key=_read(key_file, "private key") if key_file else None,
        certificate_chain=_read(cert_file, "certificate") if cert_file else None,
    )


def channel_credentials_of(tls: ClientTLSConfig) -> grpc.ChannelCredentials | None:
    return channel_credentials(tls.ca_file, tls.cert_file, tls.key_file)


def serve_health_port(
    health_servicer: health.HealthServicer, host: str, port: int
) -> grpc.Server | None:
    """A plaintext server on `port` with only the grpc.health.v1 service (the same
    servicer, so it reports what the TLS port reports); None when `port` is 0."""
    if not port:
        return None
    from grpc_health.v1 import health_pb2_grpc  # the services' extra

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"),
        options=[("grpc.so_reuseport", 0)],
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"{host}:{port}") == 0:
        raise OSError(f"could not bind the health port {host}:{port}")
    server.start()
    log.info("health-only port %s:%d (plaintext)", host, port)
    return server
