"""Hot path: nanoseconds per read of the agent, beside OpenFeature and Unleash.

The agent is a real ``agents.Agent`` connected to a fresh server (with its
embedded etcd), its snapshot holding a bool flag, a number flag and a shedding
level (SHEDDABLE at 50 %). Measured the same way in the same run: the OpenFeature
SDK's ``get_boolean_value`` over its ``InMemoryProvider`` and the Unleash
client's ``is_enabled`` bootstrapped from a dict with ``FileCache`` (no Unleash
server), when those packages are installed (``pip install openfeature-sdk
UnleashClient``; a missing one is reported as skipped). Also a plain
``dict.get`` behind a method, as the floor on this machine.

Each figure is the best of ``--repeat`` timeit runs of a statement, each run
long enough to last ~0.2 s (``Timer.autorange``). Writes
``benchmarks/results/hotpath.json``.

    python -m benchmarks.bench_hotpath [--repeat 7] [--number N]
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import tempfile
import threading
import timeit
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc

from agents import Agent, Criticality
from benchmarks._harness import RESULTS_DIR, control_server, machine, print_table, write_results
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t

SERVICE = "bench"
TARGETS_NS = {"agent.enabled": 150.0, "agent.should_shed": 300.0}
"""The issue's targets, by the prefix of the case names they apply to."""
OPTIONS = t.WriteOptions(reason="benchmark", incident="BENCH-1", actor="bench")


class _Floor:
    """A dict lookup behind a method: what the agent's read can at best cost here."""

    def __init__(self) -> None:
        self._flags = {"bench-flag": True}

    def enabled(self, name: str, default: bool = False) -> bool:
        return self._flags.get(name, default)


def _seed(address: str) -> int:
    """The state the agent reads: a bool flag, a number flag, shedding; the last revision."""
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        for name, value in (
            ("bench-flag", t.FlagValue(bool_value=True)),
            ("bench-number", t.FlagValue(number_value=42)),
        ):
            stub.SetFlag(
                m.SetFlagRequest(scope=SERVICE, name=name, value=value, options=OPTIONS),
                timeout=10,
            )
        response = stub.SetShedding(
            m.SetSheddingRequest(service=SERVICE, tier=t.SHEDDABLE, percent=50, options=OPTIONS),
            timeout=10,
        )
    return int(response.result.revision)


@contextmanager
def _real_agent() -> Iterator[Agent]:
    with control_server() as server:
        seeded = _seed(server.address)
        holds = threading.Event()
        agent = Agent(SERVICE, [server.address], version="bench")
        # A new agent may get the server's state from just before the last write
        # (its watch delivers the write a moment later), then the change.
        agent.on_change(lambda change: holds.set() if change.revision >= seeded else None)
        with agent:
            if not holds.wait(30):
                raise RuntimeError(f"the agent did not get revision {seeded}: {agent!r}")
            if agent.enabled("bench-flag") is not True or agent.value("bench-number") != 42:
                raise RuntimeError(f"the agent does not hold the seeded flags: {agent!r}")
            if agent.should_shed(Criticality.SHEDDABLE_PLUS) is not False:
                raise RuntimeError("the agent does not hold the seeded shedding level")
            yield agent


def _optional(module: str) -> ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def _openfeature_client() -> tuple[Any, str] | None:
    api = _optional("openfeature.api")
    memory = _optional("openfeature.provider.in_memory_provider")
    if api is None or memory is None:
        return None
    flag = memory.InMemoryFlag(default_variant="on", variants={"on": True, "off": False})
    api.set_provider(memory.InMemoryProvider({"bench-flag": flag}))
    client = api.get_client()
    if client.get_boolean_value("bench-flag", False) is not True:
        raise RuntimeError("OpenFeature does not hold the flag")
    return client, importlib.metadata.version("openfeature-sdk")


@contextmanager
def _unleash_client() -> Iterator[tuple[Any, str] | None]:
    unleash = _optional("UnleashClient")
    cache_module = _optional("UnleashClient.cache")
    if unleash is None or cache_module is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="cp-bench-unleash-") as directory:
        cache = cache_module.FileCache("bench", directory=directory)
        cache.bootstrap_from_dict(
            {
                "version": 1,
                "features": [
                    {
                        "name": "bench-flag",
                        "enabled": True,
                        "strategies": [{"name": "default"}],
                    }
                ],
            }
        )
        # No server: nothing is fetched, registered or sent (the URL is never used).
        client = unleash.UnleashClient(
            url="http://127.0.0.1:9/api",
            app_name="bench",
            disable_metrics=True,
            disable_registration=True,
            cache=cache,
        )
        try:
            if client.is_enabled("bench-flag") is not True:
                raise RuntimeError("Unleash does not hold the flag")
            yield client, importlib.metadata.version("UnleashClient")
        finally:
            client.destroy()


def _time_ns(stmt: str, env: dict[str, Any], repeat: int, number: int | None) -> float:
    timer = timeit.Timer(stmt, globals=env)
    if number is None:
        number, _ = timer.autorange()
        number = max(number, 1) * 2  # autorange stops at >= 0.2 s: runs of ~0.4 s
    return min(timer.repeat(repeat=repeat, number=number)) / number * 1e9


def run(repeat: int = 7, out_dir: Path = RESULTS_DIR, number: int | None = None) -> dict[str, Any]:
    """Measure every case; print the table, write and return the results.

    ``number`` fixes the calls per timeit run (default: runs of ~0.4 s).
    """
    # Unleash logs a warning per client it thinks is a duplicate; not a result.
    logging.getLogger("UnleashClient").setLevel(logging.ERROR)
    host = machine()
    cases: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}

    def measure(name: str, stmt: str, env: dict[str, Any], library: str) -> None:
        ns = _time_ns(stmt, env, repeat, number)
        target = next((v for k, v in TARGETS_NS.items() if name.startswith(k)), None)
        cases.append(
            {
                "case": name,
                "statement": stmt,
                "library": library,
                "ns_per_call": round(ns, 1),
                "target_ns": target,
                "met": None if target is None else ns <= target,
            }
        )

    with ExitStack() as stack:
        agent = stack.enter_context(_real_agent())
        floor = _Floor()
        # Members bound once, as a service would: ``Criticality.CRITICAL`` itself (an
        # enum class attribute) costs ~70 ns per lookup on Python 3.11.
        env: dict[str, Any] = {
            "agent": agent,
            "floor": floor,
            "critical": Criticality.CRITICAL,
            "sheddable": Criticality.SHEDDABLE,
        }
        measure("floor: dict.get behind a method", "floor.enabled('bench-flag')", env, "-")
        ours: list[tuple[str, str]] = [
            ("agent.enabled (set)", "agent.enabled('bench-flag')"),
            ("agent.enabled (not set)", "agent.enabled('absent', True)"),
            ("agent.value (number)", "agent.value('bench-number')"),
            ("agent.should_shed (more critical)", "agent.should_shed(critical)"),
            ("agent.should_shed (the tier, random)", "agent.should_shed(sheddable)"),
            ("agent.should_shed (a name)", "agent.should_shed('critical')"),
            ("agent.should_shed (the tier, key)", "agent.should_shed(sheddable, key='u-42')"),
        ]
        for name, stmt in ours:
            measure(name, stmt, env, "agents")

        openfeature = _openfeature_client()
        if openfeature is None:
            skipped["openfeature-sdk"] = "not installed (pip install openfeature-sdk)"
        else:
            client, version = openfeature
            measure(
                "openfeature get_boolean_value (in-memory provider)",
                "client.get_boolean_value('bench-flag', False)",
                {"client": client},
                f"openfeature-sdk {version}",
            )
        unleash = stack.enter_context(_unleash_client())
        if unleash is None:
            skipped["UnleashClient"] = "not installed (pip install UnleashClient)"
        else:
            client, version = unleash
            measure(
                "unleash is_enabled (bootstrapped, no server)",
                "client.is_enabled('bench-flag')",
                {"client": client},
                f"UnleashClient {version}",
            )

    results: dict[str, Any] = {
        "benchmark": "hotpath",
        "machine": host,
        "repeat": repeat,
        "cases": cases,
        "skipped": skipped,
    }
    print_table(
        ["case", "ns/call", "target", "met"],
        [[c["case"], c["ns_per_call"], c["target_ns"] or "", _met(c["met"])] for c in cases],
    )
    for library, why in skipped.items():
        print(f"skipped {library}: {why}")
    path = write_results("hotpath", results, out_dir)
    print(f"results: {path}")
    return results


def _met(met: bool | None) -> str:
    return "" if met is None else ("yes" if met else "NO")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7, help="timeit runs; the best counts")
    parser.add_argument("--number", type=int, help="calls per run (default: runs of ~0.4 s)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="results folder")
    args = parser.parse_args(argv)
    run(args.repeat, args.out, args.number)


if __name__ == "__main__":
    main()
