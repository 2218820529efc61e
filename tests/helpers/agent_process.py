"""An :class:`agents.Agent` in a process of its own, for tests that kill servers around it.

Run as ``python -m tests.helpers.agent_process --service S --servers A,B --flags a,b
[--cache-path P] [--instance-id I] [--version V]``. It prints one JSON line per
observed change of what the agent serves::

    {"event": "started", "pid": 123, "instance_id": "..."}
    {"event": "update", "t": <unix time>, "state": "READY", "revision": 7,
     "flags": {"a": true, "b": null}, "server": "127.0.0.1:50051"}

(observed by polling the agent's public reads every 2 ms) and reads commands,
one per line, from stdin: ``exit`` closes the agent (writing its cache) and
ends the process. Logs go to stderr.

:class:`AgentProcess` starts one and reads its lines on the test side.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agents import Agent

POLL_INTERVAL = 0.002
ROOT = Path(__file__).resolve().parents[2]


def _emit(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--service", required=True)
    parser.add_argument("--servers", required=True)
    parser.add_argument("--flags", default="")
    parser.add_argument("--cache-path")
    parser.add_argument("--instance-id")
    parser.add_argument("--version", default="v-test")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
    )
    names = [n for n in args.flags.split(",") if n]
    agent = Agent(
        args.service,
        args.servers.split(","),
        version=args.version,
        instance_id=args.instance_id,
        cache_path=args.cache_path,
    )
    commands: queue.Queue[str] = queue.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            commands.put(line.strip())
        commands.put("exit")  # stdin closed: the test is gone

    threading.Thread(target=read_stdin, daemon=True).start()
    agent.start()
    _emit({"event": "started", "pid": os.getpid(), "instance_id": agent.instance_id})
    last: tuple[Any, ...] | None = None
    while True:
        seen = (
            agent.state.value,
            agent.revision,
            {n: agent.value(n) for n in names},
            agent.server,
        )
        if seen != last:
            last = seen
            _emit(
                {
                    "event": "update",
                    "t": time.time(),
                    "state": seen[0],
                    "revision": seen[1],
                    "flags": seen[2],
                    "server": seen[3],
                }
            )
        try:
            command = commands.get(timeout=POLL_INTERVAL)
        except queue.Empty:
            continue
        if command == "exit":
            agent.close()
            _emit({"event": "closed", "revision": agent.revision})
            return 0


class AgentProcess:
    """The test's side: starts the helper, collects its lines, waits on them."""

    def __init__(
        self,
        service: str,
        servers: Sequence[str],
        flags: Sequence[str],
        *,
        cache_path: Path | None = None,
        instance_id: str | None = None,
    ) -> None:
        cmd = [
            sys.executable,
            "-m",
            "tests.helpers.agent_process",
            "--service",
            service,
            "--servers",
            ",".join(servers),
            "--flags",
            ",".join(flags),
        ]
        if cache_path is not None:
            cmd += ["--cache-path", str(cache_path)]
        if instance_id is not None:
            cmd += ["--instance-id", instance_id]
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTROLPLANE_")}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        self._new = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read_stdout, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._new:
                self.lines.append(json.loads(raw))
                self._new.notify_all()
        with self._new:
            self._new.notify_all()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.stderr.append(raw)

    @property
    def updates(self) -> list[dict[str, Any]]:
        """The ``update`` lines so far."""
        with self._new:
            return [line for line in self.lines if line["event"] == "update"]

    @property
    def latest(self) -> dict[str, Any]:
        """The last ``update`` line."""
        updates = self.updates
        assert updates, "the agent process printed no update yet"
        return updates[-1]

    def mark(self) -> int:
        """How many lines were printed so far: a start for :meth:`wait_for`."""
        with self._new:
            return len(self.lines)

    def wait_for(
        self,
        check: Callable[[dict[str, Any]], bool],
        timeout: float = 15.0,
        what: str = "",
        *,
        start: int = 0,
    ) -> dict[str, Any]:
        """The first line from index ``start`` on for which ``check`` holds; waits
        for it up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._new:
            index = start
            while True:
                while index < len(self.lines):
                    line = self.lines[index]
                    index += 1
                    if check(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or not self._readers[0].is_alive():
                    raise AssertionError(
                        f"agent process: no line {what or check!r} within {timeout}s; "
                        f"exit code {self.proc.poll()}; lines:\n"
                        + "\n".join(json.dumps(x) for x in self.lines)
                        + "\nstderr:\n"
                        + "".join(self.stderr[-50:])
                    )
                self._new.wait(min(left, 0.5))

    def close(self, timeout: float = 15.0) -> int:
        """Ask it to exit (closing the agent); kill it if it does not. Its exit code."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode


if __name__ == "__main__":
    sys.exit(main())
