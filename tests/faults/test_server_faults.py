"""Control servers killed under traffic: no acknowledged write lost, agents converge."""

from __future__ import annotations

from pathlib import Path

from controlplane.embedded_etcd import EmbeddedEtcd
from tests.faults.harness import FaultRun, scaled


def test_server_killed_and_restarted_under_traffic(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    kills = int(scaled(2, 5))
    with FaultRun([etcd.endpoint], prefix, tmp_path, agents=int(scaled(20, 60))) as run:
        assert run.writer is not None
        run.writer.start()
        run.writer.wait_acknowledged(20)
        for _ in range(kills):
            run.runners[0].kill()
            run.runners[0].start()
            run.writer.wait_acknowledged(20)
        report = run.finish("server-kill", kills=kills)
    assert report.ok, "\n".join(report.violations)
    assert report.acknowledged >= 20 * (kills + 1)
