"""Agent processes for a benchmark: several processes, each with many SDK agents.

    with AgentFleet([server.address], "bench", agents=1000, processes=4) as fleet:
        fleet.ready          # each process's "ready" answer
        fleet.command({"cmd": "report", "flags": ["f"]}, timeout=60)

Each process is ``python -m benchmarks._agent_worker`` (see there for the
commands). Leaving the ``with`` block stops every process: ``stop``, then
SIGKILL after a grace period; their stderr goes to a temporary folder, shown
when a process fails.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from benchmarks._harness import split

ROOT = Path(__file__).resolve().parent.parent
STOP_GRACE = 30.0
"""Seconds each process gets to close its agents before SIGKILL."""


class FleetError(RuntimeError):
    """An agent process failed, exited or did not answer in time."""


class AgentFleet:
    """``agents`` SDK agents of ``service`` spread over ``processes`` processes.

    Args:
        servers: The servers each agent is given, in order.
        service: The service every agent serves.
        agents: How many agents in all.
        processes: How many processes (at most one per agent).
        ready_timeout: Seconds each process waits for its agents to be READY.
        name: Instance id prefix (``<name>-<process>-<index>``).
        record: Flags whose values every change records (the ``history`` command).
        env: Environment variables for the processes, over this process's (e.g. the
            SDK's ``CONTROLPLANE_TLS_CA`` and ``CONTROLPLANE_TOKEN``).
        sdk: ``async`` (``agents.AsyncAgent``) or ``sync`` (``agents.Agent``).
        cache: A folder for a cache file per agent; None: no cache.
    """

    def __init__(
        self,
        servers: Sequence[str],
        service: str,
        *,
        agents: int,
        processes: int = 4,
        ready_timeout: float = 120.0,
        name: str = "bench",
        record: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        sdk: str = "async",
        cache: Path | None = None,
    ) -> None:
        self.servers = list(servers)
        self.sdk = sdk
        self.cache = cache
        self.env = {**os.environ, **(env or {})}
        self.record = list(record)
        self.service = service
        self.counts = split(agents, processes)
        self.ready_timeout = ready_timeout
        self.name = name
        self.ready: list[dict[str, Any]] = []
        self.ready_seconds = 0.0
        self._procs: list[subprocess.Popen[str]] = []
        self._answers: list[queue.Queue[dict[str, Any] | None]] = []
        self._logs = tempfile.TemporaryDirectory(prefix="cp-bench-agents-")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def agents(self) -> int:
        return sum(self.counts)

    def __enter__(self) -> AgentFleet:
        try:
            self._spawn()
            started = time.monotonic()
            self.ready = self._collect("ready", self.ready_timeout + 30)
            self.ready_seconds = time.monotonic() - started
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _spawn(self) -> None:
        for index, count in enumerate(self.counts):
            argv = [
                sys.executable, "-m", "benchmarks._agent_worker",
                "--servers", ",".join(self.servers), "--service", self.service,
                "--count", str(count), "--name", f"{self.name}-{index}",
                "--ready-timeout", str(self.ready_timeout),
                "--record", ",".join(self.record), "--sdk", self.sdk,
                "--cache", str(self.cache) if self.cache is not None else "",
            ]  # fmt: skip
            with (Path(self._logs.name) / f"agents-{index}.log").open("w") as log:
                proc = subprocess.Popen(
                    argv,
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    text=True,
                    env=self.env,
                )
            answers: queue.Queue[dict[str, Any] | None] = queue.Queue()
            assert proc.stdout is not None
            threading.Thread(target=_read_lines, args=(proc.stdout, answers), daemon=True).start()
            self._procs.append(proc)
            self._answers.append(answers)

    def command(
        self, command: dict[str, Any], timeout: float, only: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        """Send ``command`` to every process (or those ``only`` lists); return their
        answers, in process order."""
        indices = list(range(len(self._procs))) if only is None else list(only)
        line = json.dumps(command) + "\n"
        for index in indices:
            stdin = self._procs[index].stdin
            assert stdin is not None
            stdin.write(line)
            stdin.flush()
        return self._collect(command["cmd"], timeout, indices)

    def _collect(
        self, event: str, timeout: float, indices: Sequence[int] | None = None
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        answers = []
        for index in range(len(self._answers)) if indices is None else indices:
            pending = self._answers[index]
            try:
                answer = pending.get(timeout=max(deadline - time.monotonic(), 0.001))
            except queue.Empty:
                raise FleetError(
                    f"agent process {index} did not answer {event!r} within {timeout} s"
                    f"{self._log_tail(index)}"
                ) from None
            if answer is None:
                raise FleetError(f"agent process {index} exited{self._log_tail(index)}")
            if answer.get("event") != event:
                raise FleetError(f"agent process {index} answered {answer!r} to {event!r}")
            answers.append(answer)
        return answers

    def log_tails(self) -> str:
        """The end of every agent process's log (for a failure report)."""
        return "".join(
            f"\n--- agent process {index}{self._log_tail(index) or ': (nothing logged)'}"
            for index in range(len(self._procs))
        )

    def _log_tail(self, index: int) -> str:
        path = Path(self._logs.name) / f"agents-{index}.log"
        try:
            text = path.read_text()[-3000:]
        except OSError:
            return ""
        return f":\n{text}" if text else ""

    def close(self) -> None:
        """Stop every process (closing its agents); SIGKILL those that linger. Idempotent."""
        for proc in self._procs:
            if proc.poll() is None and proc.stdin is not None:
                try:
                    proc.stdin.write('{"cmd": "stop"}\n')
                    proc.stdin.close()
                except OSError:
                    pass
        deadline = time.monotonic() + STOP_GRACE
        for proc in self._procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._procs = []
        self._answers = []
        self._logs.cleanup()


def _read_lines(stream: IO[str], answers: queue.Queue[dict[str, Any] | None]) -> None:
    for line in stream:
        line = line.strip()
        if line.startswith("{"):
            answers.put(json.loads(line))
    answers.put(None)
