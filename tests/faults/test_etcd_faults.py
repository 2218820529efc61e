"""etcd faults under traffic: the leader killed, all of etcd stopped, compaction."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from controlplane.embedded_etcd import EmbeddedEtcd, free_port
from tests.faults.cluster import EtcdCluster, unsafe_to_kill_reason
from tests.faults.harness import FaultRun, scaled
from tests.helpers.raw_etcd import compact_blocking

PREFIX = "/faults/"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_health(address: str, status: int, within: float = 10.0) -> float:
    """Seconds until the server's health (``grpc.health.v1``) says ``status``."""
    started = time.monotonic()
    with grpc.insecure_channel(address) as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(), timeout=within
        )
        for update in watch:
            if update.status == status:
                watch.cancel()
                return time.monotonic() - started
    raise AssertionError(f"{address} never reported {status}")


@pytest.fixture
def kill_safe() -> None:
    reason = unsafe_to_kill_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.usefixtures("kill_safe")
def test_leader_killed_during_writes_then_members_restarted(tmp_path: Path) -> None:
    with (
        EtcdCluster(tmp_path / "etcd") as cluster,
        FaultRun(cluster.endpoints, PREFIX, tmp_path, servers=2, agents=int(scaled(20, 60))) as run,
    ):
        assert run.writer is not None
        run.writer.start()
        run.writer.wait_acknowledged(20)
        rounds = int(scaled(1, 3))
        for _ in range(rounds):
            leader = cluster.leader()
            leader.kill()
            # Writes go on with a new leader (two members of three are a quorum).
            run.writer.wait_acknowledged(20)
            leader.restart(timeout=60)
            run.writer.wait_acknowledged(20)
        report = run.finish("etcd-leader-kill", leader_kills=rounds)
    assert report.ok, "\n".join(report.violations)


@pytest.mark.parametrize("fault", ["stopped", "hung"])
def test_all_of_etcd_stopped_writes_fail_fast_agents_keep_state(tmp_path: Path, fault: str) -> None:
    """``stopped``: etcd's process ends (connections refused). ``hung``: it is paused
    (SIGSTOP): connections stay open and nothing answers, so calls wait --etcd-timeout."""
    etcd = EmbeddedEtcd(
        tmp_path / "etcd", client_port=free_port(), peer_port=free_port(), name="cp-outage"
    )
    etcd.start()
    outage = scaled(3.0, 10.0)
    try:
        with FaultRun(
            [etcd.endpoint], PREFIX, tmp_path, servers=2, agents=int(scaled(20, 60))
        ) as run:
            assert run.writer is not None and run.fleet is not None
            run.writer.start()
            run.writer.wait_acknowledged(20)
            etcd.stop() if fault == "stopped" else etcd.pause()
            stopped_at = time.monotonic()
            not_serving_s = max(wait_health(a, NOT_SERVING) for a in run.addresses)
            mark = len(run.writer.attempts)
            # The outage lasts its length (this is the fault, not a synchronisation).
            time.sleep(max(0.0, outage - (time.monotonic() - stopped_at)))
            during = run.writer.attempts[mark:]
            keys = list(run.keys)
            report = run.fleet.command({"cmd": "report", "flags": keys}, timeout=30)
            etcd.restart() if fault == "stopped" else etcd.resume()
            back_s = max(wait_health(a, SERVING, within=30) for a in run.addresses)
            run.writer.wait_acknowledged(20)
            result = run.finish(
                f"etcd-{fault}",
                outage_s=outage,
                writes_during_outage=len(during),
                slowest_write_during_outage_s=round(max(a.seconds for a in during), 3),
                health_not_serving_after_s=round(not_serving_s, 3),
                serving_again_after_restart_s=round(back_s, 3),
            )
    finally:
        etcd.stop()
    assert result.ok, "\n".join(result.violations)
    # Writes failed fast and said why; none was acknowledged while etcd was down.
    assert during, "the writer made no write during the outage"
    assert {a.code for a in during} == {"UNAVAILABLE"}, {a.code for a in during}
    # Refused connections fail at once; a hung etcd costs --etcd-timeout (1 s).
    assert max(a.seconds for a in during) < (0.5 if fault == "stopped" else 1.5)
    # Agents kept serving what they had: every agent still holds a value for every key.
    for answer in report:
        assert answer["states"] == {"READY": sum(answer["states"].values())}, answer["states"]
        for key in keys:
            assert json.dumps(None) not in answer["values"][key], (key, answer["values"][key])


def test_compaction_during_traffic(tmp_path: Path) -> None:
    etcd = EmbeddedEtcd(tmp_path / "etcd", name="cp-compact")
    etcd.start()
    try:
        with FaultRun(
            [etcd.endpoint], PREFIX, tmp_path, servers=2, agents=int(scaled(20, 60))
        ) as run:
            assert run.writer is not None
            run.writer.start()
            run.writer.wait_acknowledged(10)
            compactions = 0
            stop = threading.Event()

            def compact_while_writing() -> None:
                nonlocal compactions
                while not stop.wait(0.3):
                    compact_blocking(etcd.endpoint)
                    compactions += 1

            compactor = threading.Thread(target=compact_while_writing)
            compactor.start()
            try:
                run.writer.wait_acknowledged(int(scaled(40, 150)))
                # A server restarted after compaction: its agents resume from revisions
                # that are gone, so they must be sent a snapshot.
                run.runners[0].kill()
                run.writer.wait_acknowledged(10)
                compact_blocking(etcd.endpoint)
                run.runners[0].start()
                run.writer.wait_acknowledged(20)
            finally:
                stop.set()
                compactor.join()
            report = run.finish("etcd-compaction", compactions=compactions + 1)
    finally:
        etcd.stop()
    assert report.ok, "\n".join(report.violations)
    assert compactions >= 2
    assert report.acknowledged >= 40
