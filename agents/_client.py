"""The agent's background half: one Sync stream, reconnects, acks, expiry, cache.

:class:`Client` runs as one coroutine, :meth:`Client.run`, in one asyncio loop:
the loop of the agent's own thread for :class:`agents.Agent`, the caller's loop
for :class:`agents.AsyncAgent`. Everything it does happens in that loop, so it
needs no lock of its own; it hands each new snapshot to the agent through
``publish`` (one attribute assignment), which is all the read path ever sees.

Per connection (DESIGN.md, "Agent protocol")::

    channel (own subchannel pool, keepalive; TLS as config.security says)
      -> wait until connected (CONNECT_TIMEOUT; a failure says gRPC's reason,
         e.g. a TLS handshake error)
    a channel that could not connect is kept as the server's spare (up to
      SPARE_MAX_AGE): gRPC retries it in the background, the backoff ends early
      when it connects, and the next attempt to that server uses it
    the token, if any, in the Sync's metadata (a token file read again each time)
    Sync: Hello(service, instance, version, last applied revision, agent version)
          (revision 0 after a rejection: a full snapshot, please)
      <- Snapshot   replaces the state, ack (older than the applied one: etcd
                    went back, applied with a warning)
      <- Resume     nothing missed but what follows
      <- Change     applied as one unit: ack; not newer than the state: dropped
      READY once the first Snapshot is applied or the Resume accepted
    a malformed Snapshot or Change: nack, keep the state, end the stream and
      reconnect (with backoff) asking for a snapshot
    token refused (UNAUTHENTICATED, PERMISSION_DENIED): logged at ERROR (once per
      server, again every AUTH_ERROR_REPEAT seconds while it lasts), state kept,
      backoff, next server
    stream lost -> STALE (or CONNECTING without state), backoff, next server;
      the backoff starts again from its base only after a session that stayed
      up STABLE_SESSION seconds

Beside the stream, in the same loop: the expiry timer (swaps the snapshot to
:func:`agents._state.at` at ``next_expiry``, connected or not), the cache
writer (writes each applied state on a worker thread, newest wins) and the
override watcher.

Break-glass overrides (``agents._override``)::

    every POLL_INTERVAL: stat the override file; read and parse it when its
      identity, size or modification time changed
      valid      -> in force, above the server's state (replacing any previous one)
      malformed  -> an error logged, what was in force stays
      gone       -> no override
    at its expires_at (the expiry timer) -> no override
    reads see apply_override(base, override): the client keeps the server's
      state (``snapshot``, cached, acked, expiring) and the override apart

    each change of the override is queued for the server (active, or cleared);
    on connect: the override in force goes in the Hello when the queue holds
      nothing else; otherwise the Hello has none and the queue follows the first
      answer, in order (an override applied and gone while no server answered
      is audited when one does); while connected: sent as it happens

All of it happens whether a server answers or not (fail static).

Callbacks run in the client's loop after the swap and the ack; an exception in
one is logged and the others still run. A slow callback delays the next
message, never a read.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import inspect
import logging
import random
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

import controlplane
from agents import _codec, _state
from agents._cache import CacheWriter, read_cache
from agents._config import SECURITY_NAMES, AgentConfig
from agents._override import (
    POLL_INTERVAL,
    OverrideExpiredError,
    OverrideFile,
    cleared_to_proto,
    override_to_proto,
)
from agents._state import (
    InvalidChangeError,
    Snapshot,
    StaleRevisionError,
    StateChange,
)
from agents._types import Override
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.transport import TransportConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("agents")

ChangeCallback = Callable[[StateChange], Any]
"""An ``on_change`` callback: called with what changed (a coroutine function is
awaited as a task of its own by :class:`agents.AsyncAgent`)."""

AGENT_VERSION = controlplane.__version__

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
CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP + HTTP/2 connection before trying the next server."""
SPARE_MAX_AGE = 10.0
"""Seconds a channel that could not connect is reused for the next attempts to its
server (gRPC retrying in the background) before a new one is made, which reads
the TLS files again."""
FIRST_RESPONSE_TIMEOUT = 10.0
"""Seconds to wait for the first response after the Hello (the server may wait up
to 5 s for its etcd watch to catch up with the agent's revision)."""
_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
EXPIRY_RECHECK = 30.0
"""The expiry timer sleeps at most this long before reading the clock again, so
that a wall clock set forward is followed within that time."""
STABLE_SESSION = 5.0
"""Seconds a session must have stayed up (from its first applied answer) for the
reconnect backoff to start again from its base: a server that accepts streams
and drops them at once is retried with a growing backoff, not every 50 ms by
every agent."""
NACK_CLOSE_TIMEOUT = 2.0
"""Seconds to wait, after a nack, for the server to end the stream the agent
closed its side of (so that the nack is read before the connection goes)."""
OVERRIDE_OUTBOX = 32
"""At most this many override reports wait for a server; older ones are dropped."""
AUTH_ERROR_REPEAT = 300.0
"""Seconds after which a refused token (or unusable connection settings) is logged
at ERROR again while it goes on; in between, the same refusal is DEBUG."""
_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)
REFUSED_BACKOFF_CAP = 30.0
"""Seconds: the longest wait before trying again after the server refused the token
(full jitter from 1 s up; a fixed token file is used at the next try)."""


class AgentState(enum.StrEnum):
    """Where an agent's state comes from (DESIGN.md, "Agent protocol").

    Members compare equal to their names (``agent.state == "READY"``).
    """

    CONNECTING = "CONNECTING"
    """No state yet: reads give their defaults."""
    READY = "READY"
    """Connected: the state is the server's, kept current by the stream."""
    STALE = "STALE"
    """Not connected: serving the last known state (from memory or the cache
    file) until a server answers. Time-boxed changes still expire on time."""


class _Keep(enum.Enum):
    """``Client._update``'s default: the override stays as it is."""

    KEEP = "keep"


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


class _Metrics:
    """The agent's metrics in the registry it was given (never on the read path)."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        from prometheus_client import Gauge

        self.state = Gauge(
            "controlplane_agent_state",
            "1 for the agent's current state (CONNECTING, READY, STALE), 0 for the others.",
            ["service", "state"],
            registry=registry,
        )
        self.revision = Gauge(
            "controlplane_agent_applied_revision",
            "The revision of the state the agent serves.",
            ["service"],
            registry=registry,
        ).labels(service)
        self.since_contact = Gauge(
            "controlplane_agent_since_last_contact_seconds",
            "Seconds since the agent last heard from a server (0 while connected).",
            ["service"],
            registry=registry,
        ).labels(service)
        self.override_active = Gauge(
            "controlplane_agent_override_active",
            "1 while a break-glass override file is applied above the server's state.",
            ["service"],
            registry=registry,
        ).labels(service)
        self._service = service

    def set_state(self, state: AgentState) -> None:
        for member in AgentState:
            self.state.labels(self._service, member.value).set(1 if member is state else 0)


def _now() -> datetime:
    return datetime.now(UTC)


class Client:
    """The background client of one agent.

    ``snapshot`` is the server's state (cached, acknowledged, expiring);
    ``override`` the break-glass override in force; ``effective`` what the
    reads see, ``apply_override(snapshot, override)``.

    Args:
        config: The agent's resolved configuration.
        publish: Called with each new effective snapshot; must be one attribute
            assignment.
        on_state: Called with each new state, in the client's loop.
        registry: Where to register the agent's metrics, if anywhere.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        publish: Callable[[Snapshot], None],
        on_state: Callable[[AgentState], None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.config = config
        self.snapshot = _state.empty_snapshot(config.service)
        self.override: Override | None = None
        self.effective = self.snapshot
        self.state = AgentState.CONNECTING
        self.server: str | None = None
        self._publish = publish
        self._on_state = on_state
        self._has_state = False
        self._callbacks: tuple[ChangeCallback, ...] = ()
        self._callbacks_lock = threading.Lock()
        # The effective state callbacks last heard of, while changes happen
        # before run() (cache, override file): they hear of them when it starts.
        self._unnotified: Snapshot | None = None
        self._override_file = (
            OverrideFile(config.override_path) if config.override_path is not None else None
        )
        # Override reports not yet written to a stream, oldest first.
        self._outbox: list[agent_pb2.Override] = []
        self._report_call: Any = None
        self._report_task: asyncio.Task[None] | None = None
        self._write_lock: asyncio.Lock | None = None
        self._cache = CacheWriter(config.cache_path) if config.cache_path else None
        self._cache_sequence = 0
        # (sequence, state, replace_newer): the next state for the cache writer.
        self._cache_pending: tuple[int, Snapshot, bool] | None = None
        self._cache_wakeup: asyncio.Event | None = None
        self._expiry_wakeup: asyncio.Event | None = None
        self._next_server = 0
        self._connected = False
        self.backoff = Backoff()
        """The reconnect backoff, across sessions."""
        self._resync = False
        """Ask for a full snapshot (Hello revision 0): a Snapshot or Change was rejected."""
        self._sent_token: str | None = None
        """The token the last session sent, to keep it out of logged server details."""
        self._hello_revision = 0
        self._synced_at: float | None = None
        self._last_contact = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._spares: dict[str, _Spare] = {}
        """Per server, a channel that could not connect, gRPC retrying it."""
        self.closing_channels: list[Any] = []
        """gRPC's channel objects of the sessions closed by a stop, for
        :func:`release_channels`."""
        self._metrics: _Metrics | None = None
        if registry is not None:
            self._metrics = _Metrics(registry, config.service)
            self._metrics.set_state(self.state)
            self._metrics.revision.set(0)
            self._metrics.since_contact.set_function(self._seconds_since_contact)
            self._metrics.override_active.set(0)

    # ------------------------------------------------------------ callbacks

    def add_callback(self, callback: ChangeCallback) -> Callable[[], None]:
        """Register ``callback``; return a function that removes it (idempotent)."""
        with self._callbacks_lock:
            self._callbacks = (*self._callbacks, callback)

        def remove() -> None:
            with self._callbacks_lock:
                callbacks = list(self._callbacks)
                if callback in callbacks:
                    callbacks.remove(callback)
                    self._callbacks = tuple(callbacks)

        return remove

    # ------------------------------------------------------------ start-up

    def load_cache(self) -> bool:
        """Serve the cache file's state, if there is a usable one (state STALE).

        Called once, before :meth:`run`, in the starting thread. The callbacks
        hear of the loaded state from the client's loop when it starts.
        """
        if self._cache is None or self._has_state:
            return False
        cached = read_cache(self._cache.path, self.config.service, _now())
        if cached is None:
            return False
        if self._unnotified is None:
            self._unnotified = self.effective
        self._update(cached)
        self._has_state = True
        log.info(
            "agent_cache_loaded service=%s path=%s revision=%d",
            self.config.service,
            self._cache.path,
            cached.revision,
        )
        self._set_state(AgentState.STALE)
        return True

    def load_override(self) -> bool:
        """Apply the override file, if there is a valid one (before :meth:`run`,
        in the starting thread, so that the first reads already see it).

        Returns:
            Whether an override is in force.
        """
        if self._unnotified is None:
            self._unnotified = self.effective
        self.check_override(_now())
        return self.override is not None

    def after_fork_in_child(self, config: AgentConfig) -> None:
        """Forget the parent's connection and locks; keep its state.

        The state becomes ``STALE`` (``CONNECTING`` without state): also when
        the parent's thread was still running, connected, at the fork.
        """
        self.config = config
        self._callbacks_lock = threading.Lock()
        if self._cache is not None:
            self._cache.reset_after_fork()
        self._tasks = set()
        self._cache_wakeup = self._expiry_wakeup = None
        self._report_call = self._report_task = self._write_lock = None
        self._spares = {}
        self.closing_channels = []
        self.server = None
        self._set_connected(False)

    # ------------------------------------------------------------ the coroutine

    async def run(self) -> None:
        """Keep a stream to one of the servers until cancelled.

        Cancel the task running it to stop; it then closes its channel and writes
        the last applied state to the cache before returning. It may be run again
        (in another loop) afterwards and resumes from the state it has.
        """
        self._cache_wakeup = asyncio.Event()
        self._expiry_wakeup = asyncio.Event()
        self._write_lock = asyncio.Lock()
        helpers = [
            asyncio.create_task(self._expiry_loop(), name="controlplane-agent-expiry"),
            asyncio.create_task(self._cache_loop(), name="controlplane-agent-cache"),
        ]
        if self._override_file is not None:
            helpers.append(
                asyncio.create_task(self._override_loop(), name="controlplane-agent-override")
            )
        try:
            if self._unnotified is not None:
                before, self._unnotified = self._unnotified, None
                self._notify(_state.diff(before, self.effective))
            await self._connect_loop()
        finally:
            if self._report_task is not None:
                helpers.append(self._report_task)
                self._report_task = None
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            self._tasks.clear()
            await self._drop_spares(release=True)
            self._set_connected(False)

    async def _connect_loop(self) -> None:
        backoff = self.backoff
        # A refused token is not fixed by retrying at once: a fleet whose token was
        # revoked must not hammer the servers with handshakes (REFUSED_BACKOFF_CAP).
        refused_backoff = Backoff(base=1.0, cap=REFUSED_BACKOFF_CAP)
        servers = self.config.servers
        # The last failure per server: a new kind of failure is a warning, the
        # same one again (every couple of seconds while a server is down) is not.
        failures: dict[str, str] = {}
        # A refused token (or unusable connection settings) per server, and when
        # it was last logged at ERROR: an ERROR at first, then every
        # AUTH_ERROR_REPEAT seconds while it lasts.
        refusals: dict[str, tuple[str, float]] = {}
        while True:
            target = servers[self._next_server % len(servers)]
            self._next_server = (self._next_server + 1) % len(servers)
            synced = False
            code: grpc.StatusCode | None = None
            # Why the token was refused or the connection settings are unusable.
            refused: str | None = None
            try:
                synced = await self._session(target)
                detail = "the server ended the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                detail = f"{code.name}: {exc.details()}"
            except asyncio.InvalidStateError:
                detail = "the stream ended while acknowledging"
            except TimeoutError:
                detail = "timed out"
            except _SessionError as exc:
                synced, code = exc.synced, exc.code
                detail = str(exc)
            except TransportConfigError as exc:
                # The token file or a TLS file became unreadable since start-up.
                detail = exc.render(SECURITY_NAMES)
                refused = "the connection settings cannot be used"
            except Exception as exc:  # the stream must survive whatever a session hits
                log.exception(
                    "agent_session_error service=%s server=%s", self.config.service, target
                )
                detail = repr(exc)
            if code in _AUTH_CODES:
                refused = self._auth_advice(code)
                detail = self._redact(detail)
            lost = synced or self.state is AgentState.READY
            synced_at, self._synced_at = self._synced_at, None
            if synced_at is not None and time.monotonic() - synced_at >= STABLE_SESSION:
                backoff.reset()
            self._set_connected(False)
            delay = backoff.next()
            if lost:
                failures.clear()
            if synced:
                refused_backoff.reset()
            if refused is not None:
                delay = max(delay, refused_backoff.next())
                failures[target] = detail
                now = time.monotonic()
                seen = refusals.get(target)
                again = seen is not None and seen[0] == detail
                if again and seen is not None and now - seen[1] < AUTH_ERROR_REPEAT:
                    level = logging.DEBUG
                else:
                    level = logging.ERROR
                    refusals[target] = (detail, now)
                log.log(
                    level,
                    "agent_auth_failed service=%s server=%s: %s (%s) state=%s, serving the "
                    "last known state and retrying, retry_in=%.3f",
                    self.config.service,
                    target,
                    refused,
                    detail,
                    self.state.value,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            refusals.pop(target, None)
            if lost:
                log.warning(
                    "agent_disconnected service=%s server=%s reason=%s state=%s",
                    self.config.service,
                    target,
                    detail,
                    self.state.value,
                )
            else:
                level = logging.DEBUG if failures.get(target) == detail else logging.WARNING
                failures[target] = detail
                log.log(
                    level,
                    "agent_connect_failed service=%s server=%s reason=%s state=%s retry_in=%.3f",
                    self.config.service,
                    target,
                    detail,
                    self.state.value,
                    delay,
                )
            await self._rest(delay)

    async def _rest(self, delay: float) -> None:
        """The backoff: ``delay`` seconds, or until the next server's spare channel
        connects, if there is one (gRPC's retries found the server back)."""
        servers = self.config.servers
        spare = self._spares.get(servers[self._next_server % len(servers)])
        if spare is None:
            await asyncio.sleep(delay)
        else:
            await asyncio.wait((spare.ready,), timeout=delay)

    async def _drop_spares(self, *, release: bool = False) -> None:
        """Close the spare channels (``release``: leave them to release_channels)."""
        spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.ready.cancel()
            if release:
                self.closing_channels.append(getattr(spare.channel, "_channel", None))
            await spare.channel.close(grace=None)
        del spares

    def _auth_advice(self, code: grpc.StatusCode | None) -> str:
        """What an UNAUTHENTICATED or PERMISSION_DENIED means for this agent."""
        where = f"{SECURITY_NAMES['token']} or {SECURITY_NAMES['token_file']}"
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return (
                f"the token does not allow service {self.config.service} (agent tokens are "
                f"limited to their services): use one that does ({where})"
            )
        if self._sent_token:
            return f"the server refused the token (unknown, expired or revoked?): check {where}"
        return f"the server requires a token and none was sent: give {where}"

    def _redact(self, text: str) -> str:
        """``text`` without the token in it, should a server have echoed it."""
        token = self._sent_token
        return text.replace(token, "<token>") if token else text

    async def _session(self, target: str) -> bool:
        """One connection to ``target``; returns (or raises) when it ends.

        Returns whether the stream got as far as an applied first answer (a
        Snapshot applied or a Resume accepted); until then the agent stays
        ``CONNECTING`` (``STALE`` with a state).
        """
        security = self.config.security
        # Read for each connection: a rotated token file is used from the next one.
        metadata = security.metadata()
        self._sent_token = metadata[0][1].removeprefix("Bearer ") if metadata else None
        spare = self._spares.pop(target, None)
        if spare is not None and time.monotonic() - spare.since > SPARE_MAX_AGE:
            spare.ready.cancel()
            await spare.channel.close(grace=None)
            spare = None
        if spare is None:
            channel = security.aio_channel(target, CHANNEL_OPTIONS)
            since = time.monotonic()
        else:
            spare.ready.cancel()
            channel, since = spare.channel, spare.since
        stub: Any = None
        call: Any = None
        synced = False
        # Why the channel could not connect: it is then kept as the server's spare.
        unconnected: str | None = None
        self._synced_at = None
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await _connected(channel, spare.why if spare is not None else None)
            except _SessionError as exc:
                unconnected = str(exc)
                raise
            except TimeoutError:
                unconnected = "timed out"
                raise
            del spare
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Sync(metadata=metadata)
            hello = self._hello()
            self._hello_revision = hello.last_applied_revision
            # A Hello with the override says all the queue does (the override in
            # force); what the watcher queues meanwhile stays queued.
            covered = list(self._outbox) if hello.HasField("override") else []
            try:
                await call.write(agent_pb2.SyncRequest(hello=hello))
            except asyncio.InvalidStateError:
                # The server ended the call before the Hello (a refused token):
                # its status says why.
                code = await call.code()
                details = await call.details()
                raise _SessionError(f"{code.name}: {details}", False, code) from None
            if covered and self._outbox[: len(covered)] == covered:
                del self._outbox[: len(covered)]
            delta: StateChange | None = None
            async with asyncio.timeout(FIRST_RESPONSE_TIMEOUT):
                while not synced:
                    first = await call.read()
                    if first is _EOF:
                        code = await call.code()
                        raise _SessionError(
                            f"stream closed before a first answer ({code.name})", False, code
                        )
                    kind = first.WhichOneof("message")
                    if kind == "change":
                        self._resync = True
                        raise _Rejected("a change before the first snapshot or resume")
                    delta = await self._handle(call, first)
                    # Anything else (a kind from a newer server) is ignored.
                    synced = kind in ("snapshot", "resume")
            self._synced_at = time.monotonic()
            self.server = target
            self._set_connected(True)
            log.info(
                "agent_connected service=%s server=%s revision=%d",
                self.config.service,
                target,
                self.snapshot.revision,
            )
            self._report_call = call
            self._flush_reports()
            self._notify(delta)
            await self._drop_spares()  # other servers' spares: this one answers
            while True:
                response = await call.read()
                if response is _EOF:
                    return True
                self._notify(await self._handle(call, response))
        except _Rejected as exc:
            raise _SessionError(f"{exc}: asking for a snapshot", synced) from None
        except grpc.aio.AioRpcError as exc:
            if synced:
                code = exc.code()
                raise _SessionError(f"{code.name}: {exc.details()}", True, code) from None
            raise
        finally:
            self.server = None
            self._report_call = None
            if self._report_task is not None:
                self._report_task.cancel()
                self._report_task = None
            # Closing cancels the call. gRPC's asyncio machinery (a poller thread)
            # lives as long as some channel *object* does, and an exception's
            # traceback keeps this frame: drop every reference, so that no
            # channel survives its session (and none a fork); a spare is closed
            # by the next session or when run() ends.
            if unconnected is not None and not _stopping():
                self._spares[target] = _Spare(channel, since, unconnected)
            else:
                if _stopping():
                    self.closing_channels.append(getattr(channel, "_channel", None))
                await channel.close(grace=None)
            del channel, stub, call

    def _hello(self) -> agent_pb2.Hello:
        config = self.config
        hello = agent_pb2.Hello(
            service=config.service,
            instance_id=config.instance_id,
            running_version=config.version,
            last_applied_revision=(
                self.snapshot.revision if self._has_state and not self._resync else 0
            ),
            agent_version=AGENT_VERSION,
        )
        if self.override is not None:
            # Each stream is an instance anew on the server: the override in
            # force is reported in every Hello (audited once, by its digest),
            # unless the queue holds more than that (sent, in order, after the
            # first answer).
            current = override_to_proto(self.override)
            if not self._outbox or self._outbox == [current]:
                hello.override.CopyFrom(current)
        return hello

    async def _handle(self, call: Any, response: agent_pb2.SyncResponse) -> StateChange | None:
        """Apply one response and ack it; return what changed, for the callbacks.

        Raises:
            _Rejected: A Snapshot or Change was rejected (and nacked), or a
                Resume does not continue from the Hello's revision; the state is
                kept and the stream is to end.
        """
        self._last_contact = time.monotonic()
        kind = response.WhichOneof("message")
        service = self.config.service
        if kind == "snapshot":
            revision = response.snapshot.revision
            try:
                new = _codec.snapshot_from_proto(service, response.snapshot, _now())
            except InvalidChangeError as exc:
                await self._reject(call, "snapshot", revision, str(exc))
            older = self._has_state and revision < self.snapshot.revision
            if older:
                # The server sends one only when etcd itself went back (restored
                # from an older backup): its state is the truth, older or not.
                log.warning(
                    "agent_snapshot_older service=%s revision=%d applied=%d (applied: the "
                    "control plane's store went back)",
                    service,
                    revision,
                    self.snapshot.revision,
                )
            self._resync = False
            return await self._applied(call, new, replace_newer=older)
        if kind == "change":
            revision = response.change.revision
            try:
                new = _codec.apply_change(self.snapshot, response.change, _now())
            except StaleRevisionError:
                log.debug(
                    "agent_change_stale service=%s revision=%d applied=%d",
                    service,
                    revision,
                    self.snapshot.revision,
                )
                return None
            except InvalidChangeError as exc:
                await self._reject(call, "change", revision, str(exc))
            return await self._applied(call, new)
        if kind == "resume":
            sent = self._hello_revision
            if sent == 0 or response.resume.revision != sent:
                log.warning(
                    "agent_resume_mismatch service=%s resume=%d hello=%d applied=%d",
                    service,
                    response.resume.revision,
                    sent,
                    self.snapshot.revision,
                )
                self._resync = True
                raise _Rejected(
                    f"a resume from revision {response.resume.revision}, not from {sent}"
                )
        # An unknown kind is from a newer server: ignored, so that old agents keep working.
        return None

    async def _reject(self, call: Any, kind: str, revision: int, reason: str) -> NoReturn:
        """Nack ``revision``, keep the state, and end the stream (reconnecting with
        backoff, asking for a full snapshot): nothing later is applied on top of a
        state that lacks the rejected revision's valid parts."""
        self._resync = True
        log.warning(
            "agent_change_rejected service=%s kind=%s revision=%d reason=%s applied=%d "
            "(state kept; reconnecting for a snapshot)",
            self.config.service,
            kind,
            revision,
            reason,
            self.snapshot.revision,
        )
        ack = agent_pb2.Ack(revision=revision, rejected_reason=reason[:1000] or "rejected")
        await self._write(call, agent_pb2.SyncRequest(ack=ack))
        await _end_stream(call)
        raise _Rejected(f"rejected the {kind} at revision {revision}")

    async def _applied(
        self, call: Any, new: Snapshot, *, replace_newer: bool = False
    ) -> StateChange:
        delta = self._swap(new, persist=True, replace_newer=replace_newer)
        self._has_state = True
        try:
            await self._write(call, agent_pb2.SyncRequest(ack=agent_pb2.Ack(revision=new.revision)))
        except BaseException:
            # The state is served whether or not the ack got through (the stream may
            # have ended under it): its callbacks run all the same.
            self._notify(delta)
            raise
        return delta

    async def _write(self, call: Any, request: agent_pb2.SyncRequest) -> None:
        """One write to the stream; the session's acks and the override reports
        take turns (one write at a time per stream)."""
        if self._write_lock is None:
            await call.write(request)
            return
        async with self._write_lock:
            await call.write(request)

    # ------------------------------------------------------------ state

    def _update(
        self, base: Snapshot | None = None, *, override: Override | _Keep | None = _Keep.KEEP
    ) -> StateChange:
        """Swap in a new server state and/or override (``_Keep.KEEP``: unchanged)
        and publish the effective snapshot; return what the reads see change."""
        old = self.effective
        if base is not None:
            self.snapshot = base
        if not isinstance(override, _Keep):
            self.override = override
            if self._metrics is not None:
                self._metrics.override_active.set(0 if override is None else 1)
        self.effective = _state.apply_override(self.snapshot, self.override)
        self._publish(self.effective)
        if self._expiry_wakeup is not None:
            self._expiry_wakeup.set()
        if self._metrics is not None:
            self._metrics.revision.set(self.snapshot.revision)
        return _state.diff(old, self.effective)

    def _swap(self, new: Snapshot, *, persist: bool, replace_newer: bool = False) -> StateChange:
        delta = self._update(new)
        if persist and self._cache is not None and self._cache_wakeup is not None:
            self._cache_sequence += 1
            pending = self._cache_pending
            # A state newer than an older snapshot not yet written replaces the
            # pre-restore file all the same.
            replace_newer = replace_newer or (pending is not None and pending[2])
            self._cache_pending = (self._cache_sequence, new, replace_newer)
            self._cache_wakeup.set()
        return delta

    # ------------------------------------------------------------ override

    def check_override(self, now: datetime) -> StateChange | None:
        """Check the override file; apply, replace or drop the override as it says.

        Returns what the reads see change (None: nothing), for the callbacks.
        A malformed file is logged and changes nothing.
        """
        watcher = self._override_file
        if watcher is None:
            return None
        read = watcher.check(now)
        if read is None:
            return None
        service, path, old = self.config.service, watcher.path, self.override
        if read.error is not None:
            kept = "none" if old is None else f"the override of {old.actor or 'unknown'}"
            log.log(
                logging.WARNING if isinstance(read.error, OverrideExpiredError) else logging.ERROR,
                "agent_override_rejected service=%s path=%s error=%s (kept: %s)",
                service,
                path,
                read.error,
                kept,
            )
            return None
        new = read.override
        if new == old:
            return None
        if new is None:
            assert old is not None
            log.warning(
                "agent_override_removed service=%s path=%s actor=%s reason=%s",
                service,
                path,
                old.actor,
                old.reason,
            )
            self._report(cleared_to_proto(old, "the override file was removed"))
        else:
            log.warning(
                "agent_override_applied service=%s path=%s actor=%s reason=%s expires_at=%s "
                "content=%s replaced=%s",
                service,
                path,
                new.actor,
                new.reason,
                new.expires_at.isoformat(),
                new.content_json,
                old is not None,
            )
            self._report(override_to_proto(new))
        return self._update(override=new)

    def _expire_override(self, now: datetime) -> bool:
        """Drop the override if its time has come (a swap left to the caller)."""
        override = self.override
        if override is None or override.expires_at > now:
            return False
        log.warning(
            "agent_override_expired service=%s actor=%s reason=%s expires_at=%s",
            self.config.service,
            override.actor,
            override.reason,
            override.expires_at.isoformat(),
        )
        self._report(cleared_to_proto(override, "expired"))
        return True

    async def _override_loop(self) -> None:
        while True:
            try:
                self._notify(self.check_override(_now()))
            except Exception:  # the watcher must outlive whatever one check hits
                log.exception("agent_override_check_failed service=%s", self.config.service)
            await asyncio.sleep(POLL_INTERVAL)

    def _report(self, msg: agent_pb2.Override) -> None:
        """Queue a report of the override for the server; send it if connected."""
        self._outbox.append(msg)
        del self._outbox[:-OVERRIDE_OUTBOX]
        self._flush_reports()

    def _flush_reports(self) -> None:
        call = self._report_call
        if call is None or not self._outbox:
            return
        if self._report_task is None or self._report_task.done():
            self._report_task = asyncio.ensure_future(self._send_reports(call))

    async def _send_reports(self, call: Any) -> None:
        """Write the queued reports to ``call``, oldest first, while it is the
        session's; one that fails stays queued for the next session."""
        try:
            while self._outbox and self._report_call is call:
                msg = self._outbox[0]
                await self._write(call, agent_pb2.SyncRequest(override=msg))
                if self._outbox and self._outbox[0] is msg:
                    del self._outbox[0]
                log.info(
                    "agent_override_reported service=%s active=%s digest=%s",
                    self.config.service,
                    msg.active,
                    msg.digest[:12],
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream broke: the session reconnects
            log.debug("agent_override_report_failed service=%s error=%r", self.config.service, exc)

    def _notify(self, delta: StateChange | None) -> None:
        if delta is None or delta.empty:
            return
        for callback in self._callbacks:
            try:
                result = callback(delta)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._callback_done)
            except Exception:
                log.exception(
                    "agent_callback_failed service=%s callback=%r revision=%d",
                    self.config.service,
                    callback,
                    delta.revision,
                )

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "agent_callback_failed service=%s",
                self.config.service,
                exc_info=task.exception(),
            )

    def _set_connected(self, connected: bool) -> None:
        if self._connected and not connected:
            self._last_contact = time.monotonic()
        self._connected = connected
        if connected:
            self._set_state(AgentState.READY)
        else:
            self._set_state(AgentState.STALE if self._has_state else AgentState.CONNECTING)

    def _set_state(self, state: AgentState) -> None:
        if state is self.state:
            return
        self.state = state
        if self._metrics is not None:
            self._metrics.set_state(state)
        self._on_state(state)

    def _seconds_since_contact(self) -> float:
        if self._connected:
            return 0.0
        return max(time.monotonic() - self._last_contact, 0.0)

    # ------------------------------------------------------------ timers and cache

    async def _expiry_loop(self) -> None:
        wakeup = self._expiry_wakeup
        assert wakeup is not None
        while True:
            wakeup.clear()
            due = self.effective.next_expiry
            if due is None:
                await wakeup.wait()
                continue
            delay = (due - _now()).total_seconds()
            if delay > 0:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that
                # comes as the wakeup is set (a change at close), and the loop
                # would wait on for good, holding up the client's stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, EXPIRY_RECHECK)):
                        await wakeup.wait()
                continue
            now = _now()
            new = _state.at(self.snapshot, now)
            expired = self._expire_override(now)
            server_expired = new is not self.snapshot
            if not server_expired and not expired:
                continue
            delta = self._update(new, override=None) if expired else self._update(new)
            if server_expired:
                log.info(
                    "agent_expired service=%s at=%s flags=%s",
                    self.config.service,
                    now.isoformat(),
                    sorted(delta.flags),
                )
            self._notify(delta)

    async def _cache_loop(self) -> None:
        wakeup = self._cache_wakeup
        cache = self._cache
        assert wakeup is not None
        if cache is None:
            return
        try:
            while True:
                await wakeup.wait()
                wakeup.clear()
                pending, self._cache_pending = self._cache_pending, None
                if pending is None:
                    continue
                write = asyncio.ensure_future(
                    asyncio.to_thread(cache.write, pending[1], pending[0], replace_newer=pending[2])
                )
                try:
                    await asyncio.shield(write)
                except asyncio.CancelledError:
                    # Stopping: the write in flight may be the last state; it ends
                    # before the client returns (close() promises the cache).
                    await asyncio.wait([write])
                    raise
        finally:
            # Stopping (close, fork): the last applied state is written before the
            # client returns; the writer drops anything older.
            pending, self._cache_pending = self._cache_pending, None
            if pending is not None:
                cache.write(pending[1], pending[0], replace_newer=pending[2])


class _SessionError(Exception):
    def __init__(self, message: str, synced: bool, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.synced = synced
        self.code = code


class _Rejected(Exception):
    """What the server sent cannot be applied: end the stream, ask for a snapshot."""


async def _end_stream(call: Any) -> None:
    """Close the agent's side of ``call`` and wait, at most NACK_CLOSE_TIMEOUT, for
    the server to end it: the server reads what the agent wrote before the end
    (a cancel could drop it). Whatever comes meanwhile is not applied."""
    with contextlib.suppress(Exception):
        await call.done_writing()
        async with asyncio.timeout(NACK_CLOSE_TIMEOUT):
            while await call.read() is not _EOF:
                pass


def _stopping() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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


class _Spare:
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


async def _connected(channel: grpc.aio.Channel, known: str | None = None) -> None:
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
                raise _SessionError(known, False)
            why = await _connect_error(channel)
            raise _SessionError(f"could not connect: {why}" if why else "could not connect", False)
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
