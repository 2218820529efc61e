"""Traffic and clients for the fault suite: a writer, agent processes, servers, the checker.

A :class:`FaultRun` starts control servers (their own processes, on fixed ports so a
restarted one comes back at the same address) on a given etcd, agent processes
(``benchmarks._agent_worker``: many SDK agents each, recording every state they apply)
and a :class:`Writer` flipping flags at a steady rate with values unique per write.
:meth:`FaultRun.finish` stops the writer, waits for the agents to serve the final state
(at most ``CONVERGE_WITHIN`` seconds: the promise) and runs the history checker.

``CONTROLPLANE_FAULTS=full`` (``make test-faults``) runs the whole set at full length;
without it (``make test``) the tests run a reduced set (fewer and shorter faults).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc

from benchmarks._fleet import AgentFleet
from benchmarks._harness import ServerRunner
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import free_port
from tests.faults.history import AgentHistory, Outcome, Report, Write, check

FULL = os.environ.get("CONTROLPLANE_FAULTS", "") == "full"
"""The whole fault set at full length (``make test-faults``)."""
CONVERGE_WITHIN = 5.0
"""Seconds after the faults heal within which every agent must serve the final state."""
RESULTS = Path(__file__).parent / "results"

# gRPC's own details when a call never left the client: it was not applied.
_NOT_SENT = ("failed to connect to all addresses", "connection refused", "dns resolution")
# Codes with which the server says the write was not applied.
_REFUSED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.NOT_FOUND,
}


def scaled(reduced: float, full: float) -> float:
    """A length or count: ``full`` with CONTROLPLANE_FAULTS=full, else ``reduced``."""
    return full if FULL else reduced


@dataclass
class Attempt:
    """A write the writer made, with how long it took and what it got."""

    write: Write
    seconds: float
    code: str
    server: str | None


class Writer:
    """Sets flags of ``service`` at ``rate`` writes per second, each with a unique value.

    ``concurrency`` threads share the rate, each writing its own keys (one writer per key
    keeps each key's order the order of issue): their writes meet at the server, which
    sends those that come together in one transaction (group commit).

    Writes go to the servers in order, moving on only when a server could not be reached
    (the call was never sent: the write failed, nothing was applied); any other error
    leaves the outcome unknown unless the server said it refused the write.
    """

    def __init__(
        self,
        servers: Sequence[str],
        service: str,
        keys: Sequence[str],
        *,
        rate: float = 20.0,
        timeout: float = 3.0,
        concurrency: int = 1,
    ) -> None:
        if not 1 <= concurrency <= len(keys):
            raise ValueError(f"concurrency must be 1 to {len(keys)} (one writer per key)")
        self.servers = list(servers)
        self.service = service
        self.keys = list(keys)
        self.concurrency = concurrency
        self.interval = concurrency / rate
        self.timeout = timeout
        self.attempts: list[Attempt] = []
        self._stop = threading.Event()
        self._progress = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._seq = 0
        self._channels = {s: grpc.insecure_channel(s) for s in self.servers}

    @property
    def writes(self) -> list[Write]:
        return [a.write for a in self.attempts]

    def acknowledged(self) -> int:
        return sum(a.write.outcome == "ok" for a in self.attempts)

    def start(self) -> None:
        for index in range(self.concurrency):
            thread = threading.Thread(
                target=self._run,
                args=(self.keys[index :: self.concurrency],),
                name=f"fault-writer-{index}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        for channel in self._channels.values():
            channel.close()

    def wait_acknowledged(self, more: int, within: float = 60.0) -> None:
        """Block until ``more`` further writes are acknowledged (traffic flowed)."""
        with self._progress:
            target = self.acknowledged() + more
            if not self._progress.wait_for(lambda: self.acknowledged() >= target, within):
                raise AssertionError(
                    f"fewer than {more} writes acknowledged within {within} s: {self.attempts[-3:]}"
                )

    def _run(self, keys: Sequence[str]) -> None:
        turn = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            key = keys[turn % len(keys)]
            turn += 1
            with self._progress:
                seq, self._seq = self._seq, self._seq + 1
            attempt = self.write_once(seq, key, f"w{seq}")
            with self._progress:
                self.attempts.append(attempt)
                self._progress.notify_all()
            next_at += self.interval
            # Pacing, not synchronisation: the writer keeps a steady rate.
            self._stop.wait(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at, time.monotonic() - self.interval)

    def write_once(self, seq: int, key: str, value: str) -> Attempt:
        request = m.SetFlagRequest(
            scope=self.service,
            name=key,
            value=t.FlagValue(string_value=value),
            options=t.WriteOptions(reason="fault suite traffic", actor="fault-writer"),
        )
        started = time.monotonic()
        code = "UNAVAILABLE"
        server: str | None = None
        outcome: Outcome = "failed"
        revision: int | None = None
        for target in self.servers:
            stub = mitigation_pb2_grpc.MitigationServiceStub(self._channels[target])
            try:
                response = stub.SetFlag(request, timeout=self.timeout)
            except grpc.RpcError as exc:
                status, details = exc.code(), (exc.details() or "").lower()
                code, server = status.name, target
                if status == grpc.StatusCode.UNAVAILABLE and any(n in details for n in _NOT_SENT):
                    continue  # never sent: try the next server
                outcome = "failed" if status in _REFUSED else "unknown"
                break
            code, server, outcome = "OK", target, "ok"
            revision = response.result.revision
            break
        return Attempt(
            Write(seq, key, value, outcome, revision), time.monotonic() - started, code, server
        )


@dataclass
class FaultRun:
    """Servers, agents and a writer on ``etcd_endpoints``; see the module's docstring."""

    etcd_endpoints: Sequence[str]
    prefix: str
    workdir: Path
    servers: int = 1
    agents: int = 50
    processes: int = 2
    keys: Sequence[str] = ("k0", "k1", "k2", "k3", "k4")
    service: str = "checkout"
    rate: float = 20.0
    writers: int = 1
    """Writer threads (one per key at most): more than one makes the server group-commit."""
    server_args: Sequence[str] = ()
    runners: list[ServerRunner] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    fleet: AgentFleet | None = None
    writer: Writer | None = None

    def __enter__(self) -> FaultRun:
        try:
            etcd = ",".join(self.etcd_endpoints)
            for index in range(self.servers):
                address = f"127.0.0.1:{free_port()}"
                runner = ServerRunner(
                    self.workdir / f"server-{index}",
                    etcd=etcd,
                    listen=address,
                    extra_args=["--prefix", self.prefix, "--etcd-timeout", "1s",
                                *self.server_args],
                )  # fmt: skip
                runner.start()
                self.runners.append(runner)
                self.addresses.append(address)
            self.fleet = AgentFleet(
                self.addresses,
                self.service,
                agents=self.agents,
                processes=self.processes,
                ready_timeout=60.0,
                name="fault",
                record=self.keys,
            ).__enter__()
            self.writer = Writer(
                self.addresses, self.service, self.keys, rate=self.rate, concurrency=self.writers
            )
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

    def close(self) -> None:
        if self.writer is not None:
            self.writer.stop()
        if self.fleet is not None:
            self.fleet.close()
        for runner in self.runners:
            runner.stop()

    def final_state(self) -> dict[str, Any]:
        """What etcd holds now for every key, read through a server (None: unset)."""
        last: Exception | None = None
        for address in self.addresses:
            with grpc.insecure_channel(address) as channel:
                stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
                try:
                    listed = stub.ListFlags(
                        m.ListFlagsRequest(scope=self.service), timeout=10, wait_for_ready=True
                    )
                except grpc.RpcError as exc:
                    last = exc
                    continue
            values: dict[str, Any] = dict.fromkeys(self.keys)
            for flag in listed.flags:
                if flag.scope == self.service and flag.name in values:
                    values[flag.name] = flag.value.string_value
            return values
        raise AssertionError(f"no server answered ListFlags: {last}")

    def finish(self, name: str, **figures: Any) -> Report:
        """Stop the traffic, let the agents converge, check the histories, save figures."""
        assert self.writer is not None and self.fleet is not None
        self.writer.stop()
        final = self.final_state()
        settled = self.fleet.command(
            {"cmd": "settle", "flags": final, "timeout": CONVERGE_WITHIN},
            timeout=CONVERGE_WITHIN + 30,
        )
        answers = self.fleet.command({"cmd": "history"}, timeout=60)
        histories = [
            AgentHistory(agent, [(rev, state) for rev, state in history])
            for answer in answers
            for agent, history in zip(answer["agents"], answer["histories"], strict=True)
        ]
        report = check(self.writer.writes, histories)
        missing = sum(a["missing"] for a in settled)
        if missing:
            report.violations.append(
                f"{missing} agents did not serve the final state {final} within "
                f"{CONVERGE_WITHIN} s of the faults healing"
            )
        save_figures(name, report, self.writer, **figures)
        if report.violations:
            # What the agents said (disconnections, errors) explains most violations.
            report.violations.append(f"agent logs:{self.fleet.log_tails()}")
        return report


def save_figures(name: str, report: Report, writer: Writer, **figures: Any) -> None:
    """Keep the run's figures in tests/faults/results/<name>.json (for RELIABILITY.md)."""
    RESULTS.mkdir(exist_ok=True)
    durations = sorted(a.seconds for a in writer.attempts if a.code != "OK")
    data = {
        "name": name,
        "full": FULL,
        "writes": report.writes,
        "acknowledged": report.acknowledged,
        "failed": report.failed,
        "unknown": report.unknown,
        "agents": report.agents,
        "states_applied": report.applied,
        "violations": report.violations,
        "slowest_failed_write_s": round(durations[-1], 3) if durations else None,
        **figures,
    }
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2) + "\n")
