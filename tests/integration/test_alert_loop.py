"""The incident loop with real parts: Debian's Alertmanager posts its webhook to the control
server, the trigger's bundle reaches agents in processes of their own, a webhook receiver
hears of it, and resolving the alert reverts it everywhere."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
import yaml
from prometheus_client import CollectorRegistry

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import mitigation_pb2_grpc
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.server import ControlServer
from tests.helpers.agent_process import AgentProcess
from tests.helpers.alertmanager import Alertmanager
from tests.helpers.http_sink import Sink
from tests.integration.conftest import server_config

ALERT = {"alertname": "HighErrorRate", "service": "checkout", "incident": "INC-314"}


@pytest.fixture
async def sink() -> AsyncIterator[Sink]:
    receiver = Sink()
    await receiver.start()
    yield receiver
    await receiver.stop()


async def test_alert_fires_the_bundle_everywhere_and_resolving_reverts_it(
    etcd: EmbeddedEtcd, prefix: str, tmp_path: Path, sink: Sink
) -> None:
    notify = tmp_path / "notify.yaml"
    notify.write_text(
        yaml.safe_dump(
            {
                "destinations": [{"name": "siem", "kind": "webhook", "url": sink.url}],
                "group_window": "200ms",
            }
        )
    )
    notify.chmod(0o600)
    config = server_config(etcd.endpoint, prefix, http="127.0.0.1:0", notify_file=notify)
    server = ControlServer(config, registry=CollectorRegistry())
    await server.start()
    agents: list[AgentProcess] = []
    try:
        assert server.http is not None and server.notifier is not None
        # Told from the moment the notifier sends (its cursors start there).
        async with asyncio.timeout(15):
            while not (server.notifier.sending and server.notifier.ready.is_set()):
                await server.notifier.changed()
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            await stub.SetTrigger(
                m.SetTriggerRequest(
                    trigger=m.Trigger(
                        name="degrade-checkout",
                        matchers=[
                            m.LabelMatcher(label="alertname", value="HighErrorRate"),
                            m.LabelMatcher(
                                label="service",
                                value="checkout|checkout-canary",
                                type=m.MATCH_REGEX,
                            ),
                            # The alert has no env label: "" is neither.
                            m.LabelMatcher(
                                label="env", value="staging|dev", type=m.MATCH_NOT_REGEX
                            ),
                        ],
                        bundle_name="degrade-checkout",
                        changes=[
                            m.BundleChange(
                                set_flag=m.SetFlagRequest(
                                    scope="checkout",
                                    name="new-ui",
                                    value=t.FlagValue(bool_value=False),
                                )
                            )
                        ],
                        revert_on_resolve=True,
                    ),
                    options=t.WriteOptions(reason="page: degrade checkout", actor="oncall"),
                )
            )
        agents = [
            AgentProcess("checkout", [server.address], ["new-ui"], instance_id=f"vm-{i}")
            for i in range(3)
        ]
        for agent in agents:
            await asyncio.to_thread(
                agent.wait_for, lambda line: line.get("state") == "READY", 30, "READY"
            )
        marks = [agent.mark() for agent in agents]

        async with Alertmanager(f"{server.http.url}/v1/alertmanager") as am:
            fired_at = time.time()
            await am.fire(ALERT, {"summary": "5xx above 5% on /pay"}, "http://prom.example/g")
            applied = [
                await asyncio.to_thread(
                    agent.wait_for,
                    lambda line: line.get("flags", {}).get("new-ui") is False,
                    30,
                    "new-ui false",
                    start=mark,
                )
                for agent, mark in zip(agents, marks, strict=True)
            ]
            # Not a timed test: the figure is reported by the benchmark; this says it.
            print(f"alert to last agent: {max(a['t'] for a in applied) - fired_at:.3f}s")

            # The trigger's setting, then the bundle's change and the trigger's word.
            told = [r.json for r in await sink.wait_for(3)]
            assert [(r["kind"], r["actor"]) for r in told] == [
                ("change", "oncall"),
                ("change", "trigger:degrade-checkout"),
                ("trigger", "trigger:degrade-checkout"),
            ], told
            change = told[1]
            assert change["title"] == "checkout: flag new-ui unset -> false", change
            assert change["incident"] == "INC-314"
            assert "5xx above 5% on /pay" in change["reason"]
            assert "applied bundle" in told[2]["title"], told[2]

            marks = [agent.mark() for agent in agents]
            await am.resolve(ALERT)
            for agent, mark in zip(agents, marks, strict=True):
                await asyncio.to_thread(
                    agent.wait_for,
                    lambda line: line.get("flags", {}).get("new-ui") is None,
                    30,
                    "new-ui back to unset",
                    start=mark,
                )
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
            timeline = await stub.GetTimeline(m.GetTimelineRequest(incident="INC-314"))
        actions = [e.change.action for e in timeline.entries]
        assert actions == ["flag.set", "trigger.fired", "flag.revert"], actions
        # Every agent applied the bundle: the timeline says when all had.
        first = timeline.entries[0]
        assert [a.instances for a in first.applied] == [3], first
    finally:
        for agent in agents:
            await asyncio.to_thread(agent.close)
        await server.stop(grace=0)
