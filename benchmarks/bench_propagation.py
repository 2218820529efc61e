"""Propagation: from just before the write RPC to each agent's ``on_change`` callback.

For each size, a fresh server (with its embedded etcd) and N ``agents.AsyncAgent``
of service ``bench`` spread over several processes, each agent with its own
connection. The driver flips a bool flag ``--flips`` times; before each flip it
notes the wall time, calls ``SetFlag`` and then ``WaitApplied`` (what
``cpctl --wait`` waits for), and starts the next flip only once every agent
acknowledged, so that each flip is measured alone. Every agent's callback notes
the wall time the new value arrived.

Reported per size: p50/p99/max of (callback time - time before SetFlag) over all
agents and flips; p50/p99/max of the time until WaitApplied said all applied;
server CPU time per agent per change (from /proc, over the measured flips only;
"net" also subtracts the server's idle CPU and the cost of the write itself,
measured on a scope no agent serves); the agents' processes' CPU per agent per
change. Writes ``benchmarks/results/propagation.json``.

``--secure`` runs as production does: the server serves TLS (a certificate made for
the run) and checks bearer tokens from an auth file; every agent verifies the server
and sends its agent token, the driver an operator token.

    python -m benchmarks.bench_propagation [--agents 100,1000,5000] [--flips 50]
        [--processes 4] [--warmup 3] [--gap 0.05] [--profile server.txt] [--secure]
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import secrets
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from benchmarks import _profile
from benchmarks._fleet import AgentFleet
from benchmarks._harness import (
    RESULTS_DIR,
    CommitWatch,
    control_server,
    cpu_seconds,
    machine,
    percentile,
    print_table,
    py_spy,
    server_cpu_seconds,
    write_results,
)
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.transport import ClientSecurity

SERVICE = "bench"
FLAG = "bench-flag"
BASELINE_SCOPE = "bench-baseline"
"""A scope no agent serves: its writes cost the server the write and the hub's
look at it, no fan-out."""
BASELINE_WRITES = 10
IDLE_WINDOW = 1.0
"""Seconds of the server's idle CPU measured before the flips (keepalives, presence)."""
WAIT_TIMEOUT = 60.0
OPTIONS = t.WriteOptions(reason="benchmark", incident="BENCH-1", actor="bench")


@dataclass
class _Security:
    """TLS and tokens for a ``--secure`` run, made in a temporary folder."""

    server_args: list[str]
    agent_env: dict[str, str]
    client: ClientSecurity


@contextmanager
def _secure(enabled: bool) -> Iterator[_Security | None]:
    if not enabled:
        yield None
        return
    # Certificates come from the test helper (the cryptography package, a dev dependency).
    from controlplane.server.auth import hash_token
    from tests.helpers.certs import TestCA

    with tempfile.TemporaryDirectory(prefix="cp-bench-tls-") as folder:
        ca = TestCA(Path(folder) / "pki")
        cert = ca.server_cert()
        agent_token, operator_token = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        auth = Path(folder) / "auth.json"
        auth.write_text(
            json.dumps(
                {
                    "identities": [
                        {"name": "bench-agents", "role": "agent", "services": [SERVICE],
                         "token_sha256": hash_token(agent_token)},
                        {"name": "bench-driver", "role": "admin",
                         "token_sha256": hash_token(operator_token)},
                    ]
                }
            )
        )  # fmt: skip
        yield _Security(
            server_args=[
                "--tls-cert",
                str(cert.cert),
                "--tls-key",
                str(cert.key),
                "--auth-file",
                str(auth),
            ],
            agent_env={"CONTROLPLANE_TLS_CA": str(ca.cert), "CONTROLPLANE_TOKEN": agent_token},
            client=ClientSecurity(ca=ca.cert, token=operator_token),
        )


class _Driver:
    """The writes and waits of one case, through one channel."""

    def __init__(self, channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        self.metadata = metadata

    def set_flag(self, scope: str, value: bool) -> int:
        request = m.SetFlagRequest(
            scope=scope, name=FLAG, value=t.FlagValue(bool_value=value), options=OPTIONS
        )
        response = self.stub.SetFlag(request, timeout=10, metadata=self.metadata)
        if not response.result.changed:
            raise RuntimeError(f"SetFlag {scope}/{FLAG}={value} changed nothing")
        return int(response.result.revision)

    def wait_applied(self, revision: int) -> m.WaitAppliedResponse:
        request = m.WaitAppliedRequest(
            service=SERVICE, revision=revision, timeout=Duration(seconds=int(WAIT_TIMEOUT))
        )
        response: m.WaitAppliedResponse = self.stub.WaitApplied(
            request, timeout=WAIT_TIMEOUT + 5, metadata=self.metadata
        )
        return response


def _flip(driver: _Driver, value: bool) -> tuple[int, float, float, m.WaitAppliedResponse]:
    """One flip: (revision, wall time before SetFlag, seconds until all applied, answer)."""
    before = time.time()
    revision = driver.set_flag(SERVICE, value)
    waited = driver.wait_applied(revision)
    return revision, before, time.time() - before, waited


def _run_case(
    agents: int,
    flips: int,
    processes: int,
    warmup: int,
    gap: float,
    profile: Path | None,
    native: bool,
    secure: bool = False,
    workers: int = 1,
    sdk: str = "async",
    cache: bool = False,
    pace: float | None = None,
) -> dict[str, Any]:
    server_args = ["--workers", str(workers)]
    with (
        tempfile.TemporaryDirectory(prefix="cp-bench-cache-") as cache_dir,
        _secure(secure) as security,
        control_server([*(security.server_args if security else ()), *server_args]) as server,
        (security.client if security else ClientSecurity()).channel(server.address) as channel,
        CommitWatch(server.etcd) if server.etcd else contextlib.nullcontext() as commits,
    ):
        driver = _Driver(channel, security.client.metadata() if security else ())
        value = False
        driver.set_flag(SERVICE, value)
        driver.set_flag(BASELINE_SCOPE, value)
        with AgentFleet(
            [server.address],
            SERVICE,
            agents=agents,
            processes=processes,
            name="prop",
            env=security.agent_env if security else None,
            sdk=sdk,
            cache=Path(cache_dir) if cache else None,
        ) as fleet:
            ready = sum(r["ready"] for r in fleet.ready)
            failures: list[str] = []
            if ready != agents:
                failures.append(f"{agents - ready} agents not READY after {fleet.ready_timeout} s")
            for _ in range(warmup):
                value = not value
                _flip(driver, value)
                time.sleep(gap)

            # What the server spends without any change: keepalives, presence.
            idle_before = server_cpu_seconds(server)
            time.sleep(IDLE_WINDOW)
            idle_rate = (server_cpu_seconds(server) - idle_before) / IDLE_WINDOW
            # What a write costs the server when no agent serves its scope.
            base_before = server_cpu_seconds(server)
            base_started = time.monotonic()
            base_value = False
            for _ in range(BASELINE_WRITES):
                base_value = not base_value
                driver.set_flag(BASELINE_SCOPE, base_value)
                time.sleep(gap)
            base_elapsed = time.monotonic() - base_started
            base_cpu = server_cpu_seconds(server) - base_before - idle_rate * base_elapsed
            write_cpu = max(base_cpu / BASELINE_WRITES, 0.0)

            measured: list[tuple[int, float]] = []
            acked: list[float] = []
            agent_profile = profile.with_name(f"{profile.stem}-agents.txt") if profile else None
            with (
                # With --workers: the first worker's samples.
                py_spy(server.serving[0], profile, native=native),
                py_spy(fleet.pids[0], agent_profile, native=native),
            ):
                cpu_before = server_cpu_seconds(server)
                agents_cpu_before = sum(cpu_seconds(pid) for pid in fleet.pids)
                started = time.monotonic()
                for index in range(flips):
                    value = not value
                    if pace is not None:
                        # Open loop: a flip every `pace` seconds, applied or not.
                        time.sleep(max(started + index * pace - time.monotonic(), 0.0))
                        before = time.time()
                        measured.append((driver.set_flag(SERVICE, value), before))
                        continue
                    revision, before, all_applied, waited = _flip(driver, value)
                    measured.append((revision, before))
                    acked.append(all_applied)
                    if not waited.all_applied:
                        failures.append(
                            f"revision {revision}: {waited.applied}/{waited.connected} applied, "
                            f"{len(waited.nacks)} rejected"
                        )
                    elif waited.connected != agents:
                        failures.append(f"revision {revision}: {waited.connected} connected")
                    time.sleep(gap)
                if pace is not None:
                    final = driver.wait_applied(measured[-1][0])
                    if not final.all_applied:
                        failures.append(f"the last flip: {final.applied}/{final.connected} applied")
                elapsed = time.monotonic() - started
                server_cpu = server_cpu_seconds(server) - cpu_before
                agents_cpu = sum(cpu_seconds(pid) for pid in fleet.pids) - agents_cpu_before
            # Acknowledged comes before the callbacks: let the last ones run.
            fleet.command(
                {"cmd": "settle", "flags": {FLAG: value}, "revision": measured[-1][0],
                 "timeout": 30},
                timeout=60,
            )  # fmt: skip
            reports = fleet.command({"cmd": "report", "flags": [FLAG]}, timeout=120)

    latencies, last, missing = _latencies(reports, measured)
    committed = commits.committed if isinstance(commits, CommitWatch) else {}
    from_commit, skipped = _from_commit(reports, measured, committed)
    changes = agents * flips
    net_cpu = server_cpu - idle_rate * elapsed - write_cpu * flips
    final = sum(r["values"][FLAG].get("true" if value else "false", 0) for r in reports)
    if final != agents:
        failures.append(f"{agents - final} agents do not hold the last value")
    if missing:
        failures.append(f"{missing} (agent, flip) arrivals missing")
    return {
        "agents": agents,
        "secure": secure,
        "workers": workers,
        "processes": len(fleet.counts),
        "flips": flips,
        "connect_seconds": max(r["seconds"] for r in fleet.ready),
        "p50_ms": _ms(percentile(latencies, 50)),
        "p99_ms": _ms(percentile(latencies, 99)),
        "max_ms": _ms(max(latencies, default=float("nan"))),
        "last_agent_p50_ms": _ms(percentile(last, 50)),
        "last_agent_max_ms": _ms(max(last, default=float("nan"))),
        # None when paced: flips do not wait for the agents.
        "all_applied_p50_ms": _ms(percentile(acked, 50)) if acked else None,
        "all_applied_p99_ms": _ms(percentile(acked, 99)) if acked else None,
        "all_applied_max_ms": _ms(max(acked)) if acked else None,
        "server_cpu_us_per_agent_change": round(server_cpu * 1e6 / changes, 1),
        "server_cpu_net_us_per_agent_change": round(net_cpu * 1e6 / changes, 1),
        "server_idle_cpu_ms_per_s": round(idle_rate * 1000, 2),
        "server_write_cpu_ms": round(write_cpu * 1000, 3),
        "agents_cpu_us_per_agent_change": round(agents_cpu * 1e6 / changes, 1),
        "sdk": sdk,
        "cache": cache,
        "pace_s": pace,
        # None without an etcd to watch (with --workers the start line names none).
        "commit_p50_ms": _ms(percentile(from_commit, 50)) if from_commit else None,
        "commit_p99_ms": _ms(percentile(from_commit, 99)) if from_commit else None,
        "commit_max_ms": _ms(max(from_commit)) if from_commit else None,
        "skipped": skipped,
        "cpu_busy_share": round((server_cpu + agents_cpu) / elapsed / (os.cpu_count() or 1), 3),
        "missing": missing,
        "failures": failures,
    }


def _latencies(
    reports: list[dict[str, Any]], measured: list[tuple[int, float]]
) -> tuple[list[float], list[float], int]:
    """Each (agent, flip)'s callback time minus the flip's start; per flip, the last
    agent's; and how many (agent, flip) are missing."""
    latencies: list[float] = []
    last = [0.0] * len(measured)
    missing = 0
    for report in reports:
        for arrivals in report["arrivals"]:
            arrivals.sort()
            revisions = [revision for revision, _ in arrivals]
            for flip, (revision, before) in enumerate(measured):
                # The first change at or after the flip's revision (a coalesced one
                # would be later; spaced flips are not coalesced).
                index = bisect.bisect_left(revisions, revision)
                if index == len(arrivals):
                    missing += 1
                    continue
                latency = arrivals[index][1] - before
                latencies.append(latency)
                last[flip] = max(last[flip], latency)
    return latencies, last, missing


def _from_commit(
    reports: list[dict[str, Any]], measured: list[tuple[int, float]], committed: dict[int, float]
) -> tuple[list[float], int]:
    """Each (agent, flip)'s callback time minus the time the independent etcd watch
    heard the flip's revision; and how many (agent, flip) never saw that revision
    itself (a later one instead: an intermediate value skipped)."""
    from_commit: list[float] = []
    skipped = 0
    for report in reports:
        for arrivals in report["arrivals"]:
            seen = {revision: at for revision, at in arrivals}
            for revision, _ in measured:
                at = seen.get(revision)
                if at is None:
                    skipped += 1
                elif revision in committed:
                    from_commit.append(at - committed[revision])
    return from_commit, skipped


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def run(
    sizes: list[int],
    flips: int = 50,
    processes: int = 4,
    warmup: int = 3,
    gap: float = 0.05,
    out_dir: Path = RESULTS_DIR,
    profile: Path | None = None,
    native: bool = False,
    secure: bool = False,
    workers: int = 1,
    sdk: str = "async",
    cache: bool = False,
    pace: float | None = None,
) -> dict[str, Any]:
    """Run every size on a fresh server; print the table, write and return the results."""
    results: dict[str, Any] = {
        "benchmark": "propagation",
        "machine": machine(),
        "secure": secure,
        "workers": workers,
        "sdk": sdk,
        "cache": cache,
        "pace_s": pace,
        "cases": [],
    }
    profiles: list[Path] = []
    for agents in sizes:
        profile_path = None
        if profile is not None:
            profile_path = profile.with_name(f"{profile.stem}-{agents}{profile.suffix}")
            profiles += [profile_path, profile_path.with_name(f"{profile_path.stem}-agents.txt")]
        results["cases"].append(
            _run_case(
                agents, flips, processes, warmup, gap, profile_path, native, secure, workers,
                sdk, cache, pace,
            )
        )  # fmt: skip
    print_table(
        [
            "agents", "flips", "p50 ms", "p99 ms", "max ms", "commit p99", "commit max",
            "skipped", "acked p50", "acked p99", "srv us/agent/chg", "net",
            "agents us/agent/chg", "busy", "failures",
        ],
        [
            [
                c["agents"], c["flips"], c["p50_ms"], c["p99_ms"], c["max_ms"],
                c["commit_p99_ms"], c["commit_max_ms"], c["skipped"],
                c["all_applied_p50_ms"], c["all_applied_p99_ms"],
                c["server_cpu_us_per_agent_change"], c["server_cpu_net_us_per_agent_change"],
                c["agents_cpu_us_per_agent_change"], c["cpu_busy_share"], len(c["failures"]),
            ]
            for c in results["cases"]
        ],
    )  # fmt: skip
    for case in results["cases"]:
        for failure in case["failures"][:5]:
            print(f"  {case['agents']} agents: {failure}")
    name = (
        "propagation"
        + ("-secure" if secure else "")
        + (f"-{workers}w" if workers > 1 else "")
        + ("-sync" if sdk == "sync" else "")
        + ("-cache" if cache else "")
        + ("-paced" if pace is not None else "")
    )
    path = write_results(name, results, out_dir)
    print(f"results: {path}")
    for profile_path in profiles:
        print(_profile.report(profile_path, top=15))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", default="100,1000,5000", help="comma-separated sizes")
    parser.add_argument("--flips", type=int, default=50, help="measured flips per size")
    parser.add_argument("--processes", type=int, default=4, help="agent processes")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured flips first")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between flips")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the server and one agent process over the flips: collapsed stacks "
        "to PROFILE-<agents>.txt and PROFILE-<agents>-agents.txt",
    )
    parser.add_argument(
        "--native", action="store_true", help="with --profile: C frames too (gRPC core)"
    )
    parser.add_argument(
        "--secure", action="store_true", help="TLS and bearer tokens, as in production"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="server processes (controlplane serve --workers)"
    )
    parser.add_argument(
        "--sdk",
        choices=("async", "sync"),
        default="async",
        help="the agents: AsyncAgent (async) or Agent (sync)",
    )
    parser.add_argument("--cache", action="store_true", help="a cache file per agent")
    parser.add_argument(
        "--pace",
        type=float,
        default=None,
        help="flip every PACE seconds without waiting for the agents (open loop)",
    )
    args = parser.parse_args(argv)
    sizes = [int(a) for a in args.agents.split(",")]
    run(
        sizes, args.flips, args.processes, args.warmup, args.gap, args.out, args.profile,
        args.native, args.secure, args.workers, args.sdk, args.cache, args.pace,
    )  # fmt: skip


if __name__ == "__main__":
    main()
