"""The agent's configuration: argument > environment variable > default.

===================  ================================  ===================================
argument             environment variable              default
===================  ================================  ===================================
``service``          ``CONTROLPLANE_SERVICE``          none: required
``servers``          ``CONTROLPLANE_SERVERS``          none: required (comma list)
``version``          ``CONTROLPLANE_VERSION``          ``""`` (unknown)
``instance_id``      ``CONTROLPLANE_INSTANCE_ID``      ``<hostname>-<pid>-<random>``
``cache_path``       ``CONTROLPLANE_CACHE_PATH``       none: no cache file
``override_path``    ``CONTROLPLANE_OVERRIDE_PATH``    ``<cache_path>.override.json``
                                                       beside the cache file; none without
``token``            ``CONTROLPLANE_TOKEN``            none: no token sent
``token_file``       ``CONTROLPLANE_TOKEN_FILE``       none; read for each connection
``tls``              ``CONTROLPLANE_TLS``              off; on with any of the next two
``tls_ca``           ``CONTROLPLANE_TLS_CA``           the system's roots (with ``tls``)
``tls_cert``         ``CONTROLPLANE_TLS_CLIENT_CERT``  none: no client certificate
``tls_key``          ``CONTROLPLANE_TLS_CLIENT_KEY``   none; required with ``tls_cert``
``tls_server_name``  ``CONTROLPLANE_TLS_SERVER_NAME``  the host of each server
``insecure``         ``CONTROLPLANE_INSECURE``         off: plaintext only to loopback
===================  ================================  ===================================

``CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS=1`` (environment only: a host's choice, not
a program's) reads an override file that someone other than its owner can change, or a
symbolic link, all the same, with a warning each time it is read.

``override_path`` is the break-glass override file (``agents._override``); an
empty argument (``override_path=""``) turns it off even with a cache file.

Connection security (``controlplane.transport``): ``token`` or ``token_file``
(not both; an argument for either ignores both variables) is sent as
``authorization: Bearer <token>`` on every stream; the file is read again for
each connection, so a rotated token is used without a restart. ``tls_ca``,
``tls_cert`` (mutual TLS, with ``tls_key``) or ``tls`` (the system's roots)
turn TLS on. Without TLS, every server must be on loopback (127.0.0.0/8,
``::1``, ``localhost``, a unix socket) unless ``insecure`` allows plaintext
elsewhere. Boolean variables take ``1``/``true``/``yes``/``on`` or
``0``/``false``/``no``/``off``. The token never appears in ``repr`` nor in logs.

An argument counts as given when it is not None; an empty environment variable
counts as unset. Validation happens here, at construction, so that a
misconfigured service fails at start-up with a message naming the setting rather
than retrying a hopeless connection forever.

Instance ids and ``fork()``: an id given (argument or environment variable) is
used as given by the process that created the agent. A forked child whose agent
was created before the fork (``gunicorn --preload``) shares that id with its
parent and siblings, and the server would count them as one instance: the child
appends its pid (``<given id>-<pid>``, see :func:`forked_config`). A default id
(``<hostname>-<pid>-<random>``) is made anew in the child. An agent created after
the fork uses its id as given: give each process its own.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

if TYPE_CHECKING:
    from controlplane.transport import ClientSecurity

ENV_SERVICE = "CONTROLPLANE_SERVICE"
ENV_SERVERS = "CONTROLPLANE_SERVERS"
ENV_VERSION = "CONTROLPLANE_VERSION"
ENV_INSTANCE_ID = "CONTROLPLANE_INSTANCE_ID"
ENV_CACHE_PATH = "CONTROLPLANE_CACHE_PATH"
ENV_OVERRIDE_PATH = "CONTROLPLANE_OVERRIDE_PATH"
ENV_OVERRIDE_INSECURE = "CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS"
ENV_TOKEN = "CONTROLPLANE_TOKEN"  # noqa: S105  # a variable's name, not a token
ENV_TOKEN_FILE = "CONTROLPLANE_TOKEN_FILE"  # noqa: S105
ENV_TLS = "CONTROLPLANE_TLS"
ENV_TLS_CA = "CONTROLPLANE_TLS_CA"
ENV_TLS_CERT = "CONTROLPLANE_TLS_CLIENT_CERT"
ENV_TLS_KEY = "CONTROLPLANE_TLS_CLIENT_KEY"
ENV_TLS_SERVER_NAME = "CONTROLPLANE_TLS_SERVER_NAME"
ENV_INSECURE = "CONTROLPLANE_INSECURE"
OVERRIDE_SUFFIX = ".override.json"
"""The default override file is the cache file's path with this appended."""

# The server's rules (controlplane.model, controlplane.server), repeated so that
# the SDK imports nothing of the server.
_SERVICE_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_INSTANCE_BAD_CHARS = re.compile(r"[^A-Za-z0-9._:@/-]")
_VERSION_MAX = 128
_INSTANCE_MAX = 128


SECURITY_NAMES = {
    "token": f"token/{ENV_TOKEN}",
    "token_file": f"token_file/{ENV_TOKEN_FILE}",
    "tls": f"tls/{ENV_TLS}",
    "ca": f"tls_ca/{ENV_TLS_CA}",
    "cert": f"tls_cert/{ENV_TLS_CERT}",
    "key": f"tls_key/{ENV_TLS_KEY}",
    "server_name": f"tls_server_name/{ENV_TLS_SERVER_NAME}",
    "insecure": f"insecure/{ENV_INSECURE}",
}
"""How the SDK's errors call the settings of ``controlplane.transport.ClientSecurity``."""


class AgentConfigError(ValueError):
    """The agent's configuration is missing a setting or holds an invalid one.

    A connection setting's error comes from a
    ``controlplane.transport.TransportConfigError``, its ``__cause__`` (a client
    built on the SDK, such as ``cp-agent``, words it with its own option names).
    """


def _plaintext() -> ClientSecurity:
    from controlplane.transport import ClientSecurity

    return ClientSecurity()


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """A resolved, validated configuration.

    Attributes:
        service: The service the agent serves the state of.
        servers: Control server targets (``host:port``), tried in turn.
        version: The version the process runs, reported to the server.
        instance_id: This process's id in status and acks.
        cache_path: Where the last applied state is kept, or None.
        override_path: The break-glass override file to watch, or None.
        override_insecure_permissions: Read the override file even when someone else
            can change it (``CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS``), warning.
        instance_id_generated: Whether ``instance_id`` is the default (then a
            forked child makes its own, with its own pid).
        instance_id_given: The id as given, when it was (a forked child's
            ``instance_id`` is this with the child's pid appended); else "".
        security: TLS, client certificate and token for the connections to
            ``servers`` (the token is not in ``repr``).
    """

    service: str
    servers: tuple[str, ...]
    version: str
    instance_id: str
    cache_path: Path | None
    instance_id_generated: bool = False
    instance_id_given: str = ""
    override_path: Path | None = None
    override_insecure_permissions: bool = False
    security: ClientSecurity = field(default_factory=_plaintext)


def default_instance_id(pid: int | None = None) -> str:
    """``<hostname>-<pid>-<6 hex>`` (this process's pid by default), cut to what
    the server accepts."""
    host = _INSTANCE_BAD_CHARS.sub("-", socket.gethostname()) or "host"
    suffix = f"-{os.getpid() if pid is None else pid}-{secrets.token_hex(3)}"
    host = host.lstrip("._:@/-") or "host"
    return host[: _INSTANCE_MAX - len(suffix)] + suffix


def forked_config(config: AgentConfig, pid: int) -> AgentConfig:
    """The configuration of an agent carried into a forked child with pid ``pid``.

    A default id is made anew (``<hostname>-<pid>-<random>``); a given one gets
    ``-<pid>`` appended to the id as given (a grandchild's is the given id and
    its own pid, not its parent's id extended), the given id cut so that the
    result stays within 128 characters. The parent keeps its id as it is.
    """
    if config.instance_id_generated:
        return replace(config, instance_id=default_instance_id(pid))
    given = config.instance_id_given or config.instance_id
    suffix = f"-{pid}"
    return replace(
        config, instance_id=given[: _INSTANCE_MAX - len(suffix)] + suffix, instance_id_given=given
    )


class AgentSettings(TypedDict, total=False):
    """The settings an agent takes by keyword besides service and servers (each
    ``None`` or absent: from the environment, else the default; see
    :func:`resolve_config`)."""

    version: str | None
    instance_id: str | None
    cache_path: str | os.PathLike[str] | None
    override_path: str | os.PathLike[str] | None
    token: str | None
    token_file: str | os.PathLike[str] | None
    tls: bool | None
    tls_ca: str | os.PathLike[str] | None
    tls_cert: str | os.PathLike[str] | None
    tls_key: str | os.PathLike[str] | None
    tls_server_name: str | None
    insecure: bool | None


def resolve_config(
    *,
    service: str | None = None,
    servers: Sequence[str] | str | None = None,
    version: str | None = None,
    instance_id: str | None = None,
    cache_path: str | os.PathLike[str] | None = None,
    override_path: str | os.PathLike[str] | None = None,
    token: str | None = None,
    token_file: str | os.PathLike[str] | None = None,
    tls: bool | None = None,
    tls_ca: str | os.PathLike[str] | None = None,
    tls_cert: str | os.PathLike[str] | None = None,
    tls_key: str | os.PathLike[str] | None = None,
    tls_server_name: str | None = None,
    insecure: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> AgentConfig:
    """Resolve each setting from its argument, else its environment variable, else
    its default, and validate the result.

    Args:
        service: The service name (a DNS label).
        servers: Server targets, as a list or one comma-separated string.
        version: The running version.
        instance_id: This instance's id.
        cache_path: The cache file's path.
        override_path: The break-glass override file's path ("" for none).
        token: A bearer token for the servers.
        token_file: A file holding the token, read for each connection.
        tls: Use TLS (implied by ``tls_ca`` and ``tls_cert``).
        tls_ca: The CA bundle (PEM) that verifies the servers.
        tls_cert: This client's certificate (PEM), for mutual TLS.
        tls_key: Its private key (PEM).
        tls_server_name: The name the servers' certificates must carry, when it
            is not the target's host.
        insecure: Allow plaintext to servers off loopback.
        environ: The environment to read (default ``os.environ``).

    Raises:
        AgentConfigError: ``service`` or ``servers`` is given nowhere, or a
            setting is invalid (connection settings: contradictory, a file that
            cannot be read, plaintext to a server off loopback without
            ``insecure``); the message names the argument and variable.
    """
    env = os.environ if environ is None else environ

    def from_env(name: str) -> str | None:
        raw = env.get(name, "").strip()
        return raw or None

    resolved_service = service if service is not None else from_env(ENV_SERVICE)
    if not resolved_service:
        raise AgentConfigError(
            f"no service: pass service=... or set {ENV_SERVICE} (e.g. {ENV_SERVICE}=checkout)"
        )
    if not _SERVICE_RE.fullmatch(resolved_service):
        raise AgentConfigError(
            f"service {resolved_service!r} is not a DNS label (lowercase letters, digits "
            "and '-', at most 63 characters, no '-' at either end)"
        )

    raw_servers: Sequence[str] | str | None = servers
    if raw_servers is None:
        raw_servers = from_env(ENV_SERVERS)
    if raw_servers is None:
        raise AgentConfigError(
            f"no servers: pass servers=[...] or set {ENV_SERVERS} "
            f"(comma-separated, e.g. {ENV_SERVERS}=10.0.0.5:50051,10.0.0.6:50051)"
        )
    if isinstance(raw_servers, str):
        raw_servers = raw_servers.split(",")
    targets = tuple(s.strip() for s in raw_servers if s.strip())
    if not targets:
        raise AgentConfigError(
            f"servers is empty: give at least one host:port (argument or {ENV_SERVERS})"
        )
    for target in targets:
        _check_target(target)

    resolved_version = version if version is not None else (from_env(ENV_VERSION) or "")
    if len(resolved_version) > _VERSION_MAX:
        raise AgentConfigError(f"version is longer than {_VERSION_MAX} characters")

    generated = False
    resolved_instance = instance_id if instance_id is not None else from_env(ENV_INSTANCE_ID)
    if resolved_instance is None:
        resolved_instance = default_instance_id()
        generated = True
    if not _INSTANCE_RE.fullmatch(resolved_instance):
        raise AgentConfigError(
            f"instance_id {resolved_instance[:140]!r} is invalid: 1-128 characters A-Z, a-z, "
            "0-9, '.', '_', ':', '@', '/' and '-', starting with a letter or digit"
        )

    raw_cache = cache_path if cache_path is not None else from_env(ENV_CACHE_PATH)
    resolved_cache = Path(raw_cache) if raw_cache is not None and str(raw_cache) else None

    raw_override = override_path if override_path is not None else from_env(ENV_OVERRIDE_PATH)
    resolved_override: Path | None = None
    if raw_override is not None:
        resolved_override = Path(raw_override) if str(raw_override) else None
    elif resolved_cache is not None:
        resolved_override = resolved_cache.with_name(resolved_cache.name + OVERRIDE_SUFFIX)

    security = _resolve_security(
        targets,
        from_env,
        token=token,
        token_file=token_file,
        tls=tls,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_server_name=tls_server_name,
        insecure=insecure,
    )

    return AgentConfig(
        service=resolved_service,
        servers=targets,
        version=resolved_version,
        instance_id=resolved_instance,
        cache_path=resolved_cache,
        instance_id_generated=generated,
        instance_id_given="" if generated else resolved_instance,
        override_path=resolved_override,
        override_insecure_permissions=_insecure_override(from_env),
        security=security,
    )


def _insecure_override(from_env: Callable[[str], str | None]) -> bool:
    from controlplane.transport import TransportConfigError, parse_bool

    raw = from_env(ENV_OVERRIDE_INSECURE)
    try:
        return parse_bool(raw, ENV_OVERRIDE_INSECURE) if raw is not None else False
    except TransportConfigError as exc:
        raise AgentConfigError(str(exc)) from None


def _resolve_security(
    targets: Sequence[str],
    from_env: Callable[[str], str | None],
    *,
    token: str | None,
    token_file: str | os.PathLike[str] | None,
    tls: bool | None,
    tls_ca: str | os.PathLike[str] | None,
    tls_cert: str | os.PathLike[str] | None,
    tls_key: str | os.PathLike[str] | None,
    tls_server_name: str | None,
    insecure: bool | None,
) -> ClientSecurity:
    """The connection settings, argument > environment variable > default, checked
    against every target."""
    # Imported here: ``import agents`` stays free of it (and of gRPC) until an
    # agent is configured.
    from controlplane.transport import (
        ClientSecurity,
        TransportConfigError,
        parse_bool,
        path_or_none,
    )

    def path(argument: str | os.PathLike[str] | None, variable: str) -> Path | None:
        return path_or_none(argument if argument is not None else from_env(variable))

    def flag(argument: bool | None, variable: str) -> bool:
        if argument is not None:
            return bool(argument)
        raw = from_env(variable)
        return parse_bool(raw, variable) if raw is not None else False

    try:
        # The token and the token file are one setting in two forms: an argument
        # for either one leaves both variables aside.
        if token is not None or token_file is not None:
            resolved_token, resolved_file = token, path_or_none(token_file)
        else:
            resolved_token, resolved_file = from_env(ENV_TOKEN), path(None, ENV_TOKEN_FILE)
        # An empty argument, like an empty variable, is none (as for the paths).
        server_name = (
            tls_server_name.strip() or None
            if tls_server_name is not None
            else from_env(ENV_TLS_SERVER_NAME)
        )
        security = ClientSecurity(
            token=resolved_token,
            token_file=resolved_file,
            tls=flag(tls, ENV_TLS),
            ca=path(tls_ca, ENV_TLS_CA),
            cert=path(tls_cert, ENV_TLS_CERT),
            key=path(tls_key, ENV_TLS_KEY),
            server_name=server_name,
            insecure=flag(insecure, ENV_INSECURE),
        )
        for target in targets:
            security.check_target(target)
    except TransportConfigError as exc:
        raise AgentConfigError(exc.render(SECURITY_NAMES)) from exc
    return security


def _check_target(target: str) -> None:
    # gRPC target URIs (dns:///, unix:, ipv4:, ...) are passed through as given.
    if "://" in target or target.startswith(("unix:", "ipv4:", "ipv6:", "dns:")):
        return
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise AgentConfigError(f"server {target!r} is not host:port")
