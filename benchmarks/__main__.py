"""Run every benchmark at its default size: ``python -m benchmarks`` (``make bench``).

    python -m benchmarks [NAME ...]     # some of them only, e.g. hotpath memory

Each starts its own etcd and servers, prints its table and writes
``benchmarks/results/<name>.json``; see BENCHMARKS.md. The whole run takes
about six minutes on two cores.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from benchmarks import (
    bench_agent_cost,
    bench_flagd,
    bench_hotpath,
    bench_memory,
    bench_propagation,
    bench_reconnect,
    bench_writes,
)

BENCHMARKS: dict[str, Callable[[list[str]], None]] = {
    "hotpath": bench_hotpath.main,
    "writes": bench_writes.main,
    "propagation": bench_propagation.main,
    "memory": bench_memory.main,
    "reconnect": bench_reconnect.main,
    "flagd": bench_flagd.main,
    "agent-cost": bench_agent_cost.main,
}


def main(argv: list[str]) -> int:
    names = argv or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}")
        return 2
    for name in names:
        print(f"== {name} ==", flush=True)
        BENCHMARKS[name]([])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
