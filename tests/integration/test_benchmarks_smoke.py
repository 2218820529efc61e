"""Each benchmark at a tiny size, so the scripts cannot rot (timings are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import bench_writes


def test_write_benchmark_runs_and_reports_every_write(tmp_path: Path) -> None:
    results = bench_writes.run(writes=20, concurrency=[1, 4], out_dir=tmp_path)
    assert [c["concurrency"] for c in results["cases"]] == [1, 4]
    for case in results["cases"]:
        assert case["failures"] == 0
        assert case["writes"] == 20
        assert case["writes_per_second"] > 0
        assert case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
    assert json.loads((tmp_path / "writes.json").read_text()) == results
