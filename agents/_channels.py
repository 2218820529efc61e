"""Connecting to a control server: channel options, the reconnect backoff, spare
channels that gRPC keeps retrying, why a channel could not connect, and letting
go of closed channels before a fork.

Used by :class:`agents._client.Client` for each session; no state of its own.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import sys
from collections.abc import Callable
from typing import Any

import grpc
import grpc.aio

log = logging.getLogger("agents")

# Each agent its own TCP connection (channels with equal options would share
# one), and keepalive pings so that a server that stopped answering without
# closing the connection (host down, network cut, process frozen) is noticed
# within 8 s: a ping after 6 s without one, unanswered for 2 s. gRPC core
# enforces the ping timeout (grpc.http2.ping_timeout_ms), not
# grpc.keepalive_timeout_ms (set too, for versions that do). The server accepts
# pings without data every 5 s (grpc.http2.min_ping_interval_without_data_ms);
# pinging at its limit would risk "too_many_pings" and a dropped connection.
CHANNEL_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.use_local_subchannel_pool", 1),
    ("grpc.keepalive_time_ms", 6000),
    ("grpc.keepalive_timeout_ms", 2000),
    ("grpc.http2.ping_timeout_ms", 2000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # The agent reconnects by itself, with its own backoff, to the next server.
    ("grpc.enable_retries", 0),
    # No bandwidth-delay probing (a ping per burst of data, ~25 % of the CPU of a change
    # on both sides): a fixed 256 KiB stream window instead, which takes a 1 MiB snapshot
    # in 4 round trips and bounds what the server can push to an agent that stopped
    # reading (BENCHMARKS.md, round 3).
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 256 * 1024),
    # A channel that could not connect is kept (SPARE_MAX_AGE) and gRPC core
    # retries its connection on this schedule (+-20 % jitter), at ~0.2 ms of
    # CPU an attempt instead of ~1.3 ms for a new channel: what a fleet pays
    # while its server restarts. The cap is the Backoff's. The minimum connect
    # timeout (grpc.min_reconnect_backoff_ms, 20 s) stays: CONNECT_TIMEOUT rules.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)


class Backoff:
    """Exponential backoff with full jitter: attempt ``n`` (from 0) waits a uniform
    random time in ``[0, min(cap, base * 2**n))``.

    Args:
        base: The first attempt's upper bound, in seconds.
        cap: The largest upper bound, in seconds. 1 s: after a server restart the last of
            a fleet is back within about a second of the server listening (a refused
            connection costs both sides little; BENCHMARKS.md, reconnect storm).
        rand: A source of floats in [0, 1).
    """

    def __init__(
        self, base: float = 0.05, cap: float = 1.0, rand: Callable[[], float] = random.random
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rand = rand

    def bound(self) -> float:
        """The upper bound of the next delay."""
        # Past 2**32 the product only grows; the min keeps it at cap.
        return min(self.cap, self.base * float(2 ** min(self.attempt, 32)))

    def next(self) -> float:
        """The next delay, in seconds; each call grows the bound until ``cap``."""
        delay = self._rand() * self.bound()
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from ``base`` (after a connection that worked)."""
        self.attempt = 0


class SessionError(Exception):
    def __init__(self, message: str, synced: bool, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.synced = synced
        self.code = code


async def release_channels(cores: list[Any], within: float = 2.0) -> bool:
    """Run the loop until gRPC let go of the channels in ``cores`` (emptied here).

    Closing a channel cancels its calls, but their operations complete later,
    through gRPC's poller thread and then this loop. A loop closed before that
    never runs them, and what they hold (the call, so the channel) stays alive
    for good, and with it gRPC's poller thread and core, into a fork, where the
    child finds a poller without its thread and hangs or aborts. The stopping
    agent thread runs this after its client task is gone (the task's
    CancelledError holds the last session's frames).

    Returns:
        Whether every channel was released within ``within`` seconds.
    """
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + within
    collected = False
    count = len(cores)
    while cores:
        core = cores.pop()
        # Two references left when released: ``core`` and getrefcount's argument.
        while sys.getrefcount(core) > 2:
            if loop.time() > deadline:
                log.warning("agent_channel_not_released refcount=%d", sys.getrefcount(core))
                return False
            if not collected:
                collected = True
                gc.collect()
                continue
            await asyncio.sleep(0.001)
        del core
    if count:
        log.debug(
            "agent_channels_released count=%d seconds=%.4f collected=%s",
            count,
            loop.time() - started,
            collected,
        )
    return True


class Spare:
    """A channel that could not connect, kept for the next attempt to its server."""

    __slots__ = ("channel", "ready", "since", "why")

    def __init__(self, channel: grpc.aio.Channel, since: float, why: str) -> None:
        self.channel = channel
        self.since = since
        self.why = why
        """Why it could not connect (said again while it still cannot)."""
        self.ready = asyncio.ensure_future(_ready(channel))
        """Done when gRPC's retries connected it."""
        self.ready.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Read a finished task's exception, so that asyncio does not log it as lost."""
    if not task.cancelled():
        task.exception()


async def _ready(channel: grpc.aio.Channel) -> None:
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


async def wait_connected(channel: grpc.aio.Channel, known: str | None = None) -> None:
    """Return once ``channel`` is connected; raise when it fails to connect.

    ``known`` is why it could not connect before (a spare): a channel still
    failing says that again rather than asking gRPC (a call each time).
    """
    state = channel.get_state(try_to_connect=True)
    while state is not grpc.ChannelConnectivity.READY:
        if state in (
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            if known is not None:
                raise SessionError(known, False)
            why = await _connect_error(channel)
            raise SessionError(f"could not connect: {why}" if why else "could not connect", False)
        await channel.wait_for_state_change(state)
        state = channel.get_state(try_to_connect=True)


# A method no server has: a call to it on a channel that failed to connect fails
# at once with gRPC's reason (refused, TLS handshake and certificate errors).
_PROBE_METHOD = "/controlplane.agent.v1.ConnectProbe/Why"

_PROBE_TIMEOUT = 1.0


async def _connect_error(channel: grpc.aio.Channel) -> str:
    """Why ``channel`` could not connect, as gRPC says it ("" if it does not)."""
    try:
        probe = channel.unary_unary(_PROBE_METHOD, None, None)
        await probe(b"", timeout=_PROBE_TIMEOUT)
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.UNAVAILABLE:
            return exc.details() or ""
    except Exception:  # only a better message was at stake
        log.debug("agent_connect_probe_failed", exc_info=True)
    return ""
