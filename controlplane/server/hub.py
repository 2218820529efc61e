"""One etcd watch per server process, fanned out to the agents' streams.

The hub keeps a validated mirror of every flag, shedding level and pin (read
once, then kept current by one watch on the prefix) and, for each service with
agents, a :class:`Feed`: the recent changes that concern the service, one
``Change`` message per relevant revision, in revision order.

Fan-out costs no queue and no task per stream per change: a feed appends one
message and wakes the streams waiting on it; each stream then takes everything
it has not been sent yet, coalesced into one message (newest revision,
intermediate ones skipped, never reordered). A slow stream costs nothing while
it is behind: it holds only the revision it was last sent; if that fell out of
the feed's window it gets a snapshot.

Resilience: the watch resumes by itself from the last revision seen + 1 after a
stream error; after a compaction it re-reads everything and every feed
restarts from the new revision (streams behind it get a snapshot).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import CompactedError, ControlPlaneError
from controlplane.metrics import ServerMetrics
from controlplane.model import GLOBAL_SCOPE
from controlplane.store import Store

log = structlog.get_logger("controlplane.hub")

_KINDS = {"flags": "flag", "shedding": "shedding", "pins": "pin"}
"""The metric's ``kind`` of each record path's first part."""

DEFAULT_WINDOW = 1024  # relevant revisions kept per service for resuming agents
FEED_IDLE_SECONDS = 300.0  # a service with no agent stream that long loses its feed


@dataclass(slots=True)
class _Touch:
    """What one revision changed for one scope."""

    flags_set: list[pb.Flag] = field(default_factory=list)
    flags_removed: list[agent_pb2.FlagRef] = field(default_factory=list)
    shedding: pb.Shedding | None = None
    shedding_removed: bool = False
    pin: pb.Pin | None = None
    pin_removed: bool = False


class Feed:
    """The changes that concern one service, for its agents' streams.

    Lookups are binary searches on the revisions, so what a stream costs per change
    does not grow with the history kept.
    """

    def __init__(self, service: str, revision: int, window: int) -> None:
        self.service = service
        # Every relevant change after ``floor`` is in ``changes``.
        self.floor = revision
        self.latest = revision
        self._changes: list[agent_pb2.Change] = []
        self._revisions: list[int] = []
        self._start = 0  # entries before it were dropped (trimmed now and then)
        # revision -> time.monotonic() when it was appended (for latency metrics)
        self.appended_at: dict[int, float] = {}
        self._serialized: dict[int, bytes] = {}
        self.window = window
        self._wakeup = asyncio.Event()
        self.streams = 0
        self.idle_since = time.monotonic()

    @property
    def changes(self) -> list[agent_pb2.Change]:
        return self._changes[self._start :]

    def append(self, change: agent_pb2.Change) -> None:
        if len(self._changes) - self._start >= self.window:
            dropped = self._changes[self._start]
            self._start += 1
            self.floor = dropped.revision
            self.appended_at.pop(dropped.revision, None)
            self._serialized.pop(dropped.revision, None)
            if self._start >= self.window:
                del self._changes[: self._start]
                del self._revisions[: self._start]
                self._start = 0
        self._changes.append(change)
        self._revisions.append(change.revision)
        self.appended_at[change.revision] = time.monotonic()
        self.latest = change.revision
        self._wake()

    def reset(self, revision: int) -> None:
        """Forget the history: streams behind ``revision`` get a snapshot."""
        self._changes.clear()
        self._revisions.clear()
        self._start = 0
        self.appended_at.clear()
        self._serialized.clear()
        self.floor = revision
        self.latest = revision
        self._wake()

    def _index_after(self, revision: int) -> int:
        return max(bisect.bisect_right(self._revisions, revision), self._start)

    def serialized(self, revision: int) -> bytes:
        """The SyncResponse carrying the change of ``revision``, serialized once for all."""
        payload = self._serialized.get(revision)
        if payload is None:
            index = bisect.bisect_left(self._revisions, revision)
            change = self._changes[index]
            payload = agent_pb2.SyncResponse(change=change).SerializeToString()
            self._serialized[revision] = payload
        return payload

    def _wake(self) -> None:
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def wait_past(self, revision: int) -> None:
        """Return once something newer than ``revision`` is there (or a reset happened)."""
        while self.latest <= revision and self.floor <= revision:
            await self._wakeup.wait()

    def since(self, revision: int) -> list[agent_pb2.Change] | None:
        """The changes after ``revision``; None when they are no longer all here."""
        if revision < self.floor:
            return None
        return self._changes[self._index_after(revision) :]

    def count_since(self, revision: int) -> int | None:
        """How many changes came after ``revision`` (None: no longer known)."""
        if revision < self.floor:
            return None
        return len(self._revisions) - self._index_after(revision)


class AuditFeed:
    """The audit records of recent revisions, for ``WatchChanges`` streams."""

    def __init__(self, window: int) -> None:
        self.entries: deque[tuple[int, list[Any]]] = deque()
        self.window = window
        self.latest = 0
        self.floor = 0  # every audited revision after it is kept
        self._wakeup = asyncio.Event()

    def append(self, revision: int, entries: list[Any]) -> None:
        if len(self.entries) >= self.window:
            self.floor = self.entries.popleft()[0]
        self.entries.append((revision, entries))
        self.latest = revision
        wakeup, self._wakeup = self._wakeup, asyncio.Event()
        wakeup.set()

    async def wait_past(self, revision: int) -> None:
        while self.latest <= revision:
            await self._wakeup.wait()

    def since(self, revision: int) -> tuple[list[tuple[int, list[Any]]], bool]:
        """The revisions after ``revision`` still here, and whether some were dropped."""
        kept = [(r, e) for r, e in self.entries if r > revision]
        return kept, revision < self.floor


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def coalesce(changes: list[agent_pb2.Change]) -> agent_pb2.Change:
    """One Change with the newest revision and the net effect of ``changes``."""
    if len(changes) == 1:
        return changes[0]
    flags: dict[tuple[str, str], pb.Flag | None] = {}
    shedding: pb.Shedding | bool | None = False  # False: untouched
    pin: pb.Pin | bool | None = False
    for change in changes:
        for ref in change.flags_removed:
            flags[(ref.scope, ref.name)] = None
        for flag in change.flags_set:
            flags[(flag.scope, flag.name)] = flag
        if change.HasField("shedding"):
            shedding = change.shedding
        elif change.shedding_removed:
            shedding = None
        if change.HasField("pin"):
            pin = change.pin
        elif change.pin_removed:
            pin = None
    merged = agent_pb2.Change(revision=changes[-1].revision)
    for (scope, name), set_flag in flags.items():
        if set_flag is None:
            merged.flags_removed.append(agent_pb2.FlagRef(scope=scope, name=name))
        else:
            merged.flags_set.append(set_flag)
    if shedding is None:
        merged.shedding_removed = True
    elif shedding is not False:
        assert isinstance(shedding, pb.Shedding)
        merged.shedding.CopyFrom(shedding)
    if pin is None:
        merged.pin_removed = True
    elif pin is not False:
        assert isinstance(pin, pb.Pin)
        merged.pin.CopyFrom(pin)
    return merged


class Hub:
    """The mirror of the state and the feeds of the services with agents.

    Lifecycle: ``await start()`` (reads the state once, starts the watch; does not
    need etcd to be up), ``await stop()`` (idempotent; ``start`` again resumes from
    the last revision seen). ``ready`` is set once the state was read.
    """

    def __init__(
        self, store: Store, metrics: ServerMetrics, *, window: int = DEFAULT_WINDOW
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.window = window
        self.revision = 0
        self.ready = asyncio.Event()
        # path -> (protobuf record, mod revision); flags/<scope>/<name>, shedding/<s>, pins/<s>
        self._records: dict[str, tuple[Any, int]] = {}
        # scope -> path -> flag record: a snapshot reads two scopes, not every record
        self._flags_by_scope: dict[str, dict[str, Any]] = {}
        # path -> (kind, service, name, set_at in Unix seconds) of every record in force
        # without expiry: what the mitigation-age metric reads, from another thread.
        self._unexpiring: dict[str, tuple[str, str, str, float]] = {}
        # scope -> last revision that changed something of it
        self._touched_at: dict[str, int] = {}
        self._stamp_floor = 0  # after a resync: the revision read
        # service -> (relevant revision it was built at, the snapshot's bytes without
        # its revision field): reconnect storms cost a lookup, not a scan
        self._snapshots: dict[str, tuple[int, bytes]] = {}
        self._loaded = False
        self._feeds: dict[str, Feed] = {}
        # The audit records of recent revisions, for WatchChanges.
        self.history = AuditFeed(window)
        self._task: asyncio.Task[None] | None = None
        self._revision_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # Called with (service, revision) for every change appended to a feed.
        self.listeners: list[Callable[[str, int], None]] = []

    async def start(self) -> None:
        """Start following etcd (again, after ``stop``: from where it stopped)."""
        if self._task is not None:
            raise RuntimeError("Hub.start() called while running")
        self._task = asyncio.create_task(self._run(), name="hub-watch")

    async def stop(self) -> None:
        """Stop the watch; the mirror and feeds stay. Idempotent."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            _, stuck = await asyncio.wait({task}, timeout=5.0)
            if stuck:
                log.error("background_task_stuck", task=task.get_name())

    # -- following etcd ------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.05
        need_load = not self.ready.is_set()
        while True:
            try:
                if need_load:
                    await self._load()
                    need_load = False
                async for revision, events in self.store.watch(self.revision + 1):
                    backoff = 0.05
                    await self._apply(revision, events)
            except CompactedError as exc:
                log.warning("hub_resync", reason="compacted", compact_revision=exc.compact_revision)
                self.metrics.resyncs.labels("compacted").inc()
                need_load = True
            except ControlPlaneError as exc:
                log.warning("hub_watch_broken", error=exc.message, resume_from=self.revision + 1)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except asyncio.CancelledError:
                raise
            except Exception:
                # Never a silently frozen fan-out: start again from a fresh read.
                log.exception("hub_failed")
                self.metrics.resyncs.labels("error").inc()
                need_load = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _load(self) -> None:
        """Read the whole state; after the first time, every feed restarts from it."""
        with self.store.budget(max(self.store.etcd_timeout, 10.0)):
            rows, revision = await self.store.read_state()
        self._records = {}
        self._flags_by_scope = {}
        self._unexpiring = {}
        touched: dict[str, int] = {}
        for path, record, mod in rows:
            self._put(path, record.to_proto(mod), mod)
            scope = path.split("/")[1]
            touched[scope] = max(touched.get(scope, 0), mod)
        self._snapshots.clear()
        # What each scope's records were last written at: the same stamps in every
        # server process. After a resync what was deleted in the gap is unknown, so
        # every scope counts as changed at the revision read.
        self._touched_at = touched
        if self._loaded:
            self._stamp_floor = revision
        self.revision = revision
        if self._loaded:
            for feed in self._feeds.values():
                feed.reset(revision)
        self._loaded = True
        self.ready.set()
        self._release_waiters()
        log.info("hub_loaded", revision=revision, records=len(rows))

    def _put(self, path: str, record: Any, mod: int) -> None:
        self._records[path] = (record, mod)
        if path.startswith("flags/"):
            self._flags_by_scope.setdefault(path.split("/")[1], {})[path] = record
        meta = record.meta
        if meta.HasField("expires_at"):
            self._unexpiring.pop(path, None)
        else:
            kind, scope, *name = path.split("/")
            self._unexpiring[path] = (
                _KINDS.get(kind, kind),
                scope,
                name[0] if name else "",
                meta.set_at.seconds + meta.set_at.nanos / 1e9,
            )

    def _drop(self, path: str) -> None:
        self._records.pop(path, None)
        self._unexpiring.pop(path, None)
        if path.startswith("flags/"):
            scope = self._flags_by_scope.get(path.split("/")[1])
            if scope is not None:
                scope.pop(path, None)

    async def _apply(self, revision: int, events: list[Any]) -> None:
        start = time.perf_counter()
        # Decode everything first (that may wait on etcd), then change the mirror in
        # one go: a snapshot never shows half a revision.
        decoded_events: list[tuple[str, str, Any]] = []
        audits = []
        for event in events:
            if event.path.startswith("audit/") and event.value is not None:
                entry = self.store.decode_audit(event)
                if entry is not None:
                    audits.append(entry)
                continue
            decoded = await self.store.decode_event(event)
            if decoded is not None:
                kind, record = decoded
                proto = record.to_proto(event.mod_revision) if record is not None else None
                decoded_events.append((event.path, kind, proto))
        touched: dict[str, _Touch] = {}
        for path, kind, proto in decoded_events:
            parts = path.split("/")
            scope = parts[1]
            touch = touched.setdefault(scope, _Touch())
            self._touched_at[scope] = revision
            if proto is None:
                self._drop(path)
            else:
                self._put(path, proto, revision)
            if kind == "flag":
                if proto is None:
                    touch.flags_removed.append(agent_pb2.FlagRef(scope=scope, name=parts[2]))
                else:
                    touch.flags_set.append(proto)
            elif kind == "shedding":
                touch.shedding = proto
                touch.shedding_removed = proto is None
            elif kind == "pin":
                touch.pin = proto
                touch.pin_removed = proto is None
        self.revision = max(self.revision, revision)
        if audits:
            self.history.append(revision, audits)
        if touched:
            glob = touched.get(GLOBAL_SCOPE)
            for service, feed in self._feeds.items():
                own = touched.get(service)
                if own is None and glob is None:
                    continue
                feed.append(self._change(revision, own, glob))
                for listener in self.listeners:
                    listener(service, revision)
            self.metrics.fanout_seconds.observe(time.perf_counter() - start)
        self._release_waiters()

    @staticmethod
    def _change(revision: int, own: _Touch | None, glob: _Touch | None) -> agent_pb2.Change:
        change = agent_pb2.Change(revision=revision)
        for touch in (glob, own):
            if touch is None:
                continue
            change.flags_set.extend(touch.flags_set)
            change.flags_removed.extend(touch.flags_removed)
        if own is not None:
            if own.shedding is not None:
                change.shedding.CopyFrom(own.shedding)
            change.shedding_removed = own.shedding_removed
            if own.pin is not None:
                change.pin.CopyFrom(own.pin)
            change.pin_removed = own.pin_removed
        return change

    def unexpiring(self) -> list[tuple[str, str, str, float]]:
        """Every record in force without expiry: (kind, service or ``global``, flag name
        or "", set_at in Unix seconds). Safe to call from another thread (the metrics
        endpoint's): the copy is one C call, during which the GIL keeps the event loop's
        thread from changing the dict."""
        return list(self._unexpiring.values())

    # -- what streams use ----------------------------------------------------

    def feed(self, service: str) -> Feed:
        """The service's feed (created at the current revision when new; call once ready)."""
        if not self.ready.is_set():
            raise RuntimeError("Hub.feed() before the state was read")
        feed = self._feeds.get(service)
        if feed is None:
            feed = self._feeds[service] = Feed(service, self.revision, self.window)
        return feed

    def stamp(self, service: str) -> int:
        """The last revision that changed what concerns ``service`` (its own or global)."""
        return max(
            self._touched_at.get(service, 0),
            self._touched_at.get(GLOBAL_SCOPE, 0),
            self._stamp_floor,
        )

    def snapshot(self, service: str) -> agent_pb2.Snapshot:
        """Everything that concerns ``service`` now: its own entries and the global ones."""
        return agent_pb2.SyncResponse.FromString(self.snapshot_response(service)).snapshot

    def snapshot_response(self, service: str) -> bytes:
        """A serialized SyncResponse with the service's snapshot at the current revision.

        Built once per relevant change of the service, then only relabelled: the
        revision field is written in front of the cached body (protobuf reads fields
        in any order), so a reconnect storm costs no scan and no re-serialization.
        """
        stamp = self.stamp(service)
        cached = self._snapshots.get(service)
        if cached is None or cached[0] != stamp:
            body = agent_pb2.Snapshot()
            for scope in (GLOBAL_SCOPE, service):
                body.flags.extend(self._flags_by_scope.get(scope, {}).values())
            shedding = self._records.get(f"shedding/{service}")
            if shedding is not None:
                body.shedding.CopyFrom(shedding[0])
            pin = self._records.get(f"pins/{service}")
            if pin is not None:
                body.pin.CopyFrom(pin[0])
            cached = (stamp, body.SerializeToString())
            self._snapshots[service] = cached
        snapshot = _varint_field(1, self.revision) + cached[1]
        return b"\x0a" + _varint(len(snapshot)) + snapshot

    def release(self, feed: Feed) -> None:
        """A stream left. Feeds no stream used for ``FEED_IDLE_SECONDS`` are dropped (their
        agents get a snapshot if they return), so per-service state does not pile up."""
        now = time.monotonic()
        if feed.streams <= 0:
            feed.idle_since = now
        for service, idle in list(self._feeds.items()):
            if idle.streams <= 0 and now - idle.idle_since > FEED_IDLE_SECONDS:
                del self._feeds[service]
                self._snapshots.pop(service, None)

    def relevant_since(self, service: str, revision: int) -> int | None:
        """How many relevant changes for ``service`` came after ``revision`` (None: unknown)."""
        feed = self._feeds.get(service)
        if feed is None:
            return None
        return feed.count_since(revision)

    async def wait_for_revision(self, revision: int, within: float) -> bool:
        """Wait until the hub has seen ``revision``; False after ``within`` seconds."""
        if self.ready.is_set() and self.revision >= revision:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._revision_waiters.append((revision, future))
        try:
            async with asyncio.timeout(within):
                await asyncio.shield(future)
        except TimeoutError:
            return False
        finally:
            self._revision_waiters = [(r, f) for r, f in self._revision_waiters if f is not future]
        return True

    def _release_waiters(self) -> None:
        if not self._revision_waiters:
            return
        keep = []
        for revision, future in self._revision_waiters:
            if self.revision >= revision and self.ready.is_set():
                if not future.done():
                    future.set_result(None)
            else:
                keep.append((revision, future))
        self._revision_waiters = keep
