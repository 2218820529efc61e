"""The agent client's state side: swaps, callbacks, acks, override, expiry, cache.

:class:`ClientState` holds the server's snapshot, the break-glass override and
the effective snapshot the reads see, and does what follows each change: publish
the effective snapshot (one attribute assignment), ack it on the stream, run the
callbacks, queue the cache write. It runs in the client's loop, beside the
stream (:class:`agents._client.Client`, its subclass)::

    the expiry timer    swaps the snapshot to :func:`agents._state.at` at
                        ``next_expiry``, connected or not
    the cache writer    writes the newest applied state on a worker thread, once a
                        burst of changes went by (CACHE_WRITE_DELAY)
    the override watcher

Break-glass overrides (``agents._override``)::

    at start, then whenever the file may have changed (``agents._filewatch``:
      inotify on the directories its path goes through; once a second where
      they cannot be watched): stat the override file; read and parse it when
      its identity, size or modification time changed
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
import inspect
import logging
import random
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
import grpc.aio

from agents import _state
from agents._cache import CacheWriter, read_cache
from agents._config import AgentConfig
from agents._filewatch import FileWatch
from agents._override import (
    OverrideExpiredError,
    OverrideFile,
    cleared_to_proto,
    override_to_proto,
)
from agents._state import Snapshot, StateChange
from agents._types import Override
from controlplane.api.v1 import agent_pb2

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry


log = logging.getLogger("agents")

ChangeCallback = Callable[[StateChange], Any]
"""An ``on_change`` callback: called with what changed (a coroutine function is
awaited as a task of its own by :class:`agents.AsyncAgent`)."""

STREAM_EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs

EXPIRY_RECHECK = 30.0
"""The expiry timer sleeps at most this long before reading the clock again, so
that a wall clock set forward is followed within that time."""

NACK_CLOSE_TIMEOUT = 2.0
"""Seconds to wait, after a nack, for the server to end the stream the agent
closed its side of (so that the nack is read before the connection goes)."""

OVERRIDE_OUTBOX = 32
"""At most this many override reports wait for a server; older ones are dropped."""

OVERRIDE_RECHECK = 30.0
"""Seconds between looks at the override file while no change was heard of: what
inotify cannot see (a write from another NFS client, a single file bind-mounted)
is applied within this time; one stat, nothing read unless it changed."""

CACHE_WRITE_DELAY = 3.0
"""Seconds the cache writer lets a burst of changes go by before it writes the
newest state (a random half to all of it, so that the agents of one process do
not all write at once): about one write per this many seconds, whatever the
rate of changes. Measured with 1,000 agents on two cores (BENCHMARKS.md, agent
cost), a write a second took more CPU than the changes themselves; every three
seconds it takes a fraction.

The durability policy: the file is at most this far behind the state served; a
stop or a fork writes the last state at once and syncs it to disk.
Writes while running are atomic but not synced (a sync is ~120 us of CPU and a
disk flush per write): kill -9 leaves the last file written, whole; a power cut
leaves what the file system committed (ext4: every 5 s), and a file it left
damaged is read as corrupt and ignored, never half-applied."""


class AgentState(enum.StrEnum):
    """Where an agent's state comes from.

    Members compare equal to their names (``agent.state == "READY"``).
    """

    CONNECTING = "CONNECTING"
    """No state yet: reads give their defaults."""
    READY = "READY"
    """Connected: the state is the server's, kept current by the stream."""
    STALE = "STALE"
    """Not connected: serving the last known state (from memory or the cache
    file) until a server answers. Time-boxed changes still expire on time."""


class Keep(enum.Enum):
    """``ClientState._update``'s default: the override stays as it is."""

    KEEP = "keep"


class Metrics:
    """The agent's metrics in the registry it was given (never on the read path)."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        from prometheus_client import Counter, Gauge

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
        self.applied = Counter(
            "controlplane_agent_changes_applied_total",
            "Snapshots and changes from the server the agent applied (and acknowledged).",
            ["service"],
            registry=registry,
        ).labels(service)
        self.reconnects = Counter(
            "controlplane_agent_reconnects_total",
            "Streams to a server established again after the first one ended.",
            ["service"],
            registry=registry,
        ).labels(service)
        self.last_change = Gauge(
            "controlplane_agent_last_change_timestamp_seconds",
            "Unix time the agent last applied something from the server that changed what "
            "its reads see (0: never, since it started).",
            ["service"],
            registry=registry,
        ).labels(service)
        self._service = service

    def set_state(self, state: AgentState) -> None:
        for member in AgentState:
            self.state.labels(self._service, member.value).set(1 if member is state else 0)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Rejected(Exception):
    """What the server sent cannot be applied: end the stream, ask for a snapshot."""


async def end_stream(call: Any) -> None:
    """Close the agent's side of ``call`` and wait, at most NACK_CLOSE_TIMEOUT, for
    the server to end it: the server reads what the agent wrote before the end
    (a cancel could drop it). Whatever comes meanwhile is not applied."""
    with contextlib.suppress(Exception):
        await call.done_writing()
        async with asyncio.timeout(NACK_CLOSE_TIMEOUT):
            while await call.read() is not STREAM_EOF:
                pass


class ClientState:
    """The client's state and what follows each change of it: the swap, the
    callbacks, the acks, the override and its reports, the expiry timer and the
    cache writes. :class:`agents._client.Client` adds the stream.

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
            OverrideFile(
                config.override_path,
                insecure_permissions=config.override_insecure_permissions,
            )
            if config.override_path is not None
            else None
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
        self._connected = False
        self._sessions = 0
        """Streams that got as far as an applied first answer."""
        self._resync = False
        """Ask for a full snapshot (Hello revision 0): a Snapshot or Change was rejected."""
        self._last_contact = time.monotonic()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._metrics: Metrics | None = None
        if registry is not None:
            self._metrics = Metrics(registry, config.service)
            self._metrics.set_state(self.state)
            self._metrics.revision.set(0)
            self._metrics.since_contact.set_function(self._seconds_since_contact)
            self._metrics.override_active.set(0)
            self._metrics.last_change.set(0)

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
        cached = read_cache(self._cache.path, self.config.service, utcnow())
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
        self.check_override(utcnow())
        return self.override is not None

    # ------------------------------------------------------------ state

    def _update(
        self, base: Snapshot | None = None, *, override: Override | Keep | None = Keep.KEEP
    ) -> StateChange:
        """Swap in a new server state and/or override (``Keep.KEEP``: unchanged)
        and publish the effective snapshot; return what the reads see change."""
        old = self.effective
        if base is not None:
            self.snapshot = base
        if not isinstance(override, Keep):
            self.override = override
            if self._metrics is not None:
                self._metrics.override_active.set(0 if override is None else 1)
        self.effective = _state.apply_override(self.snapshot, self.override)
        self._publish(self.effective)
        if self._expiry_wakeup is not None and self.effective.next_expiry != old.next_expiry:
            # Only a new next expiry concerns the timer (a change without expiry,
            # the usual one, does not wake it).
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
        assert self._override_file is not None
        # Watching before the first check: a change made during it wakes the next.
        # Made in this loop, closed when cancelled (close, fork): one per run.
        with FileWatch(self._override_file.path) as watch:
            while True:
                try:
                    self._notify(self.check_override(utcnow()))
                except Exception:  # the watcher must outlive whatever one check hits
                    log.exception("agent_override_check_failed service=%s", self.config.service)
                # A change inotify cannot see (a write on another NFS client, a
                # file bind-mounted alone) is seen at the next look all the same.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(OVERRIDE_RECHECK):
                        await watch.wait()

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

    # ------------------------------------------------------------ acks

    async def _applied(
        self, call: Any, new: Snapshot, *, replace_newer: bool = False
    ) -> StateChange:
        delta = self._swap(new, persist=True, replace_newer=replace_newer)
        self._has_state = True
        if self._metrics is not None:
            self._metrics.applied.inc()
            if not delta.empty:
                self._metrics.last_change.set_to_current_time()
        try:
            await self._write(call, agent_pb2.SyncRequest(ack=agent_pb2.Ack(revision=new.revision)))
        except BaseException:
            # The state is served whether or not the ack got through (the stream may
            # have ended under it): its callbacks run all the same.
            self._notify(delta)
            raise
        return delta

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
        await end_stream(call)
        raise Rejected(f"rejected the {kind} at revision {revision}")

    async def _write(self, call: Any, request: agent_pb2.SyncRequest) -> None:
        """One write to the stream; the session's acks and the override reports
        take turns (one write at a time per stream)."""
        if self._write_lock is None:
            await call.write(request)
            return
        async with self._write_lock:
            await call.write(request)

    # ------------------------------------------------------------ notifications and state

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
            if self._metrics is not None and self._sessions:
                self._metrics.reconnects.inc()
            self._sessions += 1
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
            delay = (due - utcnow()).total_seconds()
            if delay > 0:
                # Not asyncio.wait_for: on Python 3.11 it swallows a cancel that
                # comes as the wakeup is set (a change at close), and the loop
                # would wait on for good, holding up the client's stop.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(delay, EXPIRY_RECHECK)):
                        await wakeup.wait()
                continue
            now = utcnow()
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
                # The burst goes by first: one write of its newest state (the
                # stop below writes whatever is pending, at once).
                await asyncio.sleep(CACHE_WRITE_DELAY * (0.5 + random.random() / 2))  # noqa: S311
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
                cache.write(pending[1], pending[0], replace_newer=pending[2], durable=True)
            cache.sync()
            cache.release()
