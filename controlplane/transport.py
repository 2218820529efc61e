"""How clients reach the control server: TLS, mutual TLS, bearer tokens, plaintext rules.

Shared by ``cpctl``, the agent SDK and the ``cp-agent`` sidecar (and used by the server
for its own listen address). It imports only the standard library, and grpc when a
channel or credentials are made, so that the SDK pulls in nothing of the server and
``import agents`` no gRPC.

Plaintext is allowed without asking only to loopback addresses (127.0.0.0/8, ::1,
``localhost``, unix sockets); anything else needs TLS or an explicit ``insecure``.

Each client calls the settings its own way (``--tls-ca`` in ``cpctl``, ``tls_ca`` /
``CONTROLPLANE_TLS_CA`` in the SDK): a :class:`TransportConfigError` keeps its message
as a template whose ``{ca}``-style placeholders :meth:`TransportConfigError.render`
fills with the client's names (:data:`SETTINGS` lists them).

Validation happens at construction: contradictions, the token, and every file named
(readable, not empty, PEM of the right kind). The files are read again for each new
channel (certificates) and each call of :meth:`ClientSecurity.metadata` (the token
file), so that rotated files are picked up without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controlplane._files import UnsafeFileError, read_guarded

if TYPE_CHECKING:
    import grpc
    import grpc.aio

AUTHORIZATION = "authorization"
"""The metadata key tokens travel in, as ``Bearer <token>``."""

SETTINGS = ("token", "token_file", "tls", "ca", "cert", "key", "server_name", "insecure")
"""The settings of :class:`ClientSecurity`: the placeholders of error templates."""

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "ip6-localhost", "ip6-loopback"})
MAX_TOKEN_CHARS = 4096
# A token goes into an HTTP/2 header: visible ASCII, no spaces.
_TOKEN_RE = re.compile(r"[\x21-\x7e]+")
_PLACEHOLDER_RE = re.compile(r"\{(\w+)\}")
_PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")


class TransportConfigError(ValueError):
    """A connection setting is missing, contradictory or unreadable; the message names it.

    Args:
        template: The message, with ``{setting}`` placeholders for the settings it
            concerns (see :data:`SETTINGS`) and ``{name}`` ones for ``values``.
        values: Text put into the message as it is (paths, targets, OS errors).

    ``str(error)`` names the settings as :class:`ClientSecurity` does (``ca``,
    ``token_file``); :meth:`render` as a client does.
    """

    def __init__(self, template: str, **values: str) -> None:
        self.template = template
        self.values = values
        self.settings = tuple(
            dict.fromkeys(m for m in _PLACEHOLDER_RE.findall(template) if m in SETTINGS)
        )
        """The settings the error concerns, in the order the message names them."""
        super().__init__(self.render())

    def render(self, names: Mapping[str, str] | None = None) -> str:
        """The message, each setting called by ``names[setting]`` (its own name if absent)."""
        labels = {**{s: s for s in SETTINGS}, **(names or {}), **self.values}
        # One pass: a path or a target holding braces is left as it is.
        return _PLACEHOLDER_RE.sub(lambda m: labels.get(m[1], m[0]), self.template)


def _split_host(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, ``host`` or ``[v6]``."""
    address = address.strip()
    if address.startswith("["):
        return address[1 : address.index("]")] if "]" in address else address[1:]
    if address.count(":") > 1:  # a bare IPv6 address
        return address
    return address.rpartition(":")[0] if ":" in address else address


def _dns_parts(rest: str) -> tuple[str, str]:
    """The DNS server (authority, "" for the system's) and the host of a ``dns:`` target."""
    if not rest.startswith("//"):
        return "", _split_host(rest)
    authority, _, name = rest[2:].partition("/")
    return authority, _split_host(name)


def target_hosts(target: str) -> list[str]:
    """The hosts a gRPC target names; ``["unix"]`` for unix sockets.

    Understands ``host:port``, ``[::1]:port``, ``dns:///host:port``, ``dns:host:port``,
    ``dns://authority/host:port``, ``ipv4:a:p,b:p``, ``ipv6:[a]:p,[b]:p`` and
    ``unix:path`` / ``unix://path``.
    """
    target = target.strip()
    scheme, sep, rest = target.partition(":")
    if sep and scheme in ("unix", "unix-abstract"):
        return ["unix"]
    if sep and scheme == "dns":
        return [_dns_parts(rest)[1]]
    if sep and scheme in ("ipv4", "ipv6"):
        return [_split_host(part) for part in rest.split(",") if part.strip()]
    return [_split_host(target)]


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` is a loopback address or name (``unix`` counts: a local socket)."""
    host = host.strip().lower()
    if host in _LOOPBACK_NAMES or host == "unix":
        return True
    return _is_loopback_ip(host)


def _is_loopback_ip(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def is_loopback_target(target: str) -> bool:
    """Whether every address ``target`` names is on loopback.

    A name resolved by a DNS server the target names (``dns://8.8.8.8/localhost:1``)
    is not: that server may answer anything; only an IP address counts then.
    """
    scheme, sep, rest = target.strip().partition(":")
    if sep and scheme == "dns":
        authority, host = _dns_parts(rest)
        return _is_loopback_ip(host) if authority else is_loopback_host(host)
    hosts = target_hosts(target)
    return bool(hosts) and all(is_loopback_host(h) for h in hosts)


def validate_token(token: str, source: str = "{token}", **values: str) -> str:
    """``token`` without surrounding whitespace and ``Bearer `` prefix, or an error.

    Args:
        token: The token as given.
        source: What the error calls it (a template, see :class:`TransportConfigError`).
        values: Values for ``source``'s placeholders.

    Raises:
        TransportConfigError: It is empty, too long, or holds a space, a control
            character or a character outside ASCII (it travels in an HTTP/2 header).
            The message never shows the token.
    """
    token = token.strip()
    if token.lower() == "bearer":
        token = ""
    elif token[:7].lower() == "bearer " or token[:7].lower() == "bearer\t":
        token = token[7:].strip()
    if not token:
        raise TransportConfigError(f"{source} is empty", **values)
    if len(token) > MAX_TOKEN_CHARS:
        raise TransportConfigError(
            f"{source} is longer than {MAX_TOKEN_CHARS} characters", **values
        )
    if not _TOKEN_RE.fullmatch(token):
        raise TransportConfigError(
            f"{source} must be visible ASCII characters only: no spaces, line breaks or "
            "control characters inside it",
            **values,
        )
    return token


_warned: set[str] = set()
"""Secret files already warned of (the token file is read at every call)."""


def _read(path: Path, setting: str, what: str, *, secret: bool = False) -> bytes:
    try:
        if secret:
            data, warning = read_guarded(path, f"the {what}", secret=True)
            if warning is not None and str(path) not in _warned:
                _warned.add(str(path))
                logging.getLogger("controlplane.transport").warning("%s", warning)
        else:
            data = path.read_bytes()
    except UnsafeFileError as exc:
        raise TransportConfigError(f"{{{setting}}}: {{message}}", message=str(exc)) from None
    except OSError as exc:
        raise TransportConfigError(
            f"cannot read {{{setting}}} {{path}} ({what}): {{error}}",
            path=str(path),
            error=str(exc.strerror or exc),
        ) from None
    if not data.strip():
        raise TransportConfigError(f"{{{setting}}} {{path}} ({what}) is empty", path=str(path))
    return data


def _read_pem(path: Path, setting: str, what: str) -> bytes:
    data = _read(path, setting, what, secret=setting == "key")
    if setting == "key":
        ok, expected = _PEM_PRIVATE_KEY.search(data) is not None, "-----BEGIN PRIVATE KEY-----"
    else:
        ok, expected = _PEM_CERTIFICATE in data, _PEM_CERTIFICATE.decode()
    if not ok:
        raise TransportConfigError(
            f"{{{setting}}} {{path}} ({what}) is not PEM: no {{expected}} in it",
            path=str(path),
            expected=expected,
        )
    return data


@dataclass(frozen=True)
class ClientSecurity:
    """A client's connection settings, validated at construction.

    Attributes:
        token: A bearer token (never printed: excluded from ``repr``).
        token_file: A file holding the token, read again for each new connection
            (so a rotated token is picked up without a restart).
        tls: Use TLS even without ``ca`` (the system's roots then verify the server).
        ca: The CA bundle (PEM) that verifies the server; implies TLS.
        cert: This client's certificate (PEM) for mutual TLS; needs ``key``; implies TLS.
        key: Its private key (PEM).
        server_name: The name to verify the server's certificate against, when it
            differs from the target's host; needs TLS.
        insecure: Allow plaintext to an address that is not on loopback.

    Raises:
        TransportConfigError: contradictory settings (a token and a token file, a
            certificate without its key, insecure with TLS, a server name without
            TLS), an invalid token, or a file that cannot be read or is not what it
            should be.
    """

    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    insecure: bool = False

    def __post_init__(self) -> None:
        if self.token is not None and self.token_file is not None:
            raise TransportConfigError("give {token} or {token_file}, not both")
        if self.token is not None:
            object.__setattr__(self, "token", validate_token(self.token))
        if self.cert is not None and self.key is None:
            raise TransportConfigError("{cert} (a client certificate) needs its {key}")
        if self.key is not None and self.cert is None:
            raise TransportConfigError("{key} (a client key) needs its certificate: {cert}")
        if self.server_name is not None and not self.server_name.strip():
            raise TransportConfigError("{server_name} is empty")
        if self.insecure and self.uses_tls:
            given = [s for s in ("tls", "ca", "cert") if getattr(self, s)]
            raise TransportConfigError(
                "{insecure} (plaintext) contradicts "
                + " and ".join(f"{{{s}}}" for s in given)
                + " (TLS): give one or the other"
            )
        if self.server_name is not None and not self.uses_tls:
            raise TransportConfigError(
                "{server_name} applies to TLS only: add {tls} or {ca}, or leave it out"
            )
        # Fail now rather than at the first connection: the files must be usable.
        self.bearer()
        self._pem_files()

    @property
    def uses_tls(self) -> bool:
        """Whether connections use TLS."""
        return self.tls or self.ca is not None or self.cert is not None

    def check_target(self, target: str) -> None:
        """Refuse plaintext to an address off loopback unless ``insecure`` was chosen.

        Raises:
            TransportConfigError: naming the target and the ways out.
        """
        if self.uses_tls or self.insecure or is_loopback_target(target):
            return
        raise TransportConfigError(
            "server {target} is not on loopback, and plaintext goes only there unless "
            "asked for: connect with TLS ({ca} to verify the server, or {tls} for the "
            "system's roots) or allow plaintext explicitly with {insecure}",
            target=target,
        )

    def bearer(self) -> str | None:
        """The token to send, read from ``token_file`` now if that is where it lives.

        Raises:
            TransportConfigError: the token file cannot be read or holds no valid token.
        """
        if self.token is not None:
            return self.token
        if self.token_file is None:
            return None
        raw = _read(self.token_file, "token_file", "token file", secret=True)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TransportConfigError(
                "{token_file} {path} is not text (UTF-8)", path=str(self.token_file)
            ) from None
        return validate_token(text, "the token in {token_file} {path}", path=str(self.token_file))

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (empty without one).

        Raises:
            TransportConfigError: the token file cannot be read or holds no valid token.
        """
        token = self.bearer()
        return ((AUTHORIZATION, f"Bearer {token}"),) if token else ()

    def _pem_files(self) -> tuple[bytes | None, bytes | None, bytes | None]:
        """The CA bundle, the client key and certificate, read now (None: not given)."""
        return (
            _read_pem(self.ca, "ca", "CA certificates") if self.ca else None,
            _read_pem(self.key, "key", "client key") if self.key else None,
            _read_pem(self.cert, "cert", "client certificate") if self.cert else None,
        )

    def credentials(self) -> grpc.ChannelCredentials | None:
        """TLS channel credentials from the files, read now (None for plaintext).

        Raises:
            TransportConfigError: a file cannot be read any more.
        """
        if not self.uses_tls:
            return None
        import grpc

        ca, key, cert = self._pem_files()
        return grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=cert
        )

    def channel_options(self) -> list[tuple[str, Any]]:
        """Channel options these settings need (the TLS name override)."""
        if self.uses_tls and self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name.strip())]
        return []

    def channel(
        self, target: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.Channel:
        """A blocking channel to ``target`` (checked with :meth:`check_target`).

        Raises:
            TransportConfigError: plaintext off loopback, or a file cannot be read.
        """
        import grpc

        self.check_target(target)
        opts = [*(options or ()), *self.channel_options()]
        creds = self.credentials()
        if creds is None:
            return grpc.insecure_channel(target, options=opts)
        return grpc.secure_channel(target, creds, options=opts)

    def aio_channel(
        self, target: str, options: Sequence[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        """An asyncio channel to ``target`` (checked with :meth:`check_target`).

        Raises:
            TransportConfigError: plaintext off loopback, or a file cannot be read.
        """
        import grpc.aio

        self.check_target(target)
        opts = [*(options or ()), *self.channel_options()]
        creds = self.credentials()
        if creds is None:
            return grpc.aio.insecure_channel(target, options=opts)
        return grpc.aio.secure_channel(target, creds, options=opts)


def path_or_none(value: str | os.PathLike[str] | None) -> Path | None:
    """A path from an option or environment variable; empty means none."""
    if value is None:
        return None
    text = os.fspath(value)
    return Path(text).expanduser() if text.strip() else None


_TRUE = frozenset({"1", "true", "yes", "on", "t", "y"})
_FALSE = frozenset({"0", "false", "no", "off", "f", "n", ""})


def parse_bool(text: str, source: str) -> bool:
    """A yes/no setting from an environment variable (``1``/``true``/``yes``/``on``...).

    Raises:
        TransportConfigError: it is neither, naming ``source``.
    """
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise TransportConfigError(
        "{source} must be 1/true/yes/on or 0/false/no/off, not {value}",
        source=source,
        value=repr(text),
    )
