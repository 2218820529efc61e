"""How the store reaches etcd: endpoints, TLS files and an etcd user."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import structlog

from controlplane._files import UnsafeFileError, read_guarded
from controlplane.errors import EtcdAccessError

__all__ = ["EtcdSecurity", "normalize_endpoints"]

log = structlog.get_logger("controlplane.store")


@dataclass(frozen=True, slots=True)
class EtcdSecurity:
    """How the store reaches etcd securely: TLS files and an etcd user.

    Every field is optional; the command-line option each one stands for is named
    in the errors. Files are read when the store connects, not here.

    Attributes:
        ca: CA certificate (PEM) that etcd's server certificate must chain to
            (``--etcd-ca``); ``None`` with ``cert`` uses the system's roots.
        cert: Client certificate (PEM) for etcd's ``--client-cert-auth`` (``--etcd-cert``).
        key: The client certificate's private key (PEM) (``--etcd-key``).
        user: etcd user name (``--etcd-user``).
        password: That user's password (``--etcd-password-file`` or ``CONTROLPLANE_ETCD_PASSWORD``);
            never shown in a repr.
        server_name: The name to expect in etcd's certificate instead of the endpoint's
            host (``--etcd-server-name``), e.g. when endpoints are IP addresses.

    Raises:
        ValueError: An option that needs another one alone, or an empty value.
    """

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        for name in ("ca", "cert", "key"):
            value = getattr(self, name)
            if isinstance(value, str):
                # Accept str paths (click and environment variables give str).
                object.__setattr__(self, name, Path(value))
        if self.cert is not None and self.key is None:
            raise ValueError("--etcd-cert needs --etcd-key (the client certificate's key)")
        if self.key is not None and self.cert is None:
            raise ValueError("--etcd-key needs --etcd-cert (the client certificate)")
        if self.user is not None and not self.user:
            raise ValueError("--etcd-user is empty")
        if self.user is not None and self.password is None:
            raise ValueError(
                f"--etcd-user {self.user!r} needs a password "
                "(--etcd-password-file or CONTROLPLANE_ETCD_PASSWORD)"
            )
        if self.password is not None and self.user is None:
            raise ValueError("an etcd password needs --etcd-user")
        if self.password is not None and not self.password:
            raise ValueError("the etcd password is empty")
        if self.server_name is not None and not self.server_name:
            raise ValueError("--etcd-server-name is empty")
        if self.server_name is not None and not self.uses_tls:
            raise ValueError(
                "--etcd-server-name needs TLS: give --etcd-ca (or --etcd-cert and --etcd-key)"
            )

    @property
    def uses_tls(self) -> bool:
        """Whether the channels to etcd use TLS (a CA or a client certificate is given)."""
        return self.ca is not None or self.cert is not None

    @property
    def uses_auth(self) -> bool:
        """Whether calls carry an etcd user's token."""
        return self.user is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Read the TLS files and build gRPC channel credentials.

        Raises:
            EtcdAccessError: A file cannot be read or holds no PEM block of its kind.
        """
        ca = _read_pem(self.ca, "--etcd-ca", b"CERTIFICATE") if self.ca else None
        cert = _read_pem(self.cert, "--etcd-cert", b"CERTIFICATE") if self.cert else None
        key = _read_pem(self.key, "--etcd-key", b"PRIVATE KEY") if self.key else None
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )


def _read_pem(path: Path, option: str, kind: bytes) -> bytes:
    try:
        if kind == b"PRIVATE KEY":
            data, warning = read_guarded(path, f"the {option} file", secret=True)
            if warning is not None:
                log.warning("secret_file_readable", file=str(path), message=warning)
        else:
            data = path.read_bytes()
    except UnsafeFileError as exc:
        raise EtcdAccessError(str(exc)) from None
    except OSError as exc:
        raise EtcdAccessError(f"cannot read {option} file {path}: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data or kind + b"-----" not in data:
        # Never quote the content: it may be a private key.
        raise EtcdAccessError(
            f"{option} file {path} holds no PEM {kind.decode().lower()} "
            f"(-----BEGIN ...{kind.decode()}-----)"
        )
    return data


def normalize_endpoints(endpoints: Sequence[str], *, tls: bool = False) -> list[str]:
    """``host:port`` endpoints from a list that may carry ``http://`` (etcd's URL form).

    With ``tls`` (the store has TLS settings) endpoints may be ``https://`` URLs and
    ``http://`` ones are refused; without it the reverse.
    """
    cleaned = []
    for raw in endpoints:
        endpoint = raw.strip()
        if not endpoint:
            continue
        if endpoint.startswith("https://") and not tls:
            raise ValueError(
                f"etcd endpoint {endpoint!r}: TLS to etcd needs --etcd-ca "
                "(or --etcd-cert and --etcd-key)"
            )
        if endpoint.startswith("http://") and tls:
            raise ValueError(
                f"etcd endpoint {endpoint!r} is plaintext but TLS to etcd is configured: "
                "use https:// or host:port"
            )
        endpoint = endpoint.removeprefix("https://" if tls else "http://").rstrip("/")
        host, sep, port = endpoint.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"etcd endpoint {raw!r} is not host:port")
        cleaned.append(endpoint)
    if not cleaned:
        raise ValueError("no etcd endpoint given")
    return cleaned
