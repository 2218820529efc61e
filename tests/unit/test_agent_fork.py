"""An agent across fork(): what the child restarts, stop requests, callbacks holding the thread."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest

import agents._agent
import agents._client
from agents import Agent, AgentState, AsyncAgent, StateChange
from agents._agent import _after_fork_plan, _AfterFork, _StopRequest
from tests.helpers.agent_sync import (
    Gate,
    ScriptedSync,
    WaitAck,
    change_msg,
    flag,
    serve,
    snapshot_msg,
)

# ---------------------------------------------------------------- fork


@pytest.mark.parametrize(
    ("stopped", "kept", "child", "plan"),
    [
        (True, False, False, _AfterFork.RESTART),
        (True, False, True, _AfterFork.RESTART),
        (False, False, False, _AfterFork.NOTHING),
        (False, False, True, _AfterFork.NOTHING),
        # The thread did not stop in time: never a second thread on the same client.
        (False, True, False, _AfterFork.KEEP),
        (False, True, True, _AfterFork.ABANDON),
    ],
)
def test_after_a_fork_the_agent_restarts_only_a_thread_that_stopped(
    stopped: bool, kept: bool, child: bool, plan: _AfterFork
) -> None:
    assert _after_fork_plan(stopped=stopped, kept=kept, child=child) is plan


async def forever() -> None:
    await asyncio.Event().wait()


async def test_a_stop_request_can_be_called_off_until_it_ran() -> None:
    task = asyncio.ensure_future(forever())
    try:
        stop = _StopRequest(task)
        assert stop.revoke() is task
        stop.run()  # called off: no cancel
        assert stop.revoke() is None
        await asyncio.sleep(0)
        assert not task.done()

        ran = _StopRequest(task)
        ran.run()
        assert ran.revoke() is None  # too late: cancelled
        with pytest.raises(asyncio.CancelledError):
            await task

        other = asyncio.ensure_future(forever())
        forgotten = _StopRequest(other)
        forgotten.forget()  # the loop was gone: nothing to call off
        assert forgotten.revoke() is None
        assert not other.cancelled()
        other.cancel()
    finally:
        task.cancel()


class BlockingCallback:
    """A change callback that blocks the agent thread at ``revision`` until released."""

    def __init__(self, revision: int) -> None:
        self.revision = revision
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, change: StateChange) -> None:
        if change.revision == self.revision:
            self.entered.set()
            self.release.wait(30)


@pytest.mark.parametrize("child", [False, True], ids=["parent", "child"])
async def test_a_fork_while_a_callback_holds_the_agent_thread_never_runs_two_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, child: bool
) -> None:
    """The fork hooks, called as os.fork() calls them, around a thread that does
    not stop in time (in this process: the child's side is simulated)."""
    monkeypatch.setattr(agents._agent, "STOP_TIMEOUT", 0.2)
    caplog.set_level(logging.WARNING, logger="agents")
    gate = Gate()
    servicer = ScriptedSync(
        [
            snapshot_msg(3, flag("a", True)),
            WaitAck(3),
            change_msg(4, flag("a", False)),
            gate,
            change_msg(5, flag("a", True)),
        ]
    )
    server, address = await serve(servicer)
    blocking = BlockingCallback(4)
    before = set(threading.enumerate())
    agent = Agent("checkout", [address], instance_id="web-1", on_change=blocking)
    agent.start()
    try:
        await servicer.wait_ack(4)
        assert await asyncio.to_thread(blocking.entered.wait, 10)
        old = agent._thread
        assert old is not None

        def fork() -> None:
            agent._before_fork()
            agent._after_fork(child=child)

        await asyncio.to_thread(fork)
        agent_threads = [
            t
            for t in set(threading.enumerate()) - before
            if t.name.startswith("controlplane-agent") and t.is_alive()
        ]
        assert agent_threads == [old]  # no second thread on the same client
        messages = [r.getMessage() for r in caplog.records]
        assert any("agent_thread_not_stopped" in m for m in messages)
        if child:
            # No thread: the parent's state, STALE, said loudly; an id of its own.
            assert agent._thread is None
            assert agent.state is AgentState.STALE
            assert (agent.revision, agent.enabled("a", default=True)) == (4, False)
            assert agent.instance_id == f"web-1-{os.getpid()}"
            assert any("agent_fork_without_agent" in m for m in messages)
            blocking.release.set()
            # (Here the old thread exists only because this is no real child.)
            await asyncio.to_thread(old.join, 10)
            assert not old.is_alive()
        else:
            # The parent's thread goes on with its client, connected.
            assert agent._thread is old
            assert agent.state is AgentState.READY
            assert agent.instance_id == "web-1"
            blocking.release.set()
            gate.open()
            await servicer.wait_ack(5)
            assert agent.enabled("a") is True
            assert agent._thread is old and old.is_alive()
    finally:
        blocking.release.set()
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert not old.is_alive()


async def test_callbacks_run_for_a_change_whose_ack_could_not_be_sent() -> None:
    """The stream ends right behind a change (the server went, or dropped a paused
    agent): the change is served, and its callbacks run, though its ack is lost."""
    servicer = ScriptedSync(
        [snapshot_msg(3, flag("a", True)), change_msg(4, flag("a", False)), "abort"],
        # Reconnected, the agent gets revision 4 again (a state it may already serve).
        [snapshot_msg(4, flag("a", False))],
    )
    server, address = await serve(servicer)
    seen: list[int] = []
    changed = asyncio.Event()

    def record(change: StateChange) -> None:
        seen.append(change.revision)
        changed.set()

    agent = AsyncAgent("checkout", [address], on_change=record)
    try:
        await agent.start()
        async with asyncio.timeout(10):
            while 4 not in seen:
                changed.clear()
                await changed.wait()
        assert agent.enabled("a", default=True) is False
    finally:
        await agent.close()
        await server.stop(None)
