"""Reconnect storm: kill -9 the server under N agents, write during the outage, restart.

One etcd (a process of its own) and two servers on it: A, on a fixed free port,
the only address the agents are given, and B, which takes the writes made while
A is down. N ``agents.AsyncAgent`` in several processes (one connection each)
connect to A and hold a first state. Then:

1. A is killed with SIGKILL; every agent drops to STALE;
2. ``--writes`` changes go through B (the flag flipped, and new flags set), each
   acknowledged by B, so in etcd;
3. A is started again on the same port (same command, same etcd).

Measured from the restart (the moment A's process is started; also from the
moment it listens): the time until every agent is READY again, and until every
agent holds every write made during the outage (p50/max of the per-agent
times). Every agent's state is checked at the end: an acknowledged write any
agent lacks is a failure. Writes ``benchmarks/results/reconnect.json``.

    python -m benchmarks.bench_reconnect [--agents 1000] [--processes 4] [--writes 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from benchmarks import _profile
from benchmarks._fleet import AgentFleet
from benchmarks._harness import (
    RESULTS_DIR,
    ServerRunner,
    cpu_seconds,
    machine,
    percentile,
    print_table,
    py_spy,
    write_results,
)
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd, free_port

SERVICE = "bench"
FLAG = "bench-flag"
TARGET_SECONDS = 2.0
CONVERGE_TIMEOUT = 60.0
OPTIONS = t.WriteOptions(reason="benchmark", incident="BENCH-1", actor="bench")


def _set(address: str, name: str, value: bool) -> int:
    """Set a flag through the server at ``address``; the write's revision."""
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response = stub.SetFlag(
            m.SetFlagRequest(
                scope=SERVICE, name=name, value=t.FlagValue(bool_value=value), options=OPTIONS
            ),
            timeout=10,
        )
    return int(response.result.revision)


def _run_case(
    agents: int, processes: int, writes: int, profile: Path | None = None
) -> dict[str, Any]:
    failures: list[str] = []
    with tempfile.TemporaryDirectory(prefix="cp-bench-reconnect-") as tmp:
        root = Path(tmp)
        etcd = EmbeddedEtcd(root / "etcd")
        etcd.start()
        port = free_port()
        server_a = ServerRunner(root / "a", etcd=etcd.endpoint, listen=f"127.0.0.1:{port}")
        server_b = ServerRunner(root / "b", etcd=etcd.endpoint)
        try:
            a = server_a.start()
            b = server_b.start()
            _set(b.address, FLAG, False)
            with AgentFleet([a.address], SERVICE, agents=agents, processes=processes) as fleet:
                ready = sum(r["ready"] for r in fleet.ready)
                if ready != agents:
                    failures.append(f"{agents - ready} agents not READY before the kill")

                killed = time.time()
                server_a.kill()
                stale = sum(r["not_ready"] for r in fleet.command({"cmd": "outage"}, timeout=30))
                if stale != agents:
                    failures.append(f"{agents - stale} agents still READY after the kill")
                expected: dict[str, bool] = {FLAG: True}
                for i in range(1, writes):
                    expected[f"outage-{i}"] = True
                revisions = [_set(b.address, name, value) for name, value in expected.items()]
                fleet.command({"cmd": "expect", "flags": expected}, timeout=30)

                agents_cpu_before = sum(cpu_seconds(pid) for pid in fleet.pids)
                restarted = time.time()
                a = server_a.start()
                listening = time.time()
                with py_spy(a.pid, profile):
                    answers = fleet.command(
                        {"cmd": "converged", "timeout": CONVERGE_TIMEOUT},
                        timeout=CONVERGE_TIMEOUT + 30,
                    )
                # The restarted server's CPU from its start until every agent converged.
                server_cpu = cpu_seconds(a.pid)
                agents_cpu = sum(cpu_seconds(pid) for pid in fleet.pids) - agents_cpu_before
                report = fleet.command({"cmd": "report", "flags": list(expected)}, timeout=120)
        finally:
            server_a.stop()
            server_b.stop()
            etcd.stop()

    ready_at = [x for answer in answers for x in answer["ready_at"]]
    converged_at = [x for answer in answers for x in answer["converged_at"]]
    not_back = sum(x is None for x in ready_at)
    not_converged = sum(x is None for x in converged_at)
    if not_back:
        failures.append(f"{not_back} agents not READY within {CONVERGE_TIMEOUT} s")
    if not_converged:
        failures.append(f"{not_converged} agents not converged within {CONVERGE_TIMEOUT} s")
    lacking = {
        name: agents - sum(r["values"][name].get(json.dumps(value), 0) for r in report)
        for name, value in expected.items()
    }
    for name, count in lacking.items():
        if count:
            failures.append(f"{count} agents lack the acknowledged outage write {name}")
    back = [x - restarted for x in ready_at if x is not None]
    converged = [x - restarted for x in converged_at if x is not None]
    last_back = max(back, default=float("nan"))
    last_converged = max(converged, default=float("nan"))
    return {
        "agents": agents,
        "processes": len(fleet.counts),
        "outage_writes": len(revisions),
        # The agents' first connect, all at once and without backoff: the capacity side.
        "initial_connect_s": max(r["seconds"] for r in fleet.ready),
        "outage_seconds": round(restarted - killed, 3),
        "server_start_seconds": round(listening - restarted, 3),
        "all_ready_s": round(last_back, 3),
        "all_converged_s": round(last_converged, 3),
        "all_converged_after_listening_s": round(last_converged - (listening - restarted), 3),
        "ready_p50_s": round(percentile(back, 50), 3),
        "converged_p50_s": round(percentile(converged, 50), 3),
        "converged_p90_s": round(percentile(converged, 90), 3),
        "server_cpu_s": round(server_cpu, 3),
        "agents_cpu_s": round(agents_cpu, 3),
        "lacking_writes": lacking,
        "target_s": TARGET_SECONDS,
        "met": not failures and last_converged <= TARGET_SECONDS,
        "failures": failures,
    }


def run(
    agents: int = 1000,
    processes: int = 4,
    writes: int = 3,
    out_dir: Path = RESULTS_DIR,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Run the storm once; print the table, write and return the results."""
    host = machine()
    case = _run_case(agents, processes, max(writes, 1), profile)
    results = {"benchmark": "reconnect", "machine": host, "cases": [case]}
    print_table(
        ["agents", "first connect s", "server start s", "all READY s", "all converged s",
         "from listening s", "p50 s", "p90 s", "srv cpu s", "agents cpu s", "met", "failures"],
        [[
            case["agents"], case["initial_connect_s"], case["server_start_seconds"],
            case["all_ready_s"], case["all_converged_s"], case["all_converged_after_listening_s"],
            case["converged_p50_s"], case["converged_p90_s"], case["server_cpu_s"],
            case["agents_cpu_s"],
            "yes" if case["met"] else "NO", len(case["failures"]),
        ]],
    )  # fmt: skip
    for failure in case["failures"][:5]:
        print(f"  {failure}")
    path = write_results("reconnect", results, out_dir)
    print(f"results: {path}")
    if profile is not None:
        print(_profile.report(profile, top=20))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--processes", type=int, default=4, help="agent processes")
    parser.add_argument("--writes", type=int, default=3, help="writes during the outage")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--profile",
        type=Path,
        help="py-spy the restarted server until every agent is back: collapsed stacks to "
        "PROFILE (its 0.5 s attach delays the storm: not a run for figures)",
    )
    args = parser.parse_args(argv)
    run(args.agents, args.processes, args.writes, args.out, args.profile)


if __name__ == "__main__":
    main()
