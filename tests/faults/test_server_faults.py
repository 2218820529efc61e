"""Control servers killed, agents paused, expiry across restarts: under traffic, checked."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from tests.faults.harness import CONVERGE_WITHIN, FaultRun, scaled


def set_flag(address: str, service: str, name: str, value: str, ttl: float | None = None) -> int:
    options = t.WriteOptions(reason="fault suite probe", actor="fault-suite")
    if ttl is not None:
        options.ttl.CopyFrom(duration_pb2.Duration(seconds=int(ttl), nanos=int(ttl % 1 * 1e9)))
    with grpc.insecure_channel(address) as channel:
        stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
        response = stub.SetFlag(
            m.SetFlagRequest(
                scope=service, name=name, value=t.FlagValue(string_value=value), options=options
            ),
            timeout=10,
            wait_for_ready=True,
        )
    return int(response.result.revision)


def settle(
    run: FaultRun, flags: dict[str, Any], within: float, only: list[int] | None = None
) -> float:
    """Seconds until every agent (of the ``only`` processes) serves ``flags``; fails after
    ``within``."""
    assert run.fleet is not None
    answers = run.fleet.command(
        {"cmd": "settle", "flags": flags, "timeout": within}, timeout=within + 30, only=only
    )
    missing = sum(a["missing"] for a in answers)
    assert missing == 0, f"{missing} agents do not serve {flags} after {within} s"
    return max(float(a["seconds"]) for a in answers)


@pytest.mark.parametrize("writers", [1, 5], ids=["one-writer", "five-writers"])
def test_server_killed_and_restarted_under_traffic(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, writers: int
) -> None:
    """Five writers at once, each on its own key, make the server send writes that meet
    in one transaction (group commit): a kill -9 then catches shared transactions in
    flight, and still no acknowledged write is lost and no failed one shows."""
    kills = int(scaled(2, 5)) if writers == 1 else int(scaled(1, 3))
    per_round = 20 if writers == 1 else 50
    with FaultRun(
        [etcd.endpoint], prefix, tmp_path, agents=int(scaled(20, 60)),
        rate=20.0 * writers, writers=writers,
    ) as run:  # fmt: skip
        assert run.writer is not None
        run.writer.start()
        run.writer.wait_acknowledged(per_round)
        for _ in range(kills):
            run.runners[0].kill()
            run.runners[0].start()
            run.writer.wait_acknowledged(per_round)
        report = run.finish(
            "server-kill" if writers == 1 else "server-kill-concurrent", kills=kills
        )
    assert report.ok, "\n".join(report.violations)
    assert report.acknowledged >= per_round * (kills + 1)
    if writers > 1:
        revisions = [w.revision for w in run.writer.writes if w.outcome == "ok"]
        assert len(set(revisions)) < len(revisions), "no two writes shared a transaction"


def test_two_replicas_one_killed_agents_move_to_the_other(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    agents = int(scaled(20, 60))
    with FaultRun([etcd.endpoint], prefix, tmp_path, servers=2, agents=agents) as run:
        assert run.writer is not None
        run.writer.start()
        run.writer.wait_acknowledged(20)
        run.runners[0].kill()
        killed_at = time.monotonic()
        # A write right after the kill reaches every agent, those of the dead server too.
        set_flag(run.addresses[1], run.service, "probe", "after-kill")
        moved = settle(run, {"probe": "after-kill"}, CONVERGE_WITHIN)
        gap = time.monotonic() - killed_at
        run.writer.wait_acknowledged(20)
        report = run.finish("replica-kill", all_agents_served_a_write_after_kill_s=round(gap, 3))
    assert report.ok, "\n".join(report.violations)
    assert moved <= CONVERGE_WITHIN


def test_a_paused_agent_does_not_hold_up_the_others_and_catches_up(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    pause = scaled(3.0, 10.0)
    with FaultRun(
        [etcd.endpoint], prefix, tmp_path, agents=int(scaled(21, 60)), processes=3
    ) as run:
        assert run.writer is not None and run.fleet is not None
        run.writer.start()
        run.writer.wait_acknowledged(20)
        paused = run.fleet.pids[0]
        os.kill(paused, signal.SIGSTOP)
        try:
            started = time.monotonic()
            others: list[float] = []
            while time.monotonic() - started < pause:
                value = f"during-pause-{len(others)}"
                set_flag(run.addresses[0], run.service, "probe", value)
                # The other processes' agents get each change promptly all along.
                others.append(settle(run, {"probe": value}, 2.0, only=[1, 2]))
        finally:
            os.kill(paused, signal.SIGCONT)
        run.writer.wait_acknowledged(20)
        report = run.finish(
            "agent-paused",
            pause_s=pause,
            others_slowest_probe_s=round(max(others), 3),
            probes=len(others),
        )
    assert report.ok, "\n".join(report.violations)
    assert max(others) < 2.0


def test_expiring_mitigations_expire_on_time_across_a_server_restart(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path
) -> None:
    ttl = scaled(2.0, 5.0)
    with FaultRun([etcd.endpoint], prefix, tmp_path, agents=int(scaled(20, 50))) as run:
        address = run.addresses[0]
        assert run.writer is not None
        run.writer.start()
        set_flag(address, run.service, "degrade", "normal")
        set_flag(address, run.service, "degrade", "degraded", ttl=ttl)
        expires = time.monotonic() + ttl
        settle(run, {"degrade": "degraded"}, CONVERGE_WITHIN)
        run.runners[0].kill()
        # With the server down, every agent still restores the value on time (its own timer).
        settle(run, {"degrade": "normal"}, ttl + CONVERGE_WITHIN)
        late = time.monotonic() - expires
        run.runners[0].start()
        # The restarted server catches up: etcd holds the restored value, audited once.
        with grpc.insecure_channel(address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            watch = stub.WatchChanges(
                m.WatchChangesRequest(service=run.service), timeout=CONVERGE_WITHIN + 5,
                wait_for_ready=True,
            )  # fmt: skip
            next(watch)  # live: what is written from now on comes through it
            flag = stub.GetFlag(m.GetFlagRequest(scope=run.service, name="degrade"), timeout=5)
            if flag.flag.value.string_value != "normal":
                # Not restored yet: the restore is the next change of that flag.
                next(
                    e for r in watch for e in r.changes if e.name == "degrade"
                )  # fmt: skip
                flag = stub.GetFlag(m.GetFlagRequest(scope=run.service, name="degrade"), timeout=5)
            watch.cancel()
            assert flag.flag.value.string_value == "normal"
            history = stub.ListHistory(m.ListHistoryRequest(service=run.service), timeout=5)
        expiries = [e for e in history.entries if e.name == "degrade" and "expire" in e.action]
        assert len(expiries) == 1, [e.action for e in history.entries]
        settle(run, {"degrade": "normal"}, CONVERGE_WITHIN)
        run.writer.wait_acknowledged(20)
        report = run.finish("expiry-restart", ttl_s=ttl, agents_restored_late_by_s=round(late, 3))
    assert report.ok, "\n".join(report.violations)
    assert late < 1.0
