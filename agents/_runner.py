"""The one background thread and asyncio loop that every :class:`agents.Agent` of a
process shares.

Each agent's client (:meth:`agents._client.Client.run`) is a task in that loop::

    caller threads ── reads ──▶ agent._snapshot ◀── one assignment ──┐
                                                                      │
    thread "controlplane-agents": one asyncio loop                    │
        task: agent 1's client (one grpc.aio channel) ────────────────┘
        task: agent 2's client ...

One loop rather than a thread and a loop per agent: gRPC's poller thread hands
each completed read or write to the loop it belongs to, a cross-thread wake-up
and a GIL hand-over each; with one loop a burst of changes to many agents costs
one wake-up, and the agents cost what :class:`agents.AsyncAgent` costs
(BENCHMARKS.md, agent cost). The price: change callbacks of every agent of the
process run in that one thread, so a callback that blocks holds the others'
changes (never their reads) until it returns.

The thread starts with the first agent and stops when the last one is closed
(from another thread than its own). Around ``os.fork()`` it is stopped and
started again (:mod:`agents._agent` has the fork hooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import threading
import time

from agents._channels import release_channels
from agents._client import Client

log = logging.getLogger("agents")

THREAD_NAME = "controlplane-agents"
"""The shared thread's name (callbacks of :class:`agents.Agent` run in it)."""


class AgentRun:
    """One agent's client task in the shared loop, and a stop that can be called
    off until it ran (the fork hook keeping a loop that did not stop in time).

    ``done`` is set once the client returned and gRPC let go of its channels.
    """

    def __init__(self, client: Client, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self.client = client
        self.loop = loop
        self.name = name
        self.done = threading.Event()
        self.task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._stop_ran = False
        self._stop_revoked = 0
        """Stops called off and not yet run: one per fork that kept the loop."""

    def begin(self) -> None:
        """In the loop: start the client task."""
        self.task = self.loop.create_task(self._main(), name=self.name)
        # A task cancelled before its first step never enters _main (nor its
        # finally): it is done all the same, with nothing to let go of.
        self.task.add_done_callback(lambda _: self.done.set())

    async def _main(self) -> None:
        try:
            try:
                await self.client.run()
            except asyncio.CancelledError:
                pass
            except BaseException:
                # Also SystemExit from a callback: the loop is every agent's; one
                # agent's end must not be the others'.
                log.exception("agent_client_failed service=%s", self.client.config.service)
            # The cancel's CancelledError (and the session frames it held) is gone
            # here: gRPC can let go of the channels a stop closed.
            await release_channels(self.client.closing_channels)
        finally:
            self.done.set()

    def request_stop(self) -> None:
        """From any thread: cancel the client task in the loop (soon)."""
        try:
            self.loop.call_soon_threadsafe(self._cancel)
        except RuntimeError:  # the loop is closed: nothing runs any more
            with self._lock:
                self._stop_ran = True
            self.done.set()

    def _cancel(self) -> None:
        with self._lock:
            if self._stop_revoked:
                self._stop_revoked -= 1
                return
            self._stop_ran = True
        if self.task is None:
            self.done.set()
        else:
            self.task.cancel()

    def revoke_stop(self) -> bool:
        """Call the requested stop off; False when it ran already (the task is
        cancelled, ending or ended)."""
        with self._lock:
            if self._stop_ran:
                return False
            self._stop_revoked += 1
            return True


class ForkStop(enum.Enum):
    """How the shared loop went into a fork."""

    IDLE = "idle"
    """No loop was running."""
    STOPPED = "stopped"
    """Every client ended and the thread stopped: start them again after."""
    KEPT = "kept"
    """The loop did not stop in time (a callback holding it): it goes on in the
    parent; the child has no agent thread."""
    FROM_LOOP = "from_loop"
    """A callback in the loop itself forked: nothing can be stopped."""


class Runner:
    """The shared thread and loop, and the agents' runs in it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.runs: set[AgentRun] = set()

    def in_loop(self) -> bool:
        """Whether the calling thread is the shared loop's."""
        return self.thread is not None and self.thread is threading.current_thread()

    def start(self, client: Client, name: str) -> AgentRun:
        """Run ``client`` in the shared loop (starting the thread if need be)."""
        with self.lock:
            if (
                self.loop is None
                or self.thread is None
                or self.loop.is_closed()
                or not self.thread.is_alive()
            ):
                self.loop = asyncio.new_event_loop()
                self.thread = threading.Thread(
                    target=_serve, args=(self.loop,), name=THREAD_NAME, daemon=True
                )
                self.thread.start()
            run = AgentRun(client, self.loop, name)
            self.runs.add(run)
            if self.in_loop():
                run.begin()
            else:
                self.loop.call_soon_threadsafe(run.begin)
            return run

    def stop(self, run: AgentRun, timeout: float) -> bool:
        """Stop ``run`` and wait ``timeout`` seconds for it to end; stop the thread
        when no run is left.

        From the loop's own thread (a callback closing its agent) nothing waits:
        the run ends after the callback; the thread stops with a later stop from
        another thread, once no run is left ending.

        Returns:
            Whether the run ended.
        """
        run.request_stop()
        if self.in_loop():
            return False
        if not run.done.wait(timeout):
            return False
        with self.lock:
            # A run stays until it ended (one closed from a callback may still be
            # ending: its loop must not stop under it).
            self.runs = {r for r in self.runs if not r.done.is_set()}
            if self.runs:
                return True
            thread, loop = self.detach()
        if thread is not None and loop is not None:
            _stop_loop(loop, thread, timeout)
        return True

    def detach(self) -> tuple[threading.Thread | None, asyncio.AbstractEventLoop | None]:
        """Forget the thread and loop (under ``lock``); return them to stop."""
        thread, loop = self.thread, self.loop
        self.thread = self.loop = None
        return thread, loop

    # ------------------------------------------------------------ fork

    def before_fork(self, within: float) -> tuple[ForkStop, list[AgentRun]]:
        """Stop every run and the thread, waiting at most ``within`` seconds.

        Called with ``lock`` held (the fork hook holds it across the fork).
        Returns how it went and the runs there were (to start again, or, when
        ``KEPT``, to call their stops off in the parent).
        """
        runs = list(self.runs)
        if self.thread is None or self.loop is None:
            return ForkStop.IDLE, runs
        if self.in_loop():
            return ForkStop.FROM_LOOP, runs
        deadline = time.monotonic() + within
        for run in runs:
            run.request_stop()
        for run in runs:
            if not run.done.wait(max(deadline - time.monotonic(), 0.0)):
                return ForkStop.KEPT, runs
        thread, loop = self.detach()
        assert thread is not None and loop is not None
        if not _stop_loop(loop, thread, max(deadline - time.monotonic(), 0.1)):
            # Every client ended and let go of its channels; a task of an async
            # callback still holds the thread, which closes its loop after it.
            log.warning("agent_thread_not_stopped_before_fork (a callback's task still runs)")
        self.runs.clear()
        return ForkStop.STOPPED, runs

    def keep_after_fork(self, runs: list[AgentRun]) -> list[AgentRun]:
        """In the parent, the loop having not stopped: call the stops off. Return
        the runs whose stop ran already (their clients end: to start again)."""
        return [run for run in runs if not run.revoke_stop()]

    def restart_when_done(self, old: AgentRun, name: str) -> AgentRun:
        """A new run of ``old``'s client, begun in the loop once ``old`` ended."""
        with self.lock:
            assert self.loop is not None
            new = AgentRun(old.client, self.loop, name)
            self.runs.discard(old)
            self.runs.add(new)

            def chain() -> None:
                if old.task is None or old.task.done():
                    new.begin()
                else:
                    old.task.add_done_callback(lambda _: new.begin())

            self.loop.call_soon_threadsafe(chain)
            return new

    def reset_in_child(self) -> None:
        """In a child whose parent's loop did not stop: no thread here, a fresh lock;
        the copied loop is left alone (its thread does not exist in this process)."""
        self.lock = threading.RLock()
        self.thread = self.loop = None
        self.runs = set()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The shared thread: run the loop until stopped, then close it."""
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread, timeout: float) -> bool:
    """Stop the loop (its runs ended) and wait for its thread; whether it ended."""
    with contextlib.suppress(RuntimeError):  # closed already
        loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout)
    return not thread.is_alive()


RUNNER = Runner()
"""This process's shared loop."""
