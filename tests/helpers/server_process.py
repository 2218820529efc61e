"""A control server in its own process (``python -m controlplane.server serve``)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

from tests.helpers.agent_process import ROOT


class ServerProcess:
    """``python -m controlplane.server serve`` on the session etcd, under a test prefix."""

    def __init__(
        self, etcd_endpoint: str, prefix: str, port: int = 0, extra_args: Sequence[str] = ()
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controlplane.server",
                "serve",
                "--listen",
                f"127.0.0.1:{port}",
                "--etcd",
                etcd_endpoint,
                "--prefix",
                prefix,
                "--metrics",
                "off",
                *extra_args,
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.output: list[str] = []
        self._arrived = threading.Condition()
        self.address = self._read_address()
        # Keep draining stderr: a full pipe would block the server.
        threading.Thread(target=self._drain, daemon=True).start()

    def _read_address(self, timeout: float = 30.0) -> str:
        assert self.proc.stderr is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.output.append(line)
            match = re.search(r"listening on (127\.0\.0\.1:\d+)", line)
            if match:
                return match.group(1)
        self.kill()
        raise AssertionError("server did not start:\n" + "".join(self.output))

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._arrived:
                self.output.append(line)
                self._arrived.notify_all()

    def wait_output(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """The first line from ``output[start:]`` on matching ``pattern``, as it arrives."""
        deadline = time.monotonic() + timeout
        seen = start
        with self._arrived:
            while True:
                for line in self.output[seen:]:
                    match = re.search(pattern, line)
                    if match:
                        return match
                seen = len(self.output)
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    raise AssertionError(
                        f"no line matching {pattern!r}:\n" + "".join(self.output[-30:])
                    )
                self._arrived.wait(left)

    def kill(self) -> None:
        """SIGKILL: no goodbye to the agents, the connections just drop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
