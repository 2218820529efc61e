"""Memory: the server's resident set size per connected agent (one connection each).

For each size, a fresh server (with its embedded etcd, a process of its own that
is not counted). A first fleet of ``--warm`` agents connects and gets one change,
so that what the first streams set up once (the service's feed, gRPC's and
asyncio's machinery) is in the baseline; then N more agents connect in other
processes, each with its own connection, all get one change (so every stream
has written once), and the server's RSS is read again after a short settle.
Per agent: (RSS after - RSS before) / N. Also the RSS once those N are gone
(informational: memory a process freed is not always returned to the system).
Writes ``benchmarks/results/memory.json``.

``--floor`` measures the same way a bare grpc.aio AgentService instead
(``benchmarks/_bare_sync.py``: one handler per stream that answers one empty
Snapshot and reads acks; no etcd, hub or presence, so no change is made): what
grpc.aio itself costs per connected agent, below which no server built on it goes.

    python -m benchmarks.bench_memory [--agents 1000,5000] [--processes 4] [--floor]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.duration_pb2 import Duration

from benchmarks._fleet import AgentFleet
from benchmarks._harness import (
    RESULTS_DIR,
    ServerProcess,
    ServerRunner,
    control_server,
    machine,
    print_table,
    rss_bytes,
    write_results,
)
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t

SERVICE = "bench"
FLAG = "bench-flag"
TARGET_KIB = 32.0
SETTLE = 2.0
"""Seconds to let the server settle (presence flushes, freed buffers) before a reading."""
OPTIONS = t.WriteOptions(reason="benchmark", incident="BENCH-1", actor="bench")


def _change(stub: Any, value: bool, expect: int) -> str | None:
    """Flip the flag and wait until every agent applied it; a failure's text, or None."""
    result = stub.SetFlag(
        m.SetFlagRequest(
            scope=SERVICE, name=FLAG, value=t.FlagValue(bool_value=value), options=OPTIONS
        ),
        timeout=10,
    ).result
    waited = stub.WaitApplied(
        m.WaitAppliedRequest(
            service=SERVICE, revision=result.revision, timeout=Duration(seconds=60)
        ),
        timeout=65,
    )
    if not waited.all_applied or waited.connected != expect:
        return f"revision {result.revision}: {waited.applied}/{waited.connected} applied"
    return None


@contextmanager
def bare_server() -> Iterator[ServerProcess]:
    """``benchmarks._bare_sync`` in a process of its own, stopped after."""
    with tempfile.TemporaryDirectory(prefix="cp-bench-bare-") as folder:
        runner = ServerRunner(Path(folder))
        runner.argv = [sys.executable, "-m", "benchmarks._bare_sync"]
        try:
            yield runner.start()
        finally:
            runner.stop()


def _measure(
    server: ServerProcess,
    agents: int,
    processes: int,
    warm: int,
    settle: float,
    change: Callable[[bool, int], str | None],
) -> dict[str, Any]:
    """The server's RSS idle, with ``warm`` agents (each stream having written once:
    ``change(value, expected agents)``, a failure's text or None), with ``agents``
    more, and once those left."""
    failures: list[str] = []
    idle = rss_bytes(server.pid)
    with AgentFleet([server.address], SERVICE, agents=warm, processes=1, name="warm"):
        failures += filter(None, [change(True, warm)])
        time.sleep(settle)
        before = rss_bytes(server.pid)
        with AgentFleet(
            [server.address], SERVICE, agents=agents, processes=processes, name="mem"
        ) as fleet:
            ready = sum(r["ready"] for r in fleet.ready)
            if ready != agents:
                failures.append(f"{agents - ready} agents not READY")
            failures += filter(None, [change(False, warm + agents)])
            time.sleep(settle)
            after = rss_bytes(server.pid)
        time.sleep(settle)
        gone = rss_bytes(server.pid)
    per_agent = (after - before) / agents
    return {
        "agents": agents,
        "processes": len(fleet.counts),
        "warm_agents": warm,
        "rss_idle_mib": round(idle / 2**20, 1),
        "rss_before_mib": round(before / 2**20, 1),
        "rss_after_mib": round(after / 2**20, 1),
        "rss_after_close_mib": round(gone / 2**20, 1),
        "kib_per_agent": round(per_agent / 1024, 1),
        "target_kib": TARGET_KIB,
        "met": per_agent / 1024 <= TARGET_KIB,
        "failures": failures,
    }


def _run_floor(agents: int, processes: int, warm: int, settle: float) -> dict[str, Any]:
    # The bare server has no changes to make: its one Snapshot is each stream's write.
    with bare_server() as server:
        case = _measure(server, agents, processes, warm, settle, lambda _v, _n: None)
    return {"server": "bare grpc.aio (floor)", **case}


def _run_case(agents: int, processes: int, warm: int, settle: float) -> dict[str, Any]:
    with (
        control_server() as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        stub.SetFlag(
            m.SetFlagRequest(
                scope=SERVICE, name=FLAG, value=t.FlagValue(bool_value=False), options=OPTIONS
            ),
            timeout=10,
        )
        case = _measure(server, agents, processes, warm, settle, lambda v, n: _change(stub, v, n))
    return {"server": "controlplane serve", **case}


def run(
    sizes: list[int],
    processes: int = 4,
    warm: int = 10,
    out_dir: Path = RESULTS_DIR,
    settle: float = SETTLE,
    floor: bool = False,
) -> dict[str, Any]:
    """Run every size on a fresh server; print the table, write and return the results.

    ``floor``: after each size, the same on the bare grpc.aio server.
    """
    host = machine()
    cases = []
    for agents in sizes:
        cases.append(_run_case(agents, processes, warm, settle))
        if floor:
            cases.append(_run_floor(agents, processes, warm, settle))
    results = {"benchmark": "memory", "machine": host, "cases": cases}
    print_table(
        ["server", "agents", "idle MiB", "before MiB", "after MiB", "closed MiB", "KiB/agent",
         "met", "failures"],
        [
            [
                c["server"], c["agents"], c["rss_idle_mib"], c["rss_before_mib"],
                c["rss_after_mib"], c["rss_after_close_mib"], c["kib_per_agent"],
                "yes" if c["met"] else "NO",
                len(c["failures"]),
            ]
            for c in cases
        ],
    )  # fmt: skip
    for case in cases:
        for failure in case["failures"][:5]:
            print(f"  {case['agents']} agents: {failure}")
    path = write_results("memory", results, out_dir)
    print(f"results: {path}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--agents", default="1000,5000", help="comma-separated sizes")
    parser.add_argument("--processes", type=int, default=4, help="agent processes")
    parser.add_argument("--warm", type=int, default=10, help="agents in the baseline")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--floor", action="store_true", help="also measure a bare grpc.aio server (the floor)"
    )
    args = parser.parse_args(argv)
    run(
        [int(a) for a in args.agents.split(",")],
        args.processes,
        args.warm,
        args.out,
        floor=args.floor,
    )


if __name__ == "__main__":
    main()
