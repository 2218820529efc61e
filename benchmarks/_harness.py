"""What every benchmark shares: a control server process on its own etcd, results."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"


@dataclass(frozen=True, slots=True)
class ServerProcess:
    """A running ``controlplane serve`` with its embedded etcd."""

    address: str
    pid: int


@contextmanager
def control_server(extra_args: Sequence[str] = ()) -> Iterator[ServerProcess]:
    """Start ``controlplane serve`` with an embedded etcd on free ports; stop it after."""
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as data_dir:
        argv = [
            sys.executable, "-m", "controlplane.server", "serve",
            "--listen", "127.0.0.1:0", "--embedded-etcd-port", "0", "--metrics", "off",
            "--data-dir", data_dir, "--log-format", "json", *extra_args,
        ]  # fmt: skip
        log_path = Path(data_dir) / "server.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen(argv, stderr=log, stdout=subprocess.DEVNULL)
        try:
            address = _wait_for_address(proc, log_path)
            yield ServerProcess(address, proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_address(proc: subprocess.Popen[bytes], log_path: Path) -> str:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log_path.read_text()
        match = re.search(r"listening on (127\.0\.0\.1:\d+)", text)
        if match:
            return match.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"control server exited early:\n{text}")
        time.sleep(0.05)
    raise RuntimeError(f"control server did not start within 60 s:\n{log_path.read_text()}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its waited-for children, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


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
