"""One agent process of a benchmark fleet: many SDK agents, one connection each.

Run by :class:`benchmarks._fleet.AgentFleet`, never by hand::

    python -m benchmarks._agent_worker --servers HOST:PORT --service S --count N --name W
        [--sdk async|sync] [--cache DIR]

``--sdk async`` (the default): ``agents.AsyncAgent``, every agent in this
process's one asyncio loop, as a service's agents would in many processes.
``--sdk sync``: ``agents.Agent``, as a threaded or WSGI service runs it. The SDK
gives each its own TCP connection (``grpc.use_local_subchannel_pool``).
``--sdk bare``: ``benchmarks._bare_agent.BareAgent``, what gRPC itself costs.
``--cache DIR``: each agent keeps a cache file ``DIR/<instance>/cache.json``. Each
agent's ``on_change`` callback records ``(revision, time.time())`` of every
change it sees, nothing more.

The driver talks to it in JSON lines: a command on stdin, one answer on stdout.
Before any command the worker prints ``{"event": "ready", ...}`` once every agent
is READY (or the ready timeout passed). Commands (``"cmd"``):

``report``     every agent's arrivals, states and the values of ``flags``
``settle``     wait (``timeout``) until every agent serves ``flags`` (whatever its
               connection state) and, given a ``revision``, its callback heard of
               it; answer with how many do not
``history``    with ``--record``: every agent's applied ``[revision, {flag: value}]``
               sequence (the fault suite's history checker reads it)
``outage``     wait until no agent is READY (the server is gone), then time each
               agent's way back to READY
``expect``     the flag values (``flags``) that make an agent converged
``converged``  wait (``timeout``) until every agent is READY again and converged;
               answer with each agent's times (null: not within the timeout)
``cpu``        this process's CPU seconds so far (user + system, all threads)
``stop``       close every agent and exit (so does the end of stdin)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agents import Agent, AsyncAgent, StateChange
from benchmarks._bare_agent import BareAgent, BareChange

READY_POLL = 0.005
"""Seconds between looks at the agents' states while waiting for an outage."""


class Worker:
    """The agents of this process and what they recorded."""

    def __init__(
        self,
        servers: list[str],
        service: str,
        count: int,
        name: str,
        record: list[str] | None = None,
        *,
        sdk: str = "async",
        cache: Path | None = None,
    ) -> None:
        self.arrivals: list[list[tuple[int, float]]] = [[] for _ in range(count)]
        self.record = record or []
        self.histories: list[list[tuple[int, dict[str, Any]]]] = [[] for _ in range(count)]
        self.expected: dict[str, Any] = {}
        self.converged_at: list[float | None] = [None] * count
        self.ready_at: list[float | None] = [None] * count
        self._waiters: list[asyncio.Task[None]] = []
        self._back = asyncio.Event()
        self._changed = asyncio.Event()
        """Set by every change an agent applies while ``settle`` waits."""
        self._waiting = False
        self._loop = asyncio.get_running_loop()
        self.sync = sdk == "sync"
        kind: type[Agent] | type[AsyncAgent] | type[BareAgent] = {
            "sync": Agent,
            "async": AsyncAgent,
            "bare": BareAgent,
        }[sdk]
        self.agents: list[Agent | AsyncAgent | BareAgent] = [
            kind(
                service,
                servers,
                version="bench",
                instance_id=f"{name}-{i}",
                on_change=self._recorder(i),
                # A folder each, as agents on their own machines have: the override
                # file beside the cache is watched through its folder, and agents
                # sharing one would each hear all the others' cache writes.
                cache_path=str(cache / f"{name}-{i}" / "cache.json") if cache is not None else None,
            )
            for i in range(count)
        ]
        self.sync_agents = [a for a in self.agents if isinstance(a, Agent)]
        self.async_agents = [a for a in self.agents if not isinstance(a, Agent)]

    def _recorder(self, index: int) -> Callable[[StateChange | BareChange], None]:
        arrivals = self.arrivals[index]
        history = self.histories[index]

        def record(change: StateChange | BareChange) -> None:
            now = time.time()
            arrivals.append((change.revision, now))
            if self._waiting:
                # Sync agents call back from the SDK's thread.
                if self.sync:
                    self._loop.call_soon_threadsafe(self._changed.set)
                else:
                    self._changed.set()
            if self.record:
                agent = self.agents[index]
                state = {k: agent.value(k) for k in self.record}
                # A time-boxed change expiring in the agent keeps its revision: when
                # it leaves the recorded flags as they were, it is not theirs to record.
                if not history or history[-1] != (change.revision, state):
                    history.append((change.revision, state))
            if self.expected and self.converged_at[index] is None:
                agent = self.agents[index]
                if all(agent.value(k) == v for k, v in self.expected.items()):
                    self.converged_at[index] = now
                    if self.sync:
                        self._loop.call_soon_threadsafe(self._check_back)
                    else:
                        self._check_back()

        return record

    def _check_back(self) -> None:
        if None not in self.ready_at and None not in self.converged_at:
            self._back.set()

    async def start(self, within: float) -> dict[str, Any]:
        started = time.monotonic()
        for sync_agent in self.sync_agents:
            sync_agent.start()
        for async_agent in self.async_agents:
            await async_agent.start()
        ready = await asyncio.to_thread(_wait_all_ready, self.sync_agents, within)
        ready += await asyncio.gather(*(a.wait_ready(within) for a in self.async_agents))
        return {
            "event": "ready",
            "count": len(self.agents),
            "ready": sum(ready),
            "seconds": round(time.monotonic() - started, 3),
        }

    def report(self, flags: list[str]) -> dict[str, Any]:
        states: dict[str, int] = {}
        for agent in self.agents:
            state = str(agent.state)
            states[state] = states.get(state, 0) + 1
        values = {
            name: _histogram(json.dumps(agent.value(name)) for agent in self.agents)
            for name in flags
        }
        return {"event": "report", "arrivals": self.arrivals, "states": states, "values": values}

    async def outage(self, within: float) -> dict[str, Any]:
        deadline = time.monotonic() + within
        # The SDK signals becoming READY (wait_ready), not leaving it: look.
        while time.monotonic() < deadline and any(a.state == "READY" for a in self.agents):  # noqa: ASYNC110
            await asyncio.sleep(READY_POLL)
        not_ready = sum(a.state != "READY" for a in self.agents)
        self.ready_at = [None] * len(self.agents)
        self.converged_at = [None] * len(self.agents)
        self._back.clear()
        self._waiters = [asyncio.create_task(self._time_ready(i)) for i in range(len(self.agents))]
        return {"event": "outage", "not_ready": not_ready}

    async def _time_ready(self, index: int) -> None:
        agent = self.agents[index]
        if isinstance(agent, Agent):
            # In slices: a thread blocked for good would outlive this task's cancel
            # and hold the worker's exit.
            while not await asyncio.to_thread(agent.wait_ready, 1.0):
                pass
        else:
            await agent.wait_ready()
        self.ready_at[index] = time.time()
        self._check_back()

    def expect(self, flags: dict[str, Any]) -> dict[str, Any]:
        self.expected = dict(flags)
        return {"event": "expect"}

    async def converged(self, within: float) -> dict[str, Any]:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self._back.wait()
        for task in self._waiters:
            task.cancel()
        await asyncio.gather(*self._waiters, return_exceptions=True)
        self._waiters = []
        missing = {
            name: sum(agent.value(name) != value for agent in self.agents)
            for name, value in self.expected.items()
        }
        return {
            "event": "converged",
            "ready_at": self.ready_at,
            "converged_at": self.converged_at,
            "missing": missing,
        }

    async def settle(
        self, flags: dict[str, Any], within: float, revision: int = 0
    ) -> dict[str, Any]:
        started = time.monotonic()

        recorded = [k for k in flags if k in self.record]

        def missing() -> int:
            # The SDK swaps a state in, acknowledges it, and only then calls back: an
            # agent already serving the flags may not have recorded them yet, and the
            # history asked for next must hold them. Settled means both; with a
            # revision, also that every agent's callback heard of it.
            return sum(
                any(agent.value(k) != v for k, v in flags.items())
                or any((history[-1][1] if history else {}).get(k) != flags[k] for k in recorded)
                or (revision > 0 and (not arrivals or arrivals[-1][0] < revision))
                for agent, history, arrivals in zip(
                    self.agents, self.histories, self.arrivals, strict=True
                )
            )

        self._waiting = True
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(within):
                    while missing():
                        self._changed.clear()
                        if not missing():
                            break
                        await self._changed.wait()
        finally:
            self._waiting = False
        return {
            "event": "settle",
            "missing": missing(),
            "seconds": round(time.monotonic() - started, 3),
        }

    def cpu(self) -> dict[str, Any]:
        """This process's CPU time so far (user + system, every thread)."""
        return {"event": "cpu", "seconds": time.process_time(), "at": time.monotonic()}

    async def stop(self) -> None:
        for task in self._waiters:
            task.cancel()
        await asyncio.to_thread(_close_all, self.sync_agents)
        await asyncio.gather(*(a.close() for a in self.async_agents), return_exceptions=True)


def _wait_all_ready(agents: list[Agent], within: float) -> list[bool]:
    deadline = time.monotonic() + within
    return [agent.wait_ready(max(deadline - time.monotonic(), 0.0)) for agent in agents]


def _close_all(agents: list[Agent]) -> None:
    for agent in agents:
        agent.close()


def _histogram(items: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in items:
        counts[item] = counts.get(item, 0) + 1
    return counts


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> None:
    record = [f for f in args.record.split(",") if f]
    worker = Worker(
        args.servers.split(","),
        args.service,
        args.count,
        args.name,
        record,
        sdk=args.sdk,
        cache=Path(args.cache) if args.cache else None,
    )
    try:
        _say(await worker.start(args.ready_timeout))
        while True:
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                return
            command = json.loads(line)
            cmd = command["cmd"]
            if cmd == "report":
                _say(worker.report(command.get("flags", [])))
            elif cmd == "settle":
                _say(
                    await worker.settle(
                        command["flags"],
                        float(command.get("timeout", 5.0)),
                        int(command.get("revision", 0)),
                    )
                )
            elif cmd == "history":
                _say(
                    {
                        "event": "history",
                        "agents": [a.instance_id for a in worker.agents],
                        "histories": worker.histories,
                    }
                )
            elif cmd == "outage":
                _say(await worker.outage(float(command.get("timeout", 10.0))))
            elif cmd == "expect":
                _say(worker.expect(command["flags"]))
            elif cmd == "converged":
                _say(await worker.converged(float(command.get("timeout", 30.0))))
            elif cmd == "cpu":
                _say(worker.cpu())
            elif cmd == "stop":
                return
            else:
                _say({"event": "error", "error": f"unknown command {cmd!r}"})
    finally:
        await worker.stop()
        _say({"event": "stopped"})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="benchmark agent process")
    parser.add_argument("--servers", required=True, help="comma-separated host:port")
    parser.add_argument("--service", required=True)
    parser.add_argument("--count", type=int, required=True, help="agents in this process")
    parser.add_argument("--name", required=True, help="instance id prefix")
    parser.add_argument("--ready-timeout", type=float, default=60.0)
    parser.add_argument(
        "--record", default="", help="comma-separated flags whose values each change records"
    )
    parser.add_argument("--sdk", choices=("async", "sync", "bare"), default="async")
    parser.add_argument("--cache", default="", help="a folder for the agents' cache files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
