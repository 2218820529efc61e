"""Each benchmark at a tiny size, so the scripts cannot rot (timings are not asserted)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from benchmarks import __main__ as bench_main
from benchmarks import (
    bench_agent_cost,
    bench_flagd,
    bench_hotpath,
    bench_memory,
    bench_propagation,
    bench_reconnect,
    bench_writes,
)


def _written(tmp_path: Path, name: str, results: dict[str, Any]) -> None:
    assert json.loads((tmp_path / f"{name}.json").read_text()) == results


def _machine(results: dict[str, Any]) -> None:
    assert results["machine"]["cpus"] >= 1
    assert results["machine"]["grpcio"]


def test_write_benchmark_runs_and_reports_every_write(tmp_path: Path) -> None:
    results = bench_writes.run(writes=20, concurrency=[1, 4], out_dir=tmp_path)
    assert [c["concurrency"] for c in results["cases"]] == [1, 4]
    for case in results["cases"]:
        assert case["failures"] == 0
        assert case["writes"] == 20
        assert case["writes_per_second"] > 0
        assert case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    _written(tmp_path, "writes", results)


def test_propagation_benchmark_sees_every_flip_at_every_agent(tmp_path: Path) -> None:
    results = bench_propagation.run([4], flips=3, processes=2, warmup=1, gap=0.01, out_dir=tmp_path)
    _machine(results)
    [case] = results["cases"]
    assert case["agents"] == 4
    assert case["processes"] == 2
    assert case["flips"] == 3
    assert case["failures"] == []
    assert case["missing"] == 0
    assert 0 < case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    assert 0 < case["all_applied_p50_ms"] <= case["all_applied_max_ms"]
    assert case["server_cpu_us_per_agent_change"] > 0
    assert case["agents_cpu_us_per_agent_change"] >= 0  # CPU ticks are 10 ms
    # From the commit, as an independent etcd watch heard it: never before it.
    assert 0 < case["commit_p50_ms"] <= case["commit_max_ms"] <= case["max_ms"]
    assert case["skipped"] == 0
    _written(tmp_path, "propagation", results)


def test_propagation_benchmark_runs_secure_with_tls_and_tokens(tmp_path: Path) -> None:
    results = bench_propagation.run(
        [3], flips=2, processes=1, warmup=1, gap=0.01, out_dir=tmp_path, secure=True
    )
    [case] = results["cases"]
    assert case["secure"] is True
    assert case["failures"] == []
    assert case["missing"] == 0
    _written(tmp_path, "propagation-secure", results)


def test_propagation_benchmark_runs_with_workers_and_counts_their_cpu(tmp_path: Path) -> None:
    results = bench_propagation.run(
        [4], flips=2, processes=1, warmup=1, gap=0.01, out_dir=tmp_path, workers=2
    )
    [case] = results["cases"]
    assert results["workers"] == case["workers"] == 2
    assert case["failures"] == []
    assert case["missing"] == 0
    # The workers' CPU, not the supervisor's (which only watches them): never zero.
    assert case["server_cpu_us_per_agent_change"] > 0
    _written(tmp_path, "propagation-2w", results)


def test_hotpath_benchmark_times_every_read(tmp_path: Path) -> None:
    results = bench_hotpath.run(repeat=1, number=200, out_dir=tmp_path)
    _machine(results)
    cases = {c["case"]: c for c in results["cases"]}
    for name in (
        "agent.enabled (set)",
        "agent.value (number)",
        "agent.should_shed (more critical)",
        "agent.should_shed (the tier, key)",
    ):
        assert cases[name]["library"] == "agents"
        assert cases[name]["ns_per_call"] > 0
    assert isinstance(cases["agent.enabled (set)"]["met"], bool)
    assert isinstance(cases["agent.should_shed (more critical)"]["met"], bool)
    assert cases["agent.value (number)"]["met"] is None  # no target
    # The other libraries are measured when installed, else reported as skipped.
    others = {c["library"].split()[0] for c in results["cases"]} - {"agents", "-"}
    assert others | set(results["skipped"]) == {"openfeature-sdk", "UnleashClient"}
    _written(tmp_path, "hotpath", results)


def test_memory_benchmark_measures_the_server_and_the_bare_grpc_floor(tmp_path: Path) -> None:
    results = bench_memory.run([4], processes=2, warm=2, out_dir=tmp_path, settle=0.1, floor=True)
    _machine(results)
    assert [c["server"] for c in results["cases"]] == [
        "controlplane serve",
        "bare grpc.aio (floor)",
    ]
    for case in results["cases"]:
        assert case["agents"] == 4
        assert case["failures"] == []
        assert case["rss_idle_mib"] > 0
        assert case["rss_before_mib"] > 0 and case["rss_after_mib"] > 0
        assert math.isfinite(case["kib_per_agent"])
    _written(tmp_path, "memory", results)


def test_reconnect_benchmark_brings_every_agent_back_with_the_outage_writes(
    tmp_path: Path,
) -> None:
    results = bench_reconnect.run(agents=4, processes=2, writes=2, out_dir=tmp_path)
    _machine(results)
    [case] = results["cases"]
    assert case["failures"] == []
    assert case["outage_writes"] == 2
    assert case["lacking_writes"] == {"bench-flag": 0, "outage-1": 0}
    assert case["server_start_seconds"] > 0
    assert case["all_ready_s"] > 0 and case["all_converged_s"] > 0
    _written(tmp_path, "reconnect", results)


def test_the_runner_knows_every_benchmark_and_refuses_unknown_ones() -> None:
    assert set(bench_main.BENCHMARKS) == {
        "hotpath", "writes", "propagation", "memory", "reconnect", "flagd", "agent-cost",
    }  # fmt: skip
    assert bench_main.main(["no-such-benchmark"]) == 2


@pytest.mark.parametrize("protocol", ["flagd", "ofrep"])
def test_flagd_benchmark_sees_every_flip_on_every_stream(tmp_path: Path, protocol: str) -> None:
    results = bench_flagd.run(
        [4], protocol=protocol, flips=3, processes=2, warmup=1, out_dir=tmp_path
    )
    _machine(results)
    [case] = results["cases"]
    assert (case["protocol"], case["streams"], case["processes"]) == (protocol, 4, 2)
    assert case["messages"] == 4 * 3  # every stream, every measured flip
    assert 0 < case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    assert case["server_cpu_us_per_stream_change"] >= 0  # CPU ticks are 10 ms
    _written(tmp_path, protocol, results)


def test_agent_cost_benchmark_measures_every_kind_of_agent(tmp_path: Path) -> None:
    results = bench_agent_cost.run(
        ["sync", "async", "bare"], [False, True], [2], flips=2, changes=4, idle=0.2,
        out_dir=tmp_path, repeat=2,
    )  # fmt: skip
    _machine(results)
    cases = {(c["sdk"], c["cache"]): c for c in results["cases"]}
    # The floor (bare gRPC) has no cache.
    assert set(cases) == {
        ("sync", False), ("sync", True), ("async", False), ("async", True), ("bare", False),
    }  # fmt: skip
    for case in cases.values():
        assert len(case["rounds"]) == 2
        assert case["failures"] == []
        assert (case["agents"], case["flips"]) == (2, 2)
        # The process's own clock has nanoseconds: a change is never free.
        assert case["raw_us_per_agent_change"] > 0
        assert case["idle_ms_per_agent_s"] >= 0
    targets = {v["target"] for v in results["verdicts"]}
    assert targets == {
        "AsyncAgent us/change",
        "Agent / AsyncAgent",
        "Agent / AsyncAgent (cache)",
        "cache file us/change",
        "idle ms/s per agent (worst case)",
    }
    for verdict in results["verdicts"]:
        # A ratio of two figures too small to tell apart from idle CPU is None.
        assert isinstance(verdict["met"], bool) or (
            verdict["met"] is None and verdict["target"].startswith("Agent / AsyncAgent")
        )
    _written(tmp_path, "agent-cost", results)


def test_propagation_benchmark_paces_sync_agents_with_caches(tmp_path: Path) -> None:
    results = bench_propagation.run(
        [3], flips=4, processes=1, warmup=1, gap=0.01, out_dir=tmp_path,
        sdk="sync", cache=True, pace=0.1,
    )  # fmt: skip
    assert (results["sdk"], results["cache"], results["pace_s"]) == ("sync", True, 0.1)
    [case] = results["cases"]
    assert case["failures"] == []
    assert case["missing"] == 0
    assert case["skipped"] == 0  # one flip every 0.1 s: every value seen by every agent
    assert case["commit_p99_ms"] > 0
    _written(tmp_path, "propagation-sync-cache-paced", results)
