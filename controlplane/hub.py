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
import time
from collections import deque
from collections.abc import Callable, Iterable
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

DEFAULT_WINDOW = 1024  # relevant revisions kept per service for resuming agents


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
    """The changes that concern one service, for its agents' streams."""

    def __init__(self, service: str, revision: int, window: int) -> None:
        self.service = service
        # Every relevant change after ``floor`` is in ``changes``.
        self.floor = revision
        self.latest = revision
        self.changes: deque[agent_pb2.Change] = deque()
        # revision -> time.monotonic() when it was appended (for latency metrics)
        self.appended_at: dict[int, float] = {}
        self._serialized: dict[int, bytes] = {}
        self.window = window
        self._wakeup = asyncio.Event()
        self.streams = 0

    def append(self, change: agent_pb2.Change) -> None:
        if len(self.changes) >= self.window:
            dropped = self.changes.popleft()
            self.floor = dropped.revision
            self.appended_at.pop(dropped.revision, None)
            self._serialized.pop(dropped.revision, None)
        self.changes.append(change)
        self.appended_at[change.revision] = time.monotonic()
        self.latest = change.revision
        self._wake()

    def reset(self, revision: int) -> None:
        """Forget the history: streams behind ``revision`` get a snapshot."""
        self.changes.clear()
        self.appended_at.clear()
        self._serialized.clear()
        self.floor = revision
        self.latest = revision
        self._wake()

    def serialized(self, revision: int) -> bytes:
        """The SyncResponse carrying the change of ``revision``, serialized once for all."""
        payload = self._serialized.get(revision)
        if payload is None:
            change = next(c for c in self.changes if c.revision == revision)
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
        return [c for c in self.changes if c.revision > revision]


class AuditFeed:
    """The audit records of recent revisions, for ``WatchChanges`` streams."""

    def __init__(self, window: int) -> None:
        self.entries: deque[tuple[int, list[Any]]] = deque(maxlen=window)
        self.latest = 0
        self._wakeup = asyncio.Event()

    def append(self, revision: int, entries: list[Any]) -> None:
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
        dropped = bool(self.entries) and self.entries[0][0] > revision + 1 and revision > 0
        return kept, dropped


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
        while True:
            try:
                if not self.ready.is_set():
                    await self._load()
                async for revision, events in self.store.watch(self.revision + 1):
                    backoff = 0.05
                    await self._apply(revision, events)
            except CompactedError as exc:
                log.warning("hub_resync", reason="compacted", compact_revision=exc.compact_revision)
                self.metrics.resyncs.labels("compacted").inc()
                await self._reload()
            except ControlPlaneError as exc:
                log.warning("hub_watch_broken", error=exc.message, resume_from=self.revision + 1)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    async def _load(self) -> None:
        with self.store.budget(max(self.store.etcd_timeout, 10.0)):
            rows, revision = await self.store.read_state()
        self._records = {path: (record.to_proto(mod), mod) for path, record, mod in rows}
        self.revision = revision
        self.ready.set()
        self._release_waiters()
        log.info("hub_loaded", revision=revision, records=len(rows))

    async def _reload(self) -> None:
        """After a compaction: read everything again and restart every feed from there."""
        try:
            await self._load()
        except ControlPlaneError as exc:
            log.warning("hub_reload_failed", error=exc.message)
            self.ready.clear()
            return
        for feed in self._feeds.values():
            feed.reset(self.revision)

    async def _apply(self, revision: int, events: list[Any]) -> None:
        start = time.perf_counter()
        touched: dict[str, _Touch] = {}
        audits = []
        for event in events:
            if event.path.startswith("audit/") and event.value is not None:
                entry = self.store.decode_audit(event)
                if entry is not None:
                    audits.append(entry)
                continue
            decoded = await self.store.decode_event(event)
            if decoded is None:
                continue
            kind, record = decoded
            parts = event.path.split("/")
            scope = parts[1]
            touch = touched.setdefault(scope, _Touch())
            if record is None:
                self._records.pop(event.path, None)
            else:
                self._records[event.path] = (
                    record.to_proto(event.mod_revision),
                    event.mod_revision,
                )
            if kind == "flag":
                if record is None:
                    touch.flags_removed.append(agent_pb2.FlagRef(scope=scope, name=parts[2]))
                else:
                    touch.flags_set.append(self._records[event.path][0])
            elif kind == "shedding":
                touch.shedding = self._records[event.path][0] if record is not None else None
                touch.shedding_removed = record is None
            elif kind == "pin":
                touch.pin = self._records[event.path][0] if record is not None else None
                touch.pin_removed = record is None
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

    # -- what streams use ----------------------------------------------------

    def feed(self, service: str) -> Feed:
        """The service's feed (created at the current revision when new; call once ready)."""
        if not self.ready.is_set():
            raise RuntimeError("Hub.feed() before the state was read")
        feed = self._feeds.get(service)
        if feed is None:
            feed = self._feeds[service] = Feed(service, self.revision, self.window)
        return feed

    def snapshot(self, service: str) -> agent_pb2.Snapshot:
        """Everything that concerns ``service`` now: its own entries and the global ones."""
        snap = agent_pb2.Snapshot(revision=self.revision)
        for scope in (GLOBAL_SCOPE, service):
            prefix = f"flags/{scope}/"
            snap.flags.extend(
                record for path, (record, _) in self._records.items() if path.startswith(prefix)
            )
        shedding = self._records.get(f"shedding/{service}")
        if shedding is not None:
            snap.shedding.CopyFrom(shedding[0])
        pin = self._records.get(f"pins/{service}")
        if pin is not None:
            snap.pin.CopyFrom(pin[0])
        return snap

    def records(self, service: str) -> Iterable[tuple[str, Any, int]]:
        """(path, protobuf record, mod revision) of what concerns ``service``."""
        for path, (record, mod) in self._records.items():
            parts = path.split("/")
            if parts[1] in (GLOBAL_SCOPE, service):
                yield path, record, mod

    def relevant_since(self, service: str, revision: int) -> int | None:
        """How many relevant changes for ``service`` came after ``revision`` (None: unknown)."""
        feed = self._feeds.get(service)
        if feed is None or revision < feed.floor:
            return None
        return sum(1 for c in feed.changes if c.revision > revision)

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
