"""The server's TLS: its certificate (and client CA) read and checked, re-read on reload.

gRPC asks for certificates before handshakes (on a thread of its own): a reload reads
and checks the files, and the next handshake takes what it read, once. What does not
load is refused and what was in force stays.
"""

from __future__ import annotations

import contextlib
import ssl
import threading
from typing import Any

import grpc
import structlog

from controlplane._files import UnsafeFileError, read_guarded
from controlplane.server._config import ServerConfig, ServerConfigError

log = structlog.get_logger("controlplane.server")


class ServerTls:
    """The certificates of one server (``--tls-cert``, ``--tls-key``, ``--tls-client-ca``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._next: Any = None  # certificates read by a reload, for the next handshake
        self._http: ssl.SSLContext | None = None  # the HTTP listener's, once made
        self._lock = threading.Lock()

    def credentials(self) -> grpc.ServerCredentials | None:
        """The credentials to serve with; None without ``--tls-cert`` (plaintext).

        Raises:
            ServerConfigError: The options contradict each other or the files do not load.
        """
        config = self.config
        if config.tls_cert is None:
            if config.tls_key is not None or config.tls_client_ca is not None:
                raise ServerConfigError("--tls-key and --tls-client-ca need --tls-cert")
            return None
        if config.insecure:
            raise ServerConfigError("--insecure (plaintext) contradicts --tls-cert")
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._next_configuration,
            require_client_authentication=config.tls_client_ca is not None,
        )

    def reload(self) -> None:
        """Read the certificates again, for the handshakes to come.

        Raises:
            ServerConfigError: They do not load (the previous ones stay in force).
        """
        configuration = self._configuration()
        with self._lock:
            self._next = configuration
        if self._http is not None and self.config.tls_cert is not None:
            # Checked just above; the HTTP listener's next handshakes take it too.
            with contextlib.suppress(OSError, ssl.SSLError):
                self._http.load_cert_chain(self.config.tls_cert, self.config.tls_key)

    def http_context(self) -> ssl.SSLContext | None:
        """The TLS of the HTTP listener (``--http``), the same files as the gRPC port's:
        None without ``--tls-cert``; with ``--tls-client-ca``, client certificates that
        CA signed are required. A reload gives its next handshakes the new certificate
        (the client CA is the one read at start).

        Raises:
            ServerConfigError: The files do not load.
        """
        config = self.config
        if config.tls_cert is None:
            return None
        self._configuration()  # checked as for gRPC: ownership, key and certificate match
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])
        try:
            context.load_cert_chain(config.tls_cert, config.tls_key)
            if config.tls_client_ca is not None:
                context.load_verify_locations(cafile=config.tls_client_ca)
                context.verify_mode = ssl.CERT_REQUIRED
        except (OSError, ssl.SSLError) as exc:
            raise ServerConfigError(
                f"--tls-cert/--tls-key/--tls-client-ca cannot serve HTTP: {exc}"
            ) from None
        self._http = context
        return context

    def _configuration(self) -> Any:
        """The server certificate (and client CA), read once and checked as read."""
        config = self.config
        assert config.tls_cert is not None
        if config.tls_key is None:
            raise ServerConfigError("--tls-cert needs --tls-key (the certificate's private key)")
        try:
            key, warning = read_guarded(config.tls_key, "the TLS key (--tls-key)", secret=True)
            cert = config.tls_cert.read_bytes()
            ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
        except UnsafeFileError as exc:
            raise ServerConfigError(str(exc)) from None
        except OSError as exc:
            raise ServerConfigError(
                f"cannot read {exc.filename}: {exc.strerror or exc} (--tls-cert, --tls-key, "
                "--tls-client-ca)"
            ) from None
        if warning is not None:
            log.warning("secret_file_readable", file=str(config.tls_key), message=warning)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            # ssl loads a certificate chain only from files: check the files, then that
            # they still hold the bytes read (a rotation between the two is refused).
            context.load_cert_chain(config.tls_cert, config.tls_key)
            same = (config.tls_cert.read_bytes(), config.tls_key.read_bytes()) == (cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ServerConfigError(
                f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key}: cannot be used "
                f"together ({exc.strerror or exc})"
            ) from None
        if not same:
            raise ServerConfigError(
                f"--tls-cert {config.tls_cert} / --tls-key {config.tls_key} changed while "
                "being read: reload again once they are written"
            )
        if ca is not None:
            try:
                context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
            except (ValueError, ssl.SSLError) as exc:
                raise ServerConfigError(f"--tls-client-ca {config.tls_client_ca}: {exc}") from None
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def _next_configuration(self) -> Any:
        # Called by gRPC (on a thread of its own) before handshakes: certificates a
        # reload read, once.
        with self._lock:
            configuration, self._next = self._next, None
        return configuration
