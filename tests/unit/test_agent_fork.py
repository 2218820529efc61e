"""An agent across fork(): what the child restarts, stop requests, callbacks holding the thread."""

from __future__ import annotations

import asyncio
import logging
import os
import threading

import pytest

import agents._agent
import agents._client
import agents._runner
from agents import Agent, AgentState, AsyncAgent, StateChange
from agents._runner import RUNNER, THREAD_NAME, AgentRun
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


async def forever() -> None:
    await asyncio.Event().wait()


def _run_in_this_loop(client: object) -> AgentRun:
    run = AgentRun(client, asyncio.get_running_loop(), "test")  # type: ignore[arg-type]
    run.task = asyncio.ensure_future(forever())
    return run


async def test_a_stop_request_can_be_called_off_until_it_ran() -> None:
    run = _run_in_this_loop(object())
    task = run.task
    assert task is not None
    try:
        run.request_stop()
        assert run.revoke_stop() is True  # called off before it ran: no cancel
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert not task.done()

        run.request_stop()
        await asyncio.sleep(0)  # ran: the task is cancelled
        assert run.revoke_stop() is False  # too late
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        task.cancel()


def test_a_stop_of_a_run_whose_loop_is_closed_is_done_at_once() -> None:
    loop = asyncio.new_event_loop()
    loop.close()
    run = AgentRun(object(), loop, "test")  # type: ignore[arg-type]
    run.request_stop()
    assert run.done.is_set()
    assert run.revoke_stop() is False


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
async def test_a_fork_while_a_callback_holds_the_agents_thread_never_runs_two_threads(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, child: bool
) -> None:
    """The fork hooks, called as os.fork() calls them, around a loop that does
    not stop in time (in this process: the child's side is simulated)."""
    stop_timeout = agents._agent.STOP_TIMEOUT
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
    agent = Agent("checkout", [address], instance_id="web-1", on_change=blocking)
    agent.start()
    try:
        await servicer.wait_ack(4)
        assert await asyncio.to_thread(blocking.entered.wait, 10)
        old, old_loop = RUNNER.thread, RUNNER.loop
        assert old is not None and old.name == THREAD_NAME
        assert old_loop is not None

        def fork() -> None:
            agents._agent._before_fork()
            agents._agent._after_fork(child=child)

        await asyncio.to_thread(fork)
        agent_threads = [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]
        assert agent_threads == [old]  # no second thread on the same client
        messages = [r.getMessage() for r in caplog.records]
        assert any("agent_thread_not_stopped" in m for m in messages)
        if child:
            # No thread: the parent's state, STALE, said loudly; an id of its own.
            assert RUNNER.thread is None
            assert agent._run is None
            assert agent.state is AgentState.STALE
            assert (agent.revision, agent.enabled("a", default=True)) == (4, False)
            assert agent.instance_id == f"web-1-{os.getpid()}"
            assert any("agent_fork_without_agent" in m for m in messages)
            blocking.release.set()
            # (Here the old thread exists only because this is no real child: its
            # client ends by the stop that ran; then the test stops its loop.)
            old_loop.call_soon_threadsafe(old_loop.stop)
            await asyncio.to_thread(old.join, 10)
            assert not old.is_alive()
        else:
            # The parent's loop goes on with the agent's client, connected.
            assert RUNNER.thread is old
            assert agent.state is AgentState.READY
            assert agent.instance_id == "web-1"
            blocking.release.set()
            gate.open()
            await servicer.wait_ack(5)
            assert agent.enabled("a") is True
            assert RUNNER.thread is old and old.is_alive()
    finally:
        blocking.release.set()
        # The short stop was for the fork only: a close on a loaded machine may take
        # longer than 0.2 s (a garbage collection to release the channel).
        monkeypatch.setattr(agents._agent, "STOP_TIMEOUT", stop_timeout)
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    if not child:
        # The last agent closed: the thread stopped with it.
        assert not old.is_alive()
        assert RUNNER.thread is None


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


def test_an_agent_stopped_before_its_client_ran_a_step_is_stopped_at_once() -> None:
    """A fork right after start (gunicorn --preload): the stop comes before the
    client's task ran at all, and must not wait STOP_TIMEOUT for it."""
    agent = Agent("checkout", ["127.0.0.1:1"], instance_id="web-1")
    with RUNNER.lock:  # start and stop asked back to back, as the fork hook would
        agent.start()
        run = agent._run
        assert run is not None
        run.request_stop()
    assert run.done.wait(2)
    agent.close()
    assert RUNNER.thread is None


async def test_stops_called_off_by_two_forks_in_a_row_both_stay_off() -> None:
    """Two forks while a callback holds the loop: each asks a stop and calls it off;
    neither may cancel the client when the loop goes on."""
    run = _run_in_this_loop(object())
    task = run.task
    assert task is not None
    try:
        run.request_stop()
        run.request_stop()
        assert run.revoke_stop() and run.revoke_stop()
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
    finally:
        task.cancel()


class _ExitingClient:
    """A client whose run ends the way a callback calling sys.exit() would end it."""

    closing_channels: list[object] = []

    class config:
        service = "checkout"

    async def run(self) -> None:
        raise SystemExit(3)


class _WaitingClient:
    closing_channels: list[object] = []

    class config:
        service = "payments"

    async def run(self) -> None:
        await asyncio.Event().wait()


def test_a_client_ending_with_system_exit_leaves_the_shared_loop_to_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runner = agents._runner.Runner()
    exiting = runner.start(_ExitingClient(), "exiting")  # type: ignore[arg-type]
    assert exiting.done.wait(5)
    assert runner.thread is not None and runner.thread.is_alive()
    assert any("agent_client_failed" in r.getMessage() for r in caplog.records)
    other = runner.start(_WaitingClient(), "other")  # type: ignore[arg-type]
    thread = runner.thread
    assert runner.stop(other, 5)
    assert runner.thread is None
    thread.join(5)
    assert not thread.is_alive()
