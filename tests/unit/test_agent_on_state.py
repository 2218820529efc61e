"""``on_state``: the agent state (READY, STALE) told to callbacks as it changes,
with a scripted Sync server on loopback (tests/helpers/agent_sync.py)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from pathlib import Path

import pytest

from agents import Agent, AgentState, AsyncAgent
from agents._atomic import write_atomic
from agents._cache import snapshot_to_cache
from agents._runner import THREAD_NAME
from tests.helpers.agent_sync import ScriptedSync, flag, serve, snapshot_msg, state

WAIT = 10.0


async def test_callbacks_hear_ready_then_stale_in_the_agent_s_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    servicer = ScriptedSync([snapshot_msg(5, flag("mode", "degraded"))])
    server, address = await serve(servicer)
    agent = AsyncAgent("checkout", [address])
    loop = asyncio.get_running_loop()
    heard: asyncio.Queue[tuple[AgentState, AgentState, bool]] = asyncio.Queue()
    awaited: asyncio.Queue[AgentState] = asyncio.Queue()
    removed: list[AgentState] = []

    def callback(new: AgentState) -> None:
        # The new state, the one reads give meanwhile, and where it runs.
        heard.put_nowait((new, agent.state, asyncio.get_running_loop() is loop))

    async def coroutine_callback(new: AgentState) -> None:
        await asyncio.sleep(0)
        awaited.put_nowait(new)

    def failing(new: AgentState) -> None:
        raise RuntimeError("boom")

    agent.on_state(failing)  # logged; the others still hear
    agent.on_state(callback)
    agent.on_state(coroutine_callback)
    remove = agent.on_state(removed.append)
    remove()
    remove()  # harmless
    assert agent.state is AgentState.CONNECTING
    await agent.start()
    try:
        assert await asyncio.wait_for(heard.get(), WAIT) == (AgentState.READY,) * 2 + (True,)
        assert await asyncio.wait_for(awaited.get(), WAIT) is AgentState.READY
        await server.stop(0)
        assert await asyncio.wait_for(heard.get(), WAIT) == (AgentState.STALE,) * 2 + (True,)
        assert await asyncio.wait_for(awaited.get(), WAIT) is AgentState.STALE
        assert agent.value("mode") == "degraded"
    finally:
        await agent.close()
    # Closed while STALE: no change, nothing more heard.
    assert heard.empty() and awaited.empty()
    assert removed == []
    failures = [r for r in caplog.records if r.getMessage().startswith("agent_state_callback")]
    assert [r.getMessage().split(" callback=")[0] for r in failures] == [
        "agent_state_callback_failed service=checkout"
    ] * 2


async def test_the_threaded_agent_tells_the_cached_state_at_start_then_from_its_thread(
    tmp_path: Path,
) -> None:
    cache = tmp_path / "cache.json"
    write_atomic(cache, snapshot_to_cache(state(3, flag("mode", "cached"))))
    servicer = ScriptedSync([snapshot_msg(5, flag("mode", "server"))])
    server, address = await serve(servicer)
    agent = Agent("checkout", [address], cache_path=cache)
    heard: queue.Queue[tuple[AgentState, str, str, bool]] = queue.Queue()

    def callback(new: AgentState) -> None:
        # By the time it runs, the reads and wait_ready agree with it.
        ready = agent.wait_ready(0)
        heard.put((new, str(agent.value("mode")), threading.current_thread().name, ready))

    agent.on_state(callback)

    def next_heard() -> tuple[AgentState, str, str, bool]:
        return heard.get(timeout=WAIT)

    try:
        agent.start()
        # The cache, loaded by start() in the thread calling it.
        assert heard.get_nowait() == (
            AgentState.STALE,
            "cached",
            threading.current_thread().name,
            False,
        )
        got = await asyncio.to_thread(next_heard)
        assert got == (AgentState.READY, "server", THREAD_NAME, True)
        await asyncio.to_thread(agent.close)
        got = await asyncio.to_thread(next_heard)
        assert got == (AgentState.STALE, "server", THREAD_NAME, False)
    finally:
        await asyncio.to_thread(agent.close)
        await server.stop(0)
    assert heard.empty()


async def test_a_coroutine_callback_without_a_loop_is_logged_and_the_agent_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="agents")
    cache = tmp_path / "cache.json"
    write_atomic(cache, snapshot_to_cache(state(3, flag("mode", "cached"))))
    agent = Agent("checkout", ["127.0.0.1:1"], cache_path=cache)
    heard: list[AgentState] = []

    async def coroutine_callback(new: AgentState) -> None:
        heard.append(new)

    agent.on_state(coroutine_callback)
    # Loaded in a thread without a loop: not run, said, and start() goes on.
    try:
        await asyncio.to_thread(agent.start)
        assert agent.state is AgentState.STALE
        assert agent.value("mode") == "cached"
    finally:
        await asyncio.to_thread(agent.close)
    assert heard == []
    assert any(
        r.getMessage().startswith("agent_state_callback_failed")
        and "needs a running loop" in str(r.exc_info[1] if r.exc_info else "")
        for r in caplog.records
    )
