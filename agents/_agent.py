"""The agents services embed: :class:`Agent` (threads, WSGI) and :class:`AsyncAgent` (asyncio).

Both answer reads from one immutable snapshot held in one attribute; the
background client (``agents._client``) replaces it by assignment. A read is that
attribute lookup plus a dictionary lookup: no lock, no I/O, no clock, no metric.

Threads and fork (:class:`Agent`)::

    caller threads ── reads ──▶ agent._snapshot ◀── one assignment ── the agents' thread
                                                                       (one asyncio loop for
                                                                        every Agent of the
                                                                        process, agents._runner)
    os.fork():  before        stop every agent's client: cancel, close its channel,
                              write the cache; then stop the thread and close the
                              loop (gRPC's poller goes with the last channel); wait
                              STOP_TIMEOUT for all of it
                after (parent) start the thread again: each agent resumes from its
                              last revision
                after (child)  same, with the parent's state and an instance id of its
                              own: a default one made anew (hostname-pid-random), a
                              given one with "-<pid>" appended (agents._config)
                the loop did not stop in time (a change callback still running):
                  parent: the stops not yet run are called off, the loop goes on
                          (an agent whose client ended already starts again)
                  child:  no agent thread (a channel may be alive in the copy):
                          the parent's state, STALE, logged as an error

A gRPC channel alive across fork() can hang the child (grpc/grpc#13873); this
is why the thread stops rather than pauses. ``gunicorn --preload`` (an agent
created before the workers fork) is the case this is for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, Unpack, overload

from agents import _shed, _state
from agents._channels import release_channels
from agents._client import Client
from agents._client_state import AgentState, ChangeCallback
from agents._config import AgentConfig, AgentSettings, forked_config, resolve_config
from agents._runner import RUNNER, AgentRun, ForkStop
from agents._state import Snapshot
from agents._types import Criticality, FlagValue, Override, PinnedVersion, SheddingLevel

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("agents")

_T = TypeVar("_T")

StateCallback = Callable[[AgentState], object]
"""An ``on_state`` callback: called with the agent's new state (a coroutine
function is run as a task of its own in the loop that calls it)."""

STOP_TIMEOUT = 5.0
"""Seconds ``close()`` and the fork hook wait for agents' clients to stop."""


class _Reads:
    """The read API, shared by both agents and matching ``agents.testing.StaticAgent``."""

    _snapshot: Snapshot
    _client: Client
    _ready: threading.Event | asyncio.Event  # READY, as each kind of agent waits for it
    _published: Callable[[], None] | None = None
    """Called after each swap of ``_snapshot``, in the agents' thread (the sidecar's
    state file writer: a new revision may change nothing a change callback hears of)."""

    def _init_reads(
        self,
        config: AgentConfig,
        registry: CollectorRegistry | None,
        on_change: ChangeCallback | None,
    ) -> None:
        """What both agents set up alike: an empty state and the client that fills it."""
        self._snapshot = _state.empty_snapshot(config.service)
        self._state_callbacks: tuple[StateCallback, ...] = ()
        self._state_callbacks_lock = threading.Lock()
        self._state_tasks: set[asyncio.Future[Any]] = set()
        self._client = Client(
            config, publish=self._set_snapshot, on_state=self._state_changed, registry=registry
        )
        if on_change is not None:
            self.on_change(on_change)

    def enabled(self, name: str, default: bool = False) -> bool:
        """The flag's value if it is a bool, else ``default`` (also for a flag never set).

        A flag holding another kind of value is not a kill switch: the default.
        """
        return _state.enabled(self._snapshot, name, default)

    @overload
    def value(self, name: str) -> FlagValue | None: ...
    @overload
    def value(self, name: str, default: _T) -> FlagValue | _T: ...
    def value(self, name: str, default: object = None) -> object:
        """The flag's value of whatever kind (numbers as floats), or ``default``.

        JSON object values are shared by every reader: treat them as read-only.
        """
        return _state.value(self._snapshot, name, default)

    def should_shed(self, criticality: Criticality | str, key: str | None = None) -> bool:
        """Whether to shed a request of this criticality.

        Args:
            criticality: The request's criticality; an unknown value, of
                whatever type, counts as ``CRITICAL`` (reads never raise).
            key: A user or session id: the same key gets the same decision for
                as long as the level holds. Without it, the tier itself is shed
                at random at its percentage.
        """
        if key is None:
            return _shed.should_shed(self._snapshot, criticality, random.random)
        return _shed.should_shed_key(self._snapshot, criticality, key)

    @property
    def pinned_version(self) -> PinnedVersion | None:
        """The pin in force (version, reason, since, expires_at), or None."""
        return self._snapshot.pin

    @property
    def shedding(self) -> SheddingLevel | None:
        """The shedding level in force (tier and percent), or None."""
        return self._snapshot.shedding

    @property
    def revision(self) -> int:
        """The revision of the state served (0: none yet)."""
        return self._snapshot.revision

    @property
    def state(self) -> AgentState:
        """``CONNECTING`` (no state yet), ``READY`` (connected) or ``STALE`` (serving
        the last known state, from memory or the cache file, while no server answers).

        Whatever the state, a break-glass override may be in force above it:
        see :attr:`override_active`."""
        return self._client.state

    @property
    def override_active(self) -> bool:
        """Whether a break-glass override file is applied above the server's state
        (until it expires or the file is removed; ``agents._override``)."""
        return self._snapshot.override is not None

    @property
    def override(self) -> Override | None:
        """The break-glass override in force (reason, actor, expires_at, flags,
        shedding, pin), or None."""
        return self._snapshot.override

    @property
    def service(self) -> str:
        """The service this agent serves the state of."""
        return self._client.config.service

    @property
    def instance_id(self) -> str:
        """This instance's id, as the server's status shows it."""
        return self._client.config.instance_id

    @property
    def server(self) -> str | None:
        """The server the agent is connected to, or None."""
        return self._client.server

    def on_change(self, callback: ChangeCallback) -> Callable[[], None]:
        """Call ``callback`` with a :class:`agents.StateChange` whenever what a
        service sees changes: a change from the server, a time-boxed change
        expiring, the state loaded from the cache at start, or a break-glass
        override applied, replaced, expiring or removed (``change.override``).

        Callbacks run in the agents' background thread, which every
        :class:`Agent` of the process shares (a callback that blocks holds the
        other agents' changes, never their reads), or in the loop of an
        :class:`AsyncAgent`, after the new state is served and acknowledged;
        keep them short. An exception is logged and does not stop the agent.

        Returns:
            A function that removes the callback (calling it twice is harmless).
        """
        return self._client.add_callback(callback)

    def on_state(self, callback: StateCallback) -> Callable[[], None]:
        """Call ``callback`` with the new :class:`agents.AgentState` whenever
        :attr:`state` changes: ``READY`` when a server answered, ``STALE`` when
        none does any more (also once the cache file is loaded at start, and
        once the agent is closed).

        Callbacks run where the state changes: in the agents' background thread
        (in the loop of an :class:`AsyncAgent`), except the ``STALE`` of a cache
        file loaded by :meth:`Agent.start`, which runs in the thread calling it.
        :attr:`state` already gives the new state when they run. Keep them short
        (the agent's next message waits for them); one that returns an awaitable
        has it run as a task of its own in the loop. An exception is logged and
        does not stop the agent.

        Returns:
            A function that removes the callback (calling it twice is harmless).
        """
        with self._state_callbacks_lock:
            self._state_callbacks = (*self._state_callbacks, callback)

        def remove() -> None:
            with self._state_callbacks_lock:
                callbacks = list(self._state_callbacks)
                if callback in callbacks:
                    callbacks.remove(callback)
                    self._state_callbacks = tuple(callbacks)

        return remove

    def _state_changed(self, state: AgentState) -> None:
        self._follow_ready(state)
        self._tell_state(state)

    def _follow_ready(self, state: AgentState) -> None:
        if state is AgentState.READY:
            self._ready.set()
        else:
            self._ready.clear()

    def _tell_state(self, state: AgentState) -> None:
        """Call the ``on_state`` callbacks with ``state``."""
        for callback in self._state_callbacks:
            try:
                result = callback(state)
                if inspect.isawaitable(result):
                    self._run_state_task(result)
            except Exception:
                log.exception(
                    "agent_state_callback_failed service=%s callback=%r state=%s",
                    self.service,
                    callback,
                    state.value,
                )

    def _run_state_task(self, awaitable: Awaitable[object]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            # Agent.start() loading the cache, in a thread without a loop.
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise RuntimeError("a coroutine callback needs a running loop") from None
        task = asyncio.ensure_future(awaitable, loop=loop)
        self._state_tasks.add(task)
        task.add_done_callback(self._state_task_done)

    def _state_task_done(self, task: asyncio.Future[Any]) -> None:
        self._state_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "agent_state_callback_failed service=%s",
                self.service,
                exc_info=task.exception(),
            )

    def _set_snapshot(self, snapshot: Snapshot) -> None:
        # The one write of the read path's attribute: the swap.
        self._snapshot = snapshot
        published = self._published
        if published is not None:
            published()


class Agent(_Reads):
    """The control plane's state for one service, kept current in the background by
    one thread and asyncio loop that every ``Agent`` of the process shares.

    Args:
        service: The service (a DNS label); else ``CONTROLPLANE_SERVICE``.
        servers: Control servers (``host:port``), tried in turn; else
            ``CONTROLPLANE_SERVERS`` (comma-separated).
        version: The version this process runs; else ``CONTROLPLANE_VERSION``,
            else unknown.
        instance_id: This process's id; else ``CONTROLPLANE_INSTANCE_ID``, else
            ``<hostname>-<pid>-<random>``. A default id is made anew in forked
            children; a given one is used as given by this process, and a
            forked child appends its pid (``<id>-<pid>``), so that workers
            forked with the agent running count as instances of their own.
        cache_path: A file to keep the last applied state in and to boot from;
            else ``CONTROLPLANE_CACHE_PATH``, else none.
        override_path: The break-glass override file to watch (format in
            ``agents._override``); else ``CONTROLPLANE_OVERRIDE_PATH``, else
            ``<cache_path>.override.json``, else none; ``""`` for none.
        token: A bearer token sent to the servers (``authorization: Bearer``);
            else ``CONTROLPLANE_TOKEN``, else none. Never logged.
        token_file: A file holding the token instead, read again for each
            connection (a rotated token needs no restart); else
            ``CONTROLPLANE_TOKEN_FILE``. An argument for either of the two
            leaves both variables aside.
        tls: Connect with TLS, verified against the system's roots; else
            ``CONTROLPLANE_TLS`` (``1``/``true``), else off. Implied by
            ``tls_ca`` and ``tls_cert``.
        tls_ca: The CA bundle (PEM) that verifies the servers; else
            ``CONTROLPLANE_TLS_CA``.
        tls_cert: This client's certificate (PEM), for mutual TLS; else
            ``CONTROLPLANE_TLS_CLIENT_CERT``. Needs ``tls_key``.
        tls_key: Its private key (PEM); else ``CONTROLPLANE_TLS_CLIENT_KEY``.
        tls_server_name: The name the servers' certificates are checked
            against, when it is not the host in ``servers``; else
            ``CONTROLPLANE_TLS_SERVER_NAME``.
        insecure: Allow plaintext to servers that are not on loopback; else
            ``CONTROLPLANE_INSECURE``, else off: without TLS every server
            must be on loopback.
        registry: A Prometheus registry for the agent's metrics
            (``controlplane_agent_state``, ``controlplane_agent_applied_revision``,
            ``controlplane_agent_changes_applied_total``,
            ``controlplane_agent_reconnects_total``,
            ``controlplane_agent_last_change_timestamp_seconds``,
            ``controlplane_agent_since_last_contact_seconds``,
            ``controlplane_agent_override_active``); one per agent.
        on_change: A first change callback (see :meth:`on_change`).

    Raises:
        AgentConfigError: ``service`` or ``servers`` is missing, or a setting is
            invalid: a connection setting also when a file it names cannot be
            read, or when a server off loopback would get plaintext without
            ``insecure``.

    Lifecycle:
        - Construction validates the configuration and does no I/O but read
          the TLS and token files it names; reads give their defaults (state
          ``CONNECTING``).
        - :meth:`start` loads the cache file, if any (state ``STALE``: the
          cached state is served until a server answers, since an agent that
          boots during an outage must keep the mitigations in force), applies
          the override file, if there is a valid one, then starts the
          background thread. Calling it again is harmless.
        - :meth:`wait_ready` blocks until a server answered (``READY``).
        - :meth:`close` stops the thread and writes the cache; idempotent. The
          agent keeps answering reads from its last state, which no longer
          changes (nor expires). It cannot be started again.
        - ``with Agent(...) as agent:`` starts and closes.
        - Across ``os.fork()`` the thread is stopped and restarted in the parent
          and the child (see the module docstring).
    """

    _ready: threading.Event

    def __init__(
        self,
        service: str | None = None,
        servers: Sequence[str] | str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        on_change: ChangeCallback | None = None,
        **settings: Unpack[AgentSettings],
    ) -> None:
        self._ready = threading.Event()
        self._init_reads(
            resolve_config(service=service, servers=servers, **settings),
            registry,
            on_change,
        )
        self._lock = threading.RLock()
        self._started = False
        self._closed = False
        self._run: AgentRun | None = None
        """The client's run in the shared loop, while it runs."""
        _AGENTS.add(self)

    def start(self) -> None:
        """Load the cache and the override file (if any) and start the background
        thread.

        Raises:
            RuntimeError: The agent was closed.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the agent is closed; create a new one")
            if self._started:
                return
            self._started = True
            self._client.load_cache()
            self._client.load_override()
            if not self._closed:  # an on_state callback may have closed it meanwhile
                self._begin()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until the agent is ``READY`` or ``timeout`` seconds passed.

        Returns:
            Whether it is ``READY``. False is not an error: the agent keeps
            trying and serves its cached state (``STALE``) or the defaults
            (``CONNECTING``) meanwhile.
        """
        return self._ready.wait(timeout)

    def close(self) -> None:
        """Stop the agent's client (closing its connection) and write the cache.

        Idempotent; safe from a change callback (the client then ends after it).
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            run, self._run = self._run, None
            if run is not None and not RUNNER.stop(run, STOP_TIMEOUT) and not RUNNER.in_loop():
                log.warning(
                    "agent_thread_not_stopped service=%s timeout=%s (a change callback is "
                    "still running?)",
                    self.service,
                    STOP_TIMEOUT,
                )
        _AGENTS.discard(self)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        override = " override=active" if self.override_active else ""
        return (
            f"<Agent service={self.service!r} state={self.state.value} "
            f"revision={self.revision}{override}>"
        )

    # ------------------------------------------------------------ the client

    def _begin(self) -> None:
        self._run = RUNNER.start(self._client, f"controlplane-agent-{self.service}")

    def _forked_in_child(self) -> None:
        """In a forked child: fresh locks and events, an instance id of its own, the
        parent's state (STALE); the client is started again, or not, by the hook."""
        # The child's only thread is the one that forked: locks and events
        # start afresh (the parent's are held by the fork itself).
        self._lock = threading.RLock()
        self._ready = threading.Event()
        self._state_callbacks_lock = threading.Lock()
        self._client.after_fork_in_child(forked_config(self._client.config, os.getpid()))
        # The event is new: it follows the state (the callbacks heard of a change already).
        self._follow_ready(self._client.state)


class AsyncAgent(_Reads):
    """:class:`Agent` for asyncio services: the same reads, the client a task in
    the caller's loop.

    Takes the same arguments as :class:`Agent`.

    Lifecycle:
        - ``await agent.start()`` (in the loop the agent is to run in) loads the
          cache (state ``STALE`` until a server answers) and the override file,
          and starts the task;
          calling it again is harmless.
        - ``await agent.wait_ready(timeout)`` waits for ``READY``.
        - ``await agent.close()`` cancels the task, closing its connection and
          writing the cache; idempotent. Reads keep the last state.
        - ``async with AsyncAgent(...) as agent:`` starts and closes.
        - Change callbacks run in the loop; one that returns an awaitable has it
          run as a task of its own.
        - It does not survive ``os.fork()``: an asyncio loop does not; create
          the agent in the process that uses it.
    """

    _ready: asyncio.Event

    def __init__(
        self,
        service: str | None = None,
        servers: Sequence[str] | str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        on_change: ChangeCallback | None = None,
        **settings: Unpack[AgentSettings],
    ) -> None:
        self._ready = asyncio.Event()
        self._init_reads(
            resolve_config(service=service, servers=servers, **settings),
            registry,
            on_change,
        )
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    async def start(self) -> None:
        """Load the cache and the override file (if any) and start the client task
        in the running loop.

        Raises:
            RuntimeError: The agent was closed.
        """
        if self._closed:
            raise RuntimeError("the agent is closed; create a new one")
        if self._task is not None:
            return
        self._client.load_cache()
        self._client.load_override()
        self._task = asyncio.create_task(self._client.run(), name="controlplane-agent")

    async def wait_ready(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until the agent is ``READY`` or ``timeout`` seconds passed; return
        whether it is."""
        # ``timeout`` as in Agent.wait_ready and StaticAgent.wait_ready, for one API.
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Cancel the client task (closing its connection) and write the cache. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            # The cancelled task keeps its CancelledError, which holds the last
            # session's frames: drop it, then let gRPC finish with the channel.
            del task
            await release_channels(self._client.closing_channels)

    async def __aenter__(self) -> AsyncAgent:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        override = " override=active" if self.override_active else ""
        return (
            f"<AsyncAgent service={self.service!r} state={self.state.value} "
            f"revision={self.revision}{override}>"
        )


# ---------------------------------------------------------------- fork hooks

_AGENTS: weakref.WeakSet[Agent] = weakref.WeakSet()
# The fork in progress: how the loop went into it, its runs, and the agents
# locked for it (each one's lock, then the runner's, held across the fork).
_FORKING: list[tuple[ForkStop, list[AgentRun], list[Agent]]] = []


def _before_fork() -> None:
    agents = list(_AGENTS)
    for agent in agents:
        agent._lock.acquire()
    RUNNER.lock.acquire()
    try:
        outcome, runs = RUNNER.before_fork(STOP_TIMEOUT)
    except Exception:
        log.exception("agent_fork_stop_failed")
        outcome, runs = ForkStop.FROM_LOOP, []
    _FORKING[:] = [(outcome, runs, agents)]
    if outcome is ForkStop.FROM_LOOP and runs:
        # Forking from a change callback: the thread cannot stop itself and
        # wait; the child gets no agent thread of its own.
        log.warning("agent_fork_from_callback agents=%d", len(runs))
    elif outcome is ForkStop.KEPT:
        log.warning(
            "agent_thread_not_stopped timeout=%s agents=%d (a change callback is still running?)",
            STOP_TIMEOUT,
            len(runs),
        )
    elif outcome is ForkStop.STOPPED:
        if any("_poll_wrapper" in thread.name for thread in threading.enumerate()):
            # gRPC's asyncio poller thread lives as long as any grpc.aio channel or
            # server object of the process: another one than the agents' is alive.
            log.warning(
                "agent_fork_with_grpc_aio_alive: a grpc.aio channel or server other than "
                "the agents' is alive across fork(); the child may hang (grpc/grpc#13873)"
            )
        else:
            _wait_grpc_threads_gone(GRPC_THREADS_GRACE)


GRPC_THREADS_GRACE = 0.2
"""Seconds the fork hook waits for gRPC core's threads to end after the agents'
last channel went (they end a millisecond or two after it, here)."""
# Thread names (Linux "comm", 15 characters) of gRPC core's threads.
_GRPC_THREAD_NAMES = ("event_engine", "lifeguard", "grpc_global_tim", "default-executo")


def _wait_grpc_threads_gone(within: float) -> bool:
    """Wait until no gRPC core thread runs (Linux; elsewhere return at once).

    A thread that is still ending when fork() copies the process leaves the
    child's gRPC core half torn down. Another gRPC user in the process (a
    blocking channel) keeps them for good: then this gives up after ``within``.
    """
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks):
        return True
    deadline = time.monotonic() + within
    while True:
        names = []
        for tid in os.listdir(tasks):
            with contextlib.suppress(OSError), open(f"{tasks}/{tid}/comm") as f:
                names.append(f.read().strip())
        if not any(name.startswith(_GRPC_THREAD_NAMES) for name in names):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0005)


def _after_fork(*, child: bool) -> None:
    if not _FORKING:
        return
    (outcome, runs, agents), _FORKING[:] = _FORKING[0], []
    running = [agent for agent in agents if agent._run is not None and agent._run in runs]
    try:
        if child:
            if outcome is ForkStop.FROM_LOOP:
                # The forking thread is the loop's: it goes on, with the parent's
                # clients (the child's only thread).
                RUNNER.lock = threading.RLock()
            else:
                RUNNER.reset_in_child()
            for agent in agents:
                agent._forked_in_child()
        if outcome is ForkStop.STOPPED:
            for agent in running:
                if not agent._closed:
                    agent._begin()
        elif outcome is ForkStop.KEPT and child:
            for agent in running:
                agent._run = None
                log.error(
                    "agent_fork_without_agent service=%s: the agents' thread did not stop "
                    "within %ss before fork() (a change callback still running?); this "
                    "process serves the parent's last state, %s, and gets no updates",
                    agent.service,
                    STOP_TIMEOUT,
                    agent.state.value,
                )
        elif outcome is ForkStop.KEPT:
            # The parent's loop goes on; a client whose stop ran already starts
            # again once it ended.
            ended = set(RUNNER.keep_after_fork(runs))
            for agent in running:
                if agent._run in ended:
                    agent._run = RUNNER.restart_when_done(
                        agent._run, f"controlplane-agent-{agent.service}"
                    )
            log.warning(
                "agent_fork_stop_called_off agents=%d restarted=%d", len(running), len(ended)
            )
    except Exception:
        log.exception("agent_fork_restart_failed")
    finally:
        if not child:
            RUNNER.lock.release()
            for agent in agents:
                agent._lock.release()


def _after_fork_in_parent() -> None:
    _after_fork(child=False)


def _after_fork_in_child() -> None:
    _after_fork(child=True)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork,
        after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )

__all__ = ["Agent", "AgentState", "AsyncAgent"]
