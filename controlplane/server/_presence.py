"""Which agents are connected to this server process, and what each applied.

Acks are kept in this process's memory and flushed to etcd in batches (never one
write per ack), under a presence prefix agents do not watch, attached to this
process's lease so a dead process's agents disappear with it::

    <presence prefix>servers/<server id>/<chunk>     this process's instances (leased)
    <presence prefix>applied/<revision>/<service>/<server id>
                                                     when all of this process's
                                                     instances of a service had
                                                     acked a change, and how many
    <presence prefix>seen/<service>                  when an agent of the service
                                                     was last connected (kept as
                                                     long as the audit trail)

(the layout is in :mod:`controlplane.store.keys`).

Status and waits read every process's records; this process's own come from
memory, so they are exact and immediate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import structlog

from controlplane import model
from controlplane.errors import ControlPlaneError
from controlplane.metrics import ServerMetrics
from controlplane.store import Store, keys

log = structlog.get_logger("controlplane.presence")

MAX_NACK_AUDITS = 20
"""Rejections of one change audited (so told), per service: the first ones say it."""
MAX_NACK_AUDITS_IN_FLIGHT = 100

_CHUNK = 500  # instances per presence key: keeps each value well under etcd's limits
FLUSH_GAP_PER_INSTANCE = 100e-6
"""Seconds between two flushes at the least, per instance (each encodes every instance)."""
FLUSH_GAP_MAX = 0.25
LEASE_TTL = 10
LEASE_REFRESH = LEASE_TTL / 3
"""Seconds between two keep-alives of the records' lease (not at every flush: at rest a
flush writes nothing, and a keep-alive twice a second would be etcd's only load)."""
SEEN_REFRESH = 600.0
"""Seconds between two writes of a service's last contact while its agents stay connected
(a connected service's last contact is "now" anyway: this bounds what a crash loses)."""


@dataclass(eq=False, slots=True)
class Instance:
    """One agent stream: who it is and what it applied."""

    service: str
    instance_id: str
    running_version: str
    agent_version: str
    connected_at: datetime
    server_id: str
    applied: int = 0
    sent: int = 0  # the newest revision sent on this stream (acks are capped by it)
    last_seen: datetime | None = None
    nacks: dict[int, str] = field(default_factory=dict)
    connected: bool = True
    override_active: bool = False
    # Times as written, kept: every flush writes every instance again.
    _times: tuple[datetime, datetime, str, str] | None = field(default=None, repr=False)

    def to_record(self) -> dict[str, Any]:
        seen = self.last_seen or self.connected_at
        times = self._times
        if times is None or times[0] is not self.connected_at or times[1] is not seen:
            times = self._times = (
                self.connected_at,
                seen,
                model.format_time(self.connected_at),
                model.format_time(seen),
            )
        return {
            "service": self.service,
            "instance_id": self.instance_id,
            "running_version": self.running_version,
            "agent_version": self.agent_version,
            "connected_at": times[2],
            "last_seen": times[3],
            "server_id": self.server_id,
            "applied": self.applied,
            "nacks": {str(k): v for k, v in self.nacks.items()},
            "override_active": self.override_active,
        }

    @classmethod
    def from_record(cls, data: dict[str, Any]) -> Instance:
        return cls(
            service=str(data["service"]),
            instance_id=str(data["instance_id"]),
            running_version=str(data.get("running_version", "")),
            agent_version=str(data.get("agent_version", "")),
            connected_at=model.parse_time(str(data["connected_at"])),
            last_seen=model.parse_time(str(data["last_seen"])),
            server_id=str(data["server_id"]),
            applied=int(data.get("applied", 0)),
            nacks={int(k): str(v) for k, v in dict(data.get("nacks", {})).items()},
            override_active=bool(data.get("override_active", False)),
        )


@dataclass(slots=True)
class _ServiceAcks:
    """The local instances of a service and how many applied its latest change."""

    instances: set[Instance] = field(default_factory=set)
    target: int = 0
    acked: int = 0
    recorded: int = 0
    behind_since: float | None = None
    """time.monotonic() since when some local instance has not applied ``target``."""
    reported: bool = False
    """The unapplied-change gauge of the service was last set above 0."""

    def note_behind(self) -> None:
        """Start or stop the clock of the service's unapplied change. O(1)."""
        if self.acked >= len(self.instances):
            self.behind_since = None
        elif self.behind_since is None:
            self.behind_since = time.monotonic()


class Presence:
    """This process's connected agents, flushed to etcd in batches under a lease.

    Lifecycle: ``await start()`` once, ``await stop()`` (idempotent; deletes this
    process's presence so its agents disappear at once rather than at lease expiry).
    """

    def __init__(
        self,
        store: Store,
        server_id: str,
        metrics: ServerMetrics,
        *,
        revision: Callable[[], int] = lambda: 0,
        flush_interval: float = 0.5,
    ) -> None:
        self.store = store
        # The revision this process's hub has seen: flushed with the instances, so a
        # wait elsewhere knows whether this process's acks can be complete yet.
        self._revision = revision
        self._flushed_revision = -1
        self.server_id = server_id
        self.metrics = metrics
        self.flush_interval = flush_interval
        self.prefix = keys.presence_prefix(store.prefix)
        self._applied_end = keys.range_end(keys.applied_prefix(self.prefix).encode()).decode()
        self._instances: dict[tuple[str, str], Instance] = {}
        self._changed: dict[str, asyncio.Event] = {}
        self._dirty = True
        self._lease = 0
        self._lease_kept = 0.0  # monotonic time of its last grant or keep-alive
        self._written_chunks = 0
        self._task: asyncio.Task[None] | None = None
        self._flush_now = asyncio.Event()
        self._audits: set[asyncio.Task[None]] = set()  # nacks being audited
        self._nacks_audited: dict[tuple[str, int], int] = {}
        # revision -> service -> (time all acked, instance count), waiting to be flushed
        self._applied: dict[tuple[int, str], tuple[datetime, int]] = {}
        self._services: dict[str, _ServiceAcks] = {}
        # Other processes' presence records as last read, decoded: key -> (raw bytes,
        # server id, its revision, its instances by service). A wait reads them every
        # 100 ms; only a record that changed is decoded again.
        self._remote: dict[str, tuple[bytes, str, int, dict[str, list[Instance]]]] = {}
        self._peers = False
        """Other processes report under the same prefix (read at each flush)."""
        # Last contact: when it was last written per service (monotonic), and the
        # services whose last instance here left since the last flush.
        self._seen_written: dict[str, float] = {}
        # OpenFeature sync clients (flagd providers) here, by service: listed apart from
        # agents, since they confirm nothing (a wait cannot count them).
        self._sync_clients: dict[str, int] = {}
        self._flush_lock = asyncio.Lock()
        self._departed: set[str] = set()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("Presence.start() called twice")
        self._task = asyncio.create_task(self._flush_loop(), name="presence-flush")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        _, stuck = await asyncio.wait({task}, timeout=5.0)
        if stuck:
            log.error("background_task_stuck", task=task.get_name())
        # Each step on its own: one failing must not keep this process's instances listed
        # (waits elsewhere would count them until the lease expires).
        lock: contextlib.AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext() if stuck else self._flush_lock
        )
        async with lock:
            with contextlib.suppress(ControlPlaneError), self.store.budget(self.store.etcd_timeout):
                await self.store.delete_prefix_raw(keys.servers_prefix(self.prefix, self.server_id))
            with contextlib.suppress(ControlPlaneError), self.store.budget(self.store.etcd_timeout):
                await self._flush_applied()
            # The agents here were in contact until now.
            self._departed |= {s for s, acks in self._services.items() if acks.instances}
            with contextlib.suppress(ControlPlaneError), self.store.budget(self.store.etcd_timeout):
                await self._flush_seen()

    # -- streams report here -----------------------------------------------------

    def _acks(self, service: str) -> _ServiceAcks:
        acks = self._services.get(service)
        if acks is None:
            acks = self._services[service] = _ServiceAcks()
        return acks

    def connect(self, instance: Instance) -> None:
        self._instances[(instance.service, instance.instance_id)] = instance
        acks = self._acks(instance.service)
        acks.instances.add(instance)
        if instance.applied >= acks.target:
            acks.acked += 1
        acks.note_behind()
        self.metrics.agents_connected.labels(instance.service).inc()
        self._touch(instance.service)
        # Arrivals and departures are reported at once (acks wait for the next batch),
        # so that a wait on another replica soon knows this process has agents.
        self._flush_now.set()

    def disconnect(self, instance: Instance) -> None:
        key = (instance.service, instance.instance_id)
        if self._instances.get(key) is instance:
            del self._instances[key]
        acks = self._acks(instance.service)
        if instance in acks.instances:
            acks.instances.discard(instance)
            if instance.applied >= acks.target:
                acks.acked -= 1
            acks.note_behind()
            self._maybe_complete(instance.service, acks)
        instance.connected = False
        if not acks.instances:
            self._departed.add(instance.service)
        self.metrics.agents_connected.labels(instance.service).dec()
        self._touch(instance.service)
        self._flush_now.set()

    def sync_connect(self, service: str) -> None:
        """An OpenFeature sync client of ``service`` connected here."""
        self._sync_clients[service] = self._sync_clients.get(service, 0) + 1
        self._dirty = True
        self._flush_now.set()

    def sync_disconnect(self, service: str) -> None:
        count = self._sync_clients.get(service, 0) - 1
        if count > 0:
            self._sync_clients[service] = count
        else:
            self._sync_clients.pop(service, None)
        self._dirty = True
        self._flush_now.set()

    async def sync_clients(self, service: str) -> int:
        """How many OpenFeature sync clients of ``service`` are connected, everywhere."""
        count = self._sync_clients.get(service, 0)
        own = keys.servers_prefix(self.prefix, self.server_id)
        for key, raw in await self.store.get_prefix_raw(keys.servers_prefix(self.prefix)):
            if key.startswith(own):
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                count += int(json.loads(raw).get("sync_clients", {}).get(service, 0))
        return count

    def new_change(self, service: str, revision: int) -> None:
        """A change for ``service`` went out: count its acks from here (O(instances))."""
        acks = self._services.get(service)
        if acks is None or revision <= acks.target:
            return
        acks.target = revision
        acks.acked = sum(1 for i in acks.instances if i.applied >= revision)
        acks.note_behind()
        self._maybe_complete(service, acks)

    def ack(self, instance: Instance, revision: int) -> None:
        """An instance applied ``revision`` (and so everything before it). O(1)."""
        instance.last_seen = model.utcnow()
        previous = instance.applied
        if revision <= previous:
            return
        instance.applied = revision
        self._dirty = True
        acks = self._services.get(instance.service)
        if acks is not None and instance in acks.instances and previous < acks.target <= revision:
            acks.acked += 1
            acks.note_behind()
            self._maybe_complete(instance.service, acks)

    def _maybe_complete(self, service: str, acks: _ServiceAcks) -> None:
        if acks.instances and acks.acked >= len(acks.instances) and acks.target > acks.recorded:
            # Every local instance applied the latest change (and so every one before it).
            self._applied[(acks.target, service)] = (model.utcnow(), len(acks.instances))
            acks.recorded = acks.target
            self._touch(service)
            if self._peers:
                # Other processes (replicas, workers) wait for it through this process's
                # records: flush now rather than within flush_interval. Alone, the
                # periodic flush is enough (a flush writes every instance's record).
                self._flush_now.set()

    def refresh_metrics(self) -> None:
        """Set ``controlplane_change_unapplied_seconds`` of every service whose instances
        here are behind, or just caught up (O(services); called every second)."""
        now = time.monotonic()
        gauge = self.metrics.change_unapplied
        for service, acks in self._services.items():
            since = acks.behind_since
            if since is not None:
                gauge.labels(service).set(now - since)
                acks.reported = True
            elif acks.reported:
                # Set to 0 rather than removed: with --workers, a gauge's series cannot be.
                gauge.labels(service).set(0)
                acks.reported = False

    def nack(self, instance: Instance, revision: int, reason: str) -> None:
        instance.last_seen = model.utcnow()
        # Only the newest rejection matters (and only while nothing later was applied).
        first = revision not in instance.nacks
        instance.nacks = {revision: reason[:500]}
        self.metrics.nacks.labels(instance.service).inc()
        self._touch(instance.service)
        key = (instance.service, revision)
        audited = self._nacks_audited.get(key, 0)
        # A fleet rejecting one change (or a hostile agent rejecting every revision) is
        # audited for its first MAX_NACK_AUDITS instances per change, and never with more
        # than MAX_NACK_AUDITS_IN_FLIGHT writes at once; the rest are counted (metric).
        if first and audited < MAX_NACK_AUDITS and len(self._audits) < MAX_NACK_AUDITS_IN_FLIGHT:
            if len(self._nacks_audited) > 1000:
                self._nacks_audited.clear()
            self._nacks_audited[key] = audited + 1
            task = asyncio.create_task(self._audit_nack(instance, revision, reason[:500]))
            self._audits.add(task)
            task.add_done_callback(self._audits.discard)

    async def _audit_nack(self, instance: Instance, revision: int, reason: str) -> None:
        """The rejection in the audit trail, once per instance and revision: the timeline
        and the notifications tell it."""
        try:
            await self.store.record_event(
                action="agent.nack",
                kind="nack",
                scope=instance.service,
                name=instance.instance_id,
                actor=f"agent:{instance.service}",
                reason=reason or "rejected without a reason",
                mark=f"nack/{instance.service}/{instance.instance_id}/{revision}",
                after={"revision": revision, "instance": instance.instance_id},
            )
        except ControlPlaneError as exc:
            log.warning(
                "nack_not_audited",
                service=instance.service,
                instance_id=instance.instance_id,
                revision=revision,
                error=exc.message,
            )

    def touch(self, service: str) -> None:
        """Something about an instance of ``service`` changed (flushed with the next batch)."""
        self._touch(service)

    def _touch(self, service: str) -> None:
        self._dirty = True
        event = self._changed.pop(service, None)
        if event is not None:
            event.set()

    def local(self, service: str) -> list[Instance]:
        acks = self._services.get(service)
        return list(acks.instances) if acks is not None else []

    async def changed(self, service: str) -> None:
        """Wait until an instance of ``service`` here connects, leaves or nacks, or all of
        them applied the latest change (not on every ack: that would be a wake-up per ack)."""
        event = self._changed.setdefault(service, asyncio.Event())
        await event.wait()

    async def instances(self, service: str) -> list[Instance]:
        """Every connected instance of ``service``, on this process and the others."""
        instances, _ = await self.view(service)
        return instances

    async def view(self, service: str) -> tuple[list[Instance], dict[str, int]]:
        """The instances of ``service`` everywhere, and the revision each other process
        had seen when it last reported (its acks for later revisions are not in yet)."""
        found = {(i.server_id, i.instance_id): i for i in self.local(service)}
        reported: dict[str, int] = {}
        remote: dict[str, tuple[bytes, str, int, dict[str, list[Instance]]]] = {}
        for key, raw in await self.store.get_prefix_raw(keys.servers_prefix(self.prefix)):
            if key.startswith(keys.servers_prefix(self.prefix, self.server_id)):
                continue
            decoded = self._remote.get(key)
            if decoded is None or decoded[0] != raw:
                decoded = _decode_presence(key, raw)
                if decoded is None:
                    continue
            remote[key] = decoded
            _raw, server, revision, by_service = decoded
            reported[server] = max(reported.get(server, 0), revision)
            for instance in by_service.get(service, ()):
                found.setdefault((instance.server_id, instance.instance_id), instance)
        self._remote = remote
        # An agent that moved (its server died, its lease has not expired yet) is listed
        # once: the newest connection wins.
        newest: dict[str, Instance] = {}
        for instance in found.values():
            known = newest.get(instance.instance_id)
            if known is None or instance.connected_at > known.connected_at:
                newest[instance.instance_id] = instance
        ordered = sorted(newest.values(), key=lambda i: i.instance_id)
        return ordered, reported

    async def connected_counts(self) -> dict[str, int]:
        """How many instances of each service are connected, here and elsewhere."""
        found = {(i.service, i.instance_id) for i in self._instances.values()}
        own = keys.servers_prefix(self.prefix, self.server_id)
        for key, raw in await self.store.get_prefix_raw(keys.servers_prefix(self.prefix)):
            decoded = None if key.startswith(own) else _decode_presence(key, raw)
            if decoded is not None:
                for service, instances in decoded[3].items():
                    found.update((service, i.instance_id) for i in instances)
        counts: dict[str, int] = {}
        for service, _instance in found:
            counts[service] = counts.get(service, 0) + 1
        return counts

    async def applied_at(self, service: str, revision: int, servers: set[str]) -> datetime | None:
        """When every instance of ``service`` on each of ``servers`` had applied ``revision``
        (or a later change), from the processes' records; None if one has no record yet."""
        done: dict[str, datetime] = {}
        for (rev, svc), (when, _count) in self._applied.items():  # not flushed yet
            if svc == service and rev >= revision:
                done[self.server_id] = min(when, done.get(self.server_id, when))
        start = keys.applied_prefix(self.prefix, revision)
        for key, raw in await self.store.get_range_raw(start, self._applied_end):
            parts = key[len(self.prefix) :].split("/")
            if len(parts) != 4 or parts[2] != service:
                continue
            try:
                when = model.parse_time(str(json.loads(raw)["all_acked_at"]))
            except (ValueError, KeyError, TypeError):
                continue
            server = parts[3]
            done[server] = min(when, done.get(server, when))
        if not servers or any(server not in done for server in servers):
            return None
        return max(done[server] for server in servers)

    async def applied_records(
        self, from_revision: int
    ) -> dict[str, list[tuple[int, str, datetime, int]]]:
        """Every process's "all applied" records from ``from_revision`` on, by service:
        (revision, server id, when, instances), in revision order."""
        found: dict[str, list[tuple[int, str, datetime, int]]] = {}
        for (rev, svc), (when, count) in self._applied.items():  # not flushed yet
            if rev >= from_revision:
                found.setdefault(svc, []).append((rev, self.server_id, when, count))
        start = keys.applied_prefix(self.prefix, from_revision)
        for key, raw in await self.store.get_range_raw(start, self._applied_end):
            parts = key[len(self.prefix) :].split("/")
            if len(parts) != 4 or not parts[1].isdigit():
                continue
            try:
                data = json.loads(raw)
                when = model.parse_time(str(data["all_acked_at"]))
                count = int(data["instances"])
            except (ValueError, KeyError, TypeError):
                continue
            found.setdefault(parts[2], []).append((int(parts[1]), parts[3], when, count))
        for rows in found.values():
            rows.sort()
        return found

    async def prune_applied(self, below_revision: int) -> int:
        """Forget when changes older than ``below_revision`` were applied (retention)."""
        return await self.store.delete_range_raw(
            keys.applied_prefix(self.prefix), keys.applied_prefix(self.prefix, below_revision)
        )

    # -- flushing ------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            # Cleared before the flush: an arrival while it is written flushes again.
            self._flush_now.clear()
            try:
                async with self._flush_lock:
                    with self.store.budget(self.store.etcd_timeout):
                        await self._flush()
            except ControlPlaneError as exc:
                log.warning("presence_flush_failed", error=exc.message)
                self._lease = 0 if "lease" in exc.message else self._lease
            # Arrivals and departures flush at once, but a flush encodes every instance:
            # the gap after one grows with their number (100 µs each), so that in a
            # reconnect storm one flush covers many arrivals, and a few instances are
            # still reported within a millisecond or so.
            await asyncio.sleep(min(FLUSH_GAP_MAX, len(self._instances) * FLUSH_GAP_PER_INSTANCE))
            with contextlib.suppress(TimeoutError):
                # Not asyncio.wait_for: on Python 3.11 it can swallow a cancellation.
                async with asyncio.timeout(self.flush_interval):
                    await self._flush_now.wait()

    async def _flush(self) -> None:
        started = time.monotonic()
        if self._lease and started - self._lease_kept >= LEASE_REFRESH:
            if await self.store.keep_lease_alive(self._lease) > 0:
                self._lease_kept = started
            else:
                self._lease = 0  # expired: the records went with it
        if not self._lease:
            self._lease = await self.store.grant_lease(LEASE_TTL)
            self._lease_kept = started
            self._dirty = True
        revision = self._revision()
        if self._dirty or (self._written_chunks and revision != self._flushed_revision):
            # Cleared before encoding: an arrival while the transaction is under way
            # sets it again, for the next flush.
            self._dirty = False
            rows = [i.to_record() for i in self._instances.values()]
            # Nothing said before and nothing to say: no write.
            if rows or self._written_chunks or self._sync_clients:
                chunks = [rows[i : i + _CHUNK] for i in range(0, len(rows), _CHUNK)] or [[]]
                now = model.format_time(model.utcnow())
                ops = [
                    self.store.put_op(
                        keys.server_chunk_key(self.prefix, self.server_id, index),
                        json.dumps(
                            {"server_id": self.server_id, "revision": revision,
                             "reported_at": now, "instances": chunk,
                             **({"sync_clients": self._sync_clients} if index == 0 else {})}
                        ).encode(),
                        lease=self._lease,
                    )
                    for index, chunk in enumerate(chunks)
                ]  # fmt: skip
                ops += [
                    self.store.delete_op(keys.server_chunk_key(self.prefix, self.server_id, index))
                    for index in range(len(chunks), self._written_chunks)
                ]
                try:
                    await self.store.txn_raw(ops)
                except BaseException:
                    self._dirty = True  # tried again at the next flush
                    raise
                self._written_chunks = len(chunks)
                self._flushed_revision = revision
                others = await self.store.count_prefix_raw(keys.servers_prefix(self.prefix))
                self._peers = others > self._written_chunks
        await self._flush_applied()
        await self._flush_seen()

    async def flush(self) -> None:
        """Write now what would be written at the next flush (instances, last contacts,
        "all applied" records)."""
        async with self._flush_lock:
            with self.store.budget(self.store.etcd_timeout):
                await self._flush()

    async def _flush_seen(self) -> None:
        """Write the last contact of services whose agents are here (at most once a
        minute each while they stay) or whose last agent here just left."""
        clock = time.monotonic()
        due = {
            service
            for service, acks in self._services.items()
            if acks.instances
            and clock - self._seen_written.get(service, -SEEN_REFRESH) >= SEEN_REFRESH
        } | self._departed
        if not due:
            return
        now = model.format_time(model.utcnow())
        ops = [
            self.store.put_op(
                keys.seen_key(self.prefix, service),
                json.dumps({"service": service, "last_contact": now}).encode(),
            )
            for service in sorted(due)
        ]
        for start in range(0, len(ops), 100):
            await self.store.txn_raw(ops[start : start + 100])
        self._departed -= due
        for service in due:
            self._seen_written[service] = clock

    async def last_contacts(self) -> dict[str, datetime]:
        """When an agent of each service known was last connected (now, if one is)."""
        found: dict[str, datetime] = {}
        for key, raw in await self.store.get_prefix_raw(keys.seen_prefix(self.prefix)):
            try:
                found[key.rsplit("/", 1)[-1]] = model.parse_time(
                    str(json.loads(raw)["last_contact"])
                )
            except (ValueError, KeyError, TypeError):
                log.warning("presence_invalid", key=key)
        now = model.utcnow()
        for service, acks in self._services.items():
            if acks.instances:
                found[service] = now
        return found

    async def last_contact(self, service: str) -> datetime | None:
        """When an agent of ``service`` was last connected (None: not within memory)."""
        if self.local(service):
            return model.utcnow()
        key = keys.seen_key(self.prefix, service)
        for _key, raw in await self.store.get_range_raw(key, key + "\0"):
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return model.parse_time(str(json.loads(raw)["last_contact"]))
        return None

    async def prune_seen(self, cutoff: datetime) -> int:
        """Forget services whose agents were last connected before ``cutoff``."""
        stale = [
            key
            for key, raw in await self.store.get_prefix_raw(keys.seen_prefix(self.prefix))
            if _seen_before(raw, cutoff)
        ]
        for start in range(0, len(stale), 100):
            await self.store.txn_raw([self.store.delete_op(k) for k in stale[start : start + 100]])
        return len(stale)

    async def _flush_applied(self) -> None:
        """Write the pending "all applied" records, 100 to a transaction; keep any not written."""
        pending = sorted(self._applied.items())
        for start in range(0, len(pending), 100):
            batch = pending[start : start + 100]
            await self.store.txn_raw(
                [
                    self.store.put_op(
                        keys.applied_key(self.prefix, revision, service, self.server_id),
                        json.dumps(
                            {"all_acked_at": model.format_time(when), "instances": count}
                        ).encode(),
                    )
                    for (revision, service), (when, count) in batch
                ]
            )
            for key, _ in batch:
                self._applied.pop(key, None)


def _decode_presence(
    key: str, raw: bytes
) -> tuple[bytes, str, int, dict[str, list[Instance]]] | None:
    """One presence record of another process, its instances by service (None: invalid,
    logged)."""
    try:
        data = json.loads(raw)
        server = str(data["server_id"])
        by_service: dict[str, list[Instance]] = {}
        for row in data["instances"]:
            instance = Instance.from_record(row)
            by_service.setdefault(instance.service, []).append(instance)
        return raw, server, int(data["revision"]), by_service
    except (ValueError, KeyError, TypeError) as exc:
        log.error("presence_invalid", key=key, error=str(exc))
        return None


def _seen_before(raw: bytes, cutoff: datetime) -> bool:
    try:
        return model.parse_time(str(json.loads(raw)["last_contact"])) < cutoff
    except (ValueError, KeyError, TypeError):
        return True  # unreadable: nothing to keep
