"""The gateway's TLS credentials, with certificate rotation: the certificate, key and client-CA files
are read again whenever they change, before the next client's handshake, so a renewed certificate
takes effect without a restart. Connections already open keep the certificate they began with.
"""

from __future__ import annotations

import logging
import ssl
import threading

import grpc

from common.settings import FileStamp, file_stamps, read_file

from .config import GatewaySettings

log = logging.getLogger(__name__)

Stamp = tuple[FileStamp, ...]


class CertificateFiles:
    """The TLS files a gateway serves with, and what they held when last read."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.cert_file = settings.tls_cert_file
        self.key_file = settings.tls_key_file
        self.client_ca_file = settings.tls_client_ca_file
        self._lock = threading.Lock()  # gRPC asks from its own threads
        self._stamp = self._stat()
        self._refused: Stamp | None = None
        self.initial = self._read()

    @property
    def mutual(self) -> bool:
        return bool(self.client_ca_file)

    def credentials(self) -> grpc.ServerCredentials:
        """Server credentials that pick up changed files (mutual TLS when a client CA is set)."""
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch, require_client_authentication=self.mutual)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called before each new handshake: a new configuration when the files changed and make a
        valid pair, else None (keep the current one). A bad pair (say, a certificate renewed before
        its key) is logged once and tried again when the files change again."""
        stamp = self._stat()
        with self._lock:
            if stamp == self._stamp or stamp == self._refused:
                return None
            try:
                ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(self.cert_file, self.key_file)
                config = self._read()
            except (OSError, ValueError, ssl.SSLError) as exc:
                self._refused = stamp
                log.error("TLS files changed but cannot be used (%s); serving the previous certificate", exc)
                return None
            self._stamp = stamp
            log.info("TLS files changed: serving the new certificate to new connections")
            return config

    def _read(self) -> grpc.ServerCertificateConfiguration:
        client_ca = read_file("tls_client_ca_file", self.client_ca_file)
        return grpc.ssl_server_certificate_configuration(
            [(read_file("tls_key_file", self.key_file), read_file("tls_cert_file", self.cert_file))],
            root_certificates=client_ca or None,
        )

    def _stat(self) -> Stamp:
        return file_stamps(self.cert_file, self.key_file, self.client_ca_file)
