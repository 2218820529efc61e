"""Waiting for an SDK agent to serve a revision, on its own change callback."""

from __future__ import annotations

import asyncio
import threading

from agents import Agent, AsyncAgent, StateChange


async def serving(agent: Agent | AsyncAgent, revision: int, within: float = 10.0) -> None:
    """Until ``agent`` serves ``revision`` or a later one.

    A server's snapshot is the state its etcd watch has seen: a write acknowledged
    a moment before the agent connected may follow as a change.
    """
    arrived = threading.Event()

    def check(change: StateChange) -> None:
        if change.revision >= revision:
            arrived.set()

    remove = agent.on_change(check)
    try:
        if agent.revision < revision:
            assert await asyncio.to_thread(arrived.wait, within), f"never got to {revision}"
    finally:
        remove()
