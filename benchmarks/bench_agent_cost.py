"""What the SDK costs the service: CPU per agent per change, and idle, for each kind of agent.

One server (with its embedded etcd); for each case a fresh process of N agents
of service ``bench`` (``python -m benchmarks._agent_worker``), as a service's
process would hold them:

- ``--sdk async``: ``agents.AsyncAgent`` in the process's asyncio loop;
  ``--sdk sync``: ``agents.Agent`` (what threaded and WSGI services use);
  ``--sdk bare``: the floor, what gRPC itself costs an agent
  (``benchmarks._bare_agent``: the stream, each message read and acknowledged,
  nothing else; never with a cache);
- ``--cache``: each agent with a cache file (``cache_path``), as the README
  recommends; without it, none;
- ``--agents``: how many agents the process holds (1 for a service, more for a
  process that stands in for many, as the other benchmarks do).

Per case, after a few unmeasured flips:

- **idle**: the process's CPU over ``--idle`` seconds while connected and nothing
  changes, per agent per second;
- **per change**: the driver flips a bool flag ``--flips`` times (SetFlag, then
  WaitApplied, then ``--gap``), and the process's CPU over the flips, less its
  idle CPU over the same time, is divided by agents x flips. The window ends
  once the cache writer wrote the last flip (``CACHE_WRITE_DELAY`` after it),
  so that every write is counted. A case with few agents flips more (at least
  ``--changes`` agent-changes), since one change costs tens of microseconds.

CPU is the process's own clock (``time.process_time``: every thread, nanosecond
resolution), read by the process when asked. Writes
``benchmarks/results/agent-cost.json``.

    python -m benchmarks.bench_agent_cost [--sdk sync,async,bare] [--cache off,on]
        [--agents 1,100] [--flips 20] [--changes 400] [--idle 5] [--gap 0.05]
        [--repeat 3]

With ``--repeat``, every case runs that many times, the rounds interleaved, and
each figure is the median of its rounds (all of them are in the results file).
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from agents._client_state import CACHE_WRITE_DELAY
from benchmarks._fleet import AgentFleet
from benchmarks._harness import RESULTS_DIR, control_server, machine, print_table, write_results
from benchmarks.bench_propagation import SERVICE, _Driver, _flip
from controlplane.transport import ClientSecurity

WARMUP = 3
TARGETS = {
    "async_us": 150.0,
    "sync_ratio": 1.2,
    "cache_us": 100.0,
    "idle_ms_per_s": 0.1,
}
"""What an agent may cost: AsyncAgent per change, Agent against AsyncAgent, what a
cache file adds per change, and idle CPU per agent per second."""


def _cpu(fleet: AgentFleet) -> tuple[float, float]:
    [answer] = fleet.command({"cmd": "cpu"}, timeout=30)
    return float(answer["seconds"]), float(answer["at"])


def _run_case(
    driver: _Driver,
    address: str,
    sdk: str,
    cache: bool,
    agents: int,
    flips: int,
    idle: float,
    gap: float,
    value: bool,
) -> tuple[dict[str, Any], bool]:
    failures: list[str] = []
    with (
        tempfile.TemporaryDirectory(prefix="cp-bench-cache-") as folder,
        AgentFleet(
            [address],
            SERVICE,
            agents=agents,
            processes=1,
            name=f"cost-{sdk}-{'cache' if cache else 'nocache'}-{agents}",
            sdk=sdk,
            cache=Path(folder) if cache else None,
        ) as fleet,
    ):
        if fleet.ready[0]["ready"] != agents:
            failures.append(f"{agents - fleet.ready[0]['ready']} agents not READY")
        for _ in range(WARMUP):
            value = not value
            _flip(driver, value)
            time.sleep(gap)
        # The cache writes of the last flips (after CACHE_WRITE_DELAY) are not idle.
        time.sleep(CACHE_WRITE_DELAY + 0.5)

        cpu0, at0 = _cpu(fleet)
        time.sleep(idle)
        cpu1, at1 = _cpu(fleet)
        idle_rate = (cpu1 - cpu0) / (at1 - at0)

        cpu0, at0 = _cpu(fleet)
        for _ in range(flips):
            value = not value
            revision, _, _, waited = _flip(driver, value)
            if not waited.all_applied or waited.connected != agents:
                failures.append(f"revision {revision}: {waited.applied}/{waited.connected} applied")
            time.sleep(gap)
        time.sleep(CACHE_WRITE_DELAY + 0.5)
        cpu1, at1 = _cpu(fleet)
        [settled] = fleet.command(
            {"cmd": "settle", "flags": {"bench-flag": value}, "timeout": 10}, timeout=30
        )
        if settled["missing"]:
            failures.append(f"{settled['missing']} agents do not serve the last value")
    changes = agents * flips
    raw = cpu1 - cpu0
    net = raw - idle_rate * (at1 - at0)
    return {
        "sdk": sdk,
        "cache": cache,
        "agents": agents,
        "flips": flips,
        "us_per_agent_change": round(net * 1e6 / changes, 1),
        "raw_us_per_agent_change": round(raw * 1e6 / changes, 1),
        "idle_ms_per_agent_s": round(idle_rate * 1000 / agents, 4),
        "idle_seconds": idle,
        "failures": failures,
    }, value


def _median(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """A case's figures over its rounds: the median of each, every round kept."""
    case = dict(rounds[0])
    for key in ("us_per_agent_change", "raw_us_per_agent_change", "idle_ms_per_agent_s"):
        case[key] = statistics.median(r[key] for r in rounds)
    case["failures"] = [f for r in rounds for f in r["failures"]]
    case["rounds"] = [
        {k: r[k] for k in ("us_per_agent_change", "raw_us_per_agent_change", "idle_ms_per_agent_s")}
        for r in rounds
    ]
    return case


def _verdicts(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target, per number of agents: the figure and whether it is met."""
    by = {(c["sdk"], c["cache"], c["agents"]): c for c in cases}
    verdicts: list[dict[str, Any]] = []
    for agents in sorted({c["agents"] for c in cases}):
        plain = by.get(("async", False, agents))
        if plain is not None:
            figure = plain["us_per_agent_change"]
            verdicts.append(
                {"agents": agents, "target": "AsyncAgent us/change", "figure": figure,
                 "limit": TARGETS["async_us"], "met": figure <= TARGETS["async_us"]}
            )  # fmt: skip
        for cache in (False, True):
            sync, asyn = by.get(("sync", cache, agents)), by.get(("async", cache, agents))
            if sync is not None and asyn is not None:
                # None: too few changes to tell the cost from the idle CPU.
                ratio = (
                    round(sync["us_per_agent_change"] / asyn["us_per_agent_change"], 2)
                    if asyn["us_per_agent_change"] > 0
                    else None
                )
                verdicts.append(
                    {"agents": agents,
                     "target": "Agent / AsyncAgent" + (" (cache)" if cache else ""),
                     "figure": ratio, "limit": TARGETS["sync_ratio"],
                     "met": None if ratio is None else ratio <= TARGETS["sync_ratio"]}
                )  # fmt: skip
        cached = by.get(("async", True, agents))
        if plain is not None and cached is not None:
            added = round(cached["us_per_agent_change"] - plain["us_per_agent_change"], 1)
            verdicts.append(
                {"agents": agents, "target": "cache file us/change", "figure": added,
                 "limit": TARGETS["cache_us"], "met": added <= TARGETS["cache_us"]}
            )  # fmt: skip
        worst = max(
            (c["idle_ms_per_agent_s"] for c in cases if c["agents"] == agents), default=math.nan
        )
        verdicts.append(
            {"agents": agents, "target": "idle ms/s per agent (worst case)", "figure": worst,
             "limit": TARGETS["idle_ms_per_s"], "met": worst <= TARGETS["idle_ms_per_s"]}
        )  # fmt: skip
    return verdicts


def run(
    sdks: list[str],
    caches: list[bool],
    sizes: list[int],
    flips: int = 20,
    changes: int = 400,
    idle: float = 5.0,
    gap: float = 0.05,
    out_dir: Path = RESULTS_DIR,
    repeat: int = 1,
) -> dict[str, Any]:
    """Run every case against one server; print the tables, write and return the results."""
    results: dict[str, Any] = {"benchmark": "agent-cost", "machine": machine(), "cases": []}
    runs: dict[tuple[str, bool, int], list[dict[str, Any]]] = {}
    with control_server() as server, ClientSecurity().channel(server.address) as channel:
        driver = _Driver(channel)
        value = False
        driver.set_flag(SERVICE, value)
        # Rounds of every case, interleaved: the machine's drift spreads over all.
        for _ in range(repeat):
            for agents, sdk, cache in itertools.product(sizes, sdks, caches):
                if sdk == "bare" and cache:
                    continue
                case_flips = max(flips, math.ceil(changes / agents))
                case, value = _run_case(
                    driver, server.address, sdk, cache, agents, case_flips, idle, gap, value
                )
                runs.setdefault((sdk, cache, agents), []).append(case)
    results["cases"] = [_median(rounds) for rounds in runs.values()]
    results["verdicts"] = _verdicts(results["cases"])
    print_table(
        ["sdk", "cache", "agents", "flips", "us/agent/change", "raw", "idle ms/s/agent",
         "failures"],
        [
            [c["sdk"], "on" if c["cache"] else "off", c["agents"], c["flips"],
             c["us_per_agent_change"], c["raw_us_per_agent_change"], c["idle_ms_per_agent_s"],
             len(c["failures"])]
            for c in results["cases"]
        ],
    )  # fmt: skip
    print()
    print_table(
        ["agents", "target", "figure", "limit", "met"],
        [
            [v["agents"], v["target"], v["figure"], v["limit"], v["met"]]
            for v in results["verdicts"]
        ],
    )
    for case in results["cases"]:
        for failure in case["failures"][:5]:
            print(f"  {case['sdk']} cache={case['cache']} {case['agents']}: {failure}")
    path = write_results("agent-cost", results, out_dir)
    print(f"results: {path}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--sdk", default="sync,async,bare", help="comma-separated: sync, async, bare"
    )
    parser.add_argument("--cache", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--agents", default="1,100", help="agents per process, comma-separated")
    parser.add_argument("--flips", type=int, default=20, help="measured flips per case, at least")
    parser.add_argument(
        "--changes", type=int, default=400, help="agent-changes per case, at least (more flips)"
    )
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of idle measured")
    parser.add_argument("--gap", type=float, default=0.05, help="seconds between flips")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    parser.add_argument(
        "--repeat", type=int, default=1, help="rounds of every case; figures are medians"
    )
    args = parser.parse_args(argv)
    sdks = [s for s in args.sdk.split(",") if s]
    unknown = set(sdks) - {"sync", "async", "bare"}
    caches_text = [c for c in args.cache.split(",") if c]
    if unknown or set(caches_text) - {"on", "off"}:
        parser.error("--sdk takes sync, async and/or bare; --cache takes off and/or on")
    run(
        sdks,
        [c == "on" for c in caches_text],
        [int(a) for a in args.agents.split(",")],
        args.flips,
        args.changes,
        args.idle,
        args.gap,
        args.out,
        args.repeat,
    )


if __name__ == "__main__":
    main()
