"""The ports ``controlplane serve`` opens, and a port it cannot have said in one line.

The ports are the embedded etcd's client and peer ports, the gRPC address
(``--listen``), the HTTP listener (``--http``) and the metrics endpoint
(``--metrics``). :func:`check_ports` binds each as its server will, before anything
starts, so that a second ``make run`` fails at once rather than after starting etcd.
The real bind can still fail (another process took the port meanwhile);
:func:`port_error` words both the same way: the address, what holds it (``pid 1234
(python3)``, found through ``/proc`` when this user may see the process) and the
option that changes it.

:func:`add_grpc_port` binds the gRPC address without gRPC's own log line about a
failed bind: the error says it once.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import pwd
import socket
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from controlplane.server._config import ServerConfig, ServerConfigError

ETCD_HOST = "127.0.0.1"
"""Where the embedded etcd listens."""

_PROC = Path("/proc")
_LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp
_HOLDERS_SHOWN = 3


@dataclass(frozen=True, slots=True)
class Port:
    """An address the server is to listen on, what it is for and how to change it."""

    host: str
    """As given: a name, an IP address, or empty for every interface."""
    port: int
    role: str
    """What listens there, as the error says it: ``gRPC``, ``metrics``, ..."""
    option: str
    """How to choose another: ``--listen HOST:PORT``."""
    extra: str = ""
    """More advice after the option, e.g. ``or --metrics off``."""
    first_only: bool = False
    """Its server binds the first address the host resolves to (gRPC binds them all)."""

    @property
    def address(self) -> str:
        """``host:port``, an IPv6 address in brackets."""
        host = self.host or "0.0.0.0"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


class PortError(ServerConfigError):
    """Ports the server cannot listen on; one line per port, each naming the option.

    Attributes:
        ports: The ports, in the order of the lines.
    """

    def __init__(self, lines: Sequence[str], ports: Sequence[Port]) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)
        self.ports = list(ports)


def split_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of ``HOST:PORT`` or ``[V6]:PORT``; None if it is not that form
    (a gRPC target such as ``unix:/path``)."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        return None
    port = int(port_text)
    if port > 65535:
        return None
    return host.strip("[]"), port


def etcd_ports(config: ServerConfig) -> list[Port]:
    """The embedded etcd's client and peer ports (those not left to etcd to pick)."""
    if config.etcd:
        return []
    ports = []
    if config.embedded_etcd_client_port:
        ports.append(
            Port(
                ETCD_HOST,
                config.embedded_etcd_client_port,
                "embedded etcd",
                "--embedded-etcd-port PORT (0: any free one)",
            )
        )
    if config.embedded_etcd_peer_port:
        ports.append(
            Port(
                ETCD_HOST,
                config.embedded_etcd_peer_port,
                "embedded etcd's peer port, --embedded-etcd-port + 1",
                "--embedded-etcd-port PORT (etcd takes PORT and PORT+1; 0: any free ones)",
            )
        )
    return ports


def grpc_port(config: ServerConfig) -> Port | None:
    """The gRPC address as a Port, unless it is not ``HOST:PORT`` (a ``unix:`` target)."""
    parsed = split_host_port(config.listen)
    if parsed is None:
        return None
    return Port(parsed[0], parsed[1], "gRPC", "--listen HOST:PORT")


def metrics_port(config: ServerConfig) -> Port | None:
    """The metrics endpoint as a Port; None with ``--metrics off``."""
    if not config.metrics:
        return None
    parsed = split_host_port(config.metrics)
    if parsed is None:
        raise ServerConfigError(
            f"--metrics {config.metrics!r} is not HOST:PORT: give one (e.g. 127.0.0.1:9464) "
            "or --metrics off"
        )
    return Port(
        parsed[0] or "127.0.0.1",
        parsed[1],
        "metrics",
        "--metrics HOST:PORT",
        "or --metrics off",
        first_only=True,
    )


def http_port(config: ServerConfig) -> Port | None:
    """The HTTP listener as a Port; None without ``--http``.

    Raises:
        ServerConfigError: ``--http`` is not ``HOST:PORT``.
    """
    if config.http is None:
        return None
    parsed = split_host_port(config.http)
    if parsed is None:
        raise ServerConfigError(
            f"--http {config.http!r} is not HOST:PORT: give one (e.g. 127.0.0.1:8016)"
        )
    return Port(
        parsed[0], parsed[1], "HTTP", "--http HOST:PORT", "or leave --http out", first_only=True
    )


def serve_ports(config: ServerConfig, *, listen: bool = True) -> list[Port]:
    """Every port ``config`` opens that is not picked free (port 0), in start order.

    ``listen``: include the gRPC and HTTP addresses (a worker of ``--workers`` shares them).
    """
    ports = etcd_ports(config)
    grpc_address = grpc_port(config) if listen else None
    http_address = http_port(config) if listen else None
    metrics = metrics_port(config)
    ports += [p for p in (grpc_address, http_address, metrics) if p is not None]
    return [p for p in ports if p.port != 0]


def bind_listener(port: Port, *, shared: bool) -> socket.socket:
    """A socket bound to ``port`` (the first address its host resolves to), not yet
    listening; ``shared``: with SO_REUSEPORT, for the workers of ``--workers``.

    Raises:
        PortError: The address cannot be bound (what holds it and the option named).
    """
    try:
        family, kind, proto, _name, sockaddr = socket.getaddrinfo(
            port.host or None, port.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (OSError, UnicodeError) as exc:
        raise PortError(
            [
                f"cannot listen on {port.address} ({port.role}): {exc}; give another "
                f"address with {port.option}"
            ],
            [port],
        ) from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise port_error(port, exc) from None
    return sock


def check_ports(ports: Sequence[Port]) -> None:
    """Bind each port as its server will and let it go.

    Raises:
        PortError: Ports that cannot be bound, every one of them (a second ``make run``
            finds them all taken, and says so at once).
    """
    failed = [(port, problem) for port in ports if (problem := bind_problem(port)) is not None]
    if failed:
        errors = [port_error(port, problem) for port, problem in failed]
        raise PortError([line for e in errors for line in e.lines], [p for p, _ in failed])


def bind_problem(port: Port) -> OSError | None:
    """Why ``port`` cannot be bound now, or None.

    With SO_REUSEADDR, as etcd, gRPC and the metrics server bind: connections left in
    TIME_WAIT do not count, a listener does. An address in use is an error; one that
    is not this machine's, or a privileged port, only when every address the host
    resolves to is (``localhost`` on a machine without IPv6 still serves on
    127.0.0.1). An address that does not resolve, or a protocol this machine lacks, is
    left to the server's own bind.
    """
    try:
        addresses = socket.getaddrinfo(
            port.host or None, port.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (OSError, UnicodeError):
        return None
    refused: list[OSError] = []
    tried = 0
    for family, kind, proto, _name, sockaddr in addresses[:1] if port.first_only else addresses:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError:
            continue
        tried += 1
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return exc
                if exc.errno in (errno.EADDRNOTAVAIL, errno.EACCES):
                    refused.append(exc)
    return refused[0] if refused and len(refused) == tried else None


def port_error(port: Port, problem: OSError | None) -> PortError:
    """The one-line error for ``port``, which could not be bound because of ``problem``
    (None: unknown, it is looked at again now)."""
    if problem is None:
        problem = bind_problem(port) or OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    extra = f", {port.extra}" if port.extra else ""
    fix = f"pick another port with {port.option}{extra}"
    where = f"{port.address} ({port.role})"
    if problem.errno == errno.EADDRNOTAVAIL:
        line = (
            f"cannot listen on {where}: not an address of this machine; give one of its "
            f"addresses with {port.option}{extra}"
        )
    elif problem.errno == errno.EACCES:
        line = (
            f"cannot listen on {where}: permission denied (ports below 1024 need privileges); {fix}"
        )
    elif problem.errno != errno.EADDRINUSE:
        line = (
            f"cannot listen on {where}: {problem.strerror or problem}; give another "
            f"address with {port.option}{extra}"
        )
    else:
        holder, pids = describe_holder(port)
        also = ""
        if port.role == "embedded etcd" and _is_etcd(port.port, pids):
            also = f", or use that etcd with --etcd {port.address}"
        stop = "stop it" if pids else "stop what holds it"
        line = f"{where} is in use by {holder}: {stop} or {fix}{also}"
    return PortError([line], [port])


# -- who holds a port -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Socket:
    inode: int
    uid: int
    address: ipaddress.IPv4Address | ipaddress.IPv6Address


def describe_holder(port: Port) -> tuple[str, list[int]]:
    """Who listens on ``port``: ``pid 1234 (python3)``, or as much as can be known,
    and the pids found.

    From the listening sockets in ``/proc/net/tcp`` and ``tcp6`` (this network
    namespace) and the processes whose open files are those sockets, among those this
    user may look into (its own; all of them for root).
    """
    sockets = _listeners(port)
    if not sockets:
        return "an unknown process", []
    found = _processes({s.inode for s in sockets})
    if not found:
        users = sorted({_user(s.uid) for s in sockets})
        return f"a process of user {', '.join(users)} that this user cannot see", []
    pids = sorted(found)
    names = {found[pid] for pid in pids}
    shown = pids[:_HOLDERS_SHOWN]
    more = f" and {len(pids) - len(shown)} more" if len(pids) > len(shown) else ""
    if len(names) == 1:
        label = "pid" if len(pids) == 1 else "pids"
        text = f"{label} {', '.join(map(str, shown))}{more} ({names.pop()})"
    else:
        text = ", ".join(f"pid {pid} ({found[pid]})" for pid in shown) + more
    return text, pids


def _listeners(port: Port) -> list[_Socket]:
    """The listening sockets on ``port.port``; those that conflict with its host first
    (same address, or either one every interface), else any on that port."""
    sockets: list[_Socket] = []
    for table in ("tcp", "tcp6"):
        try:
            lines = (_PROC / "net" / table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10 or fields[3] != _LISTEN:
                continue
            address_hex, _, port_hex = fields[1].partition(":")
            try:
                if int(port_hex, 16) != port.port or int(fields[9]) == 0:
                    continue
                sockets.append(_Socket(int(fields[9]), int(fields[7]), _address(address_hex)))
            except ValueError:
                continue
    wanted = _addresses(port.host)
    matching = [
        s
        for s in sockets
        if not wanted or s.address.is_unspecified or s.address in wanted or _any(wanted)
    ]
    return matching or sockets


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address as /proc/net/tcp{,6} writes it: 32-bit words in host byte order."""
    raw = bytes.fromhex(text)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 4:
        return ipaddress.IPv4Address(raw)
    v6 = ipaddress.IPv6Address(raw)
    return v6.ipv4_mapped or v6


def _addresses(host: str) -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    if not host:
        return set()
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for *_, sockaddr in infos:
        with contextlib.suppress(ValueError):
            address = ipaddress.ip_address(str(sockaddr[0]).partition("%")[0])
            if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
                address = address.ipv4_mapped
            found.add(address)
    return found


def _any(addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address]) -> bool:
    return any(a.is_unspecified for a in addresses)


def _processes(inodes: set[int]) -> dict[int, str]:
    """Pid to command name of the processes holding any of the socket ``inodes``."""
    targets = {f"socket:[{inode}]" for inode in inodes}
    found: dict[int, str] = {}
    try:
        entries = [e for e in os.listdir(_PROC) if e.isdigit()]
    except OSError:
        return found
    for entry in entries:
        fd_dir = _PROC / entry / "fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # not ours to see, or gone
            continue
        for fd in fds:
            try:
                link = os.readlink(fd_dir / fd)
            except OSError:
                continue
            if link in targets:
                found[int(entry)] = _command(int(entry))
                break
    return found


def _command(pid: int) -> str:
    try:
        return (_PROC / str(pid) / "comm").read_text().strip() or "?"
    except OSError:
        return "?"


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _is_etcd(port: int, pids: Sequence[int]) -> bool:
    """Whether an etcd listens on 127.0.0.1:``port``: by its command name, else by its
    answer to ``/health``."""
    if pids:
        return any(_command(pid) == "etcd" for pid in pids)
    try:
        # Loopback, a port of ours: never user input.
        url = f"http://{ETCD_HOST}:{port}/health"
        with urllib.request.urlopen(url, timeout=0.5) as response:
            body = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return isinstance(body, dict) and "health" in body


# -- the gRPC bind --------------------------------------------------------------------


def add_grpc_port(
    server: grpc.aio.Server, port: Port | None, listen: str, tls: grpc.ServerCredentials | None
) -> int:
    """Bind the gRPC server to ``listen``; the port it got.

    gRPC logs a failed bind on stderr by itself (``add_port.cc ... Failed to add
    port``) before the error says the same in one line: its stderr is kept aside
    during the bind and written out only if the bind worked.

    Raises:
        PortError: The address cannot be bound (``port`` None: not ``HOST:PORT``).
    """
    with _stderr_kept() as said:
        try:
            bound = (
                server.add_insecure_port(listen)
                if tls is None
                else server.add_secure_port(listen, tls)
            )
        except RuntimeError:
            bound = 0
    if bound:
        if said:
            with contextlib.suppress(OSError):
                os.write(2, bytes(said))
        return bound
    if port is None:
        reason = bytes(said).decode("utf-8", "replace").strip().splitlines()
        raise PortError(
            [
                f"cannot listen on {listen} (gRPC): {reason[-1] if reason else 'gRPC refused it'}"
                "; give another with --listen HOST:PORT"
            ],
            [],
        )
    problem = bind_problem(port)
    if problem is None and b"already in use" in said:
        problem = OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
    raise port_error(port, problem)


@contextlib.contextmanager
def _stderr_kept() -> Iterator[bytearray]:
    """Send what is written to file descriptor 2 meanwhile to a file; yields what was
    written, filled in at the end of the block."""
    said = bytearray()
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield said
            finally:
                os.dup2(saved, 2)
                sink.seek(0)
                said += sink.read()
    finally:
        os.close(saved)
