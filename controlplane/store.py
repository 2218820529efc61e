"""The only module that talks to etcd: key layout, compare-and-set, audit, retention.

Layout under the prefix (default ``/controlplane/v1/``), every value a JSON record
readable with ``etcdctl get --prefix``::

    flags/<scope>/<name>            scope: "global" or a service
    shedding/<service>
    pins/<service>
    known-good/<service>/<version>
    bundles/<id>
    audit/<20-digit unix ns>-<8 hex>  time-ordered, so retention is one range delete

Every write is a read-modify-write: the record is read with its mod revision,
the new record computed, then one transaction compares the mod revision and
puts the record and its audit record together. A caller-supplied expected mod
revision that does not match fails with :class:`ConflictError`; without one,
a lost race is retried. A write that changes neither value nor expiry writes
nothing (no revision, no audit record).

The store builds its own gRPC channel to etcd (aetcd 1.0's client opens a
plaintext channel to a single host:port) and uses aetcd's generated etcd v3
stubs on it, so that several endpoints form one multi-address target with
failover, every call gets its own deadline, and TLS can be added here alone.

Deadlines: each etcd call gets what is left of the current budget
(:meth:`Store.budget`, set per RPC by the service to the smaller of
``etcd_timeout`` and the RPC's own deadline), else ``etcd_timeout``. A call that
gets no answer in time raises :class:`UnavailableError`.

A record that does not parse (hand-edited) is never served: the store keeps
the key's last good record in memory and serves that (or treats the key as
absent if it never saw a good one), logs ``record_invalid`` and counts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import random
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Generic, TypeVar

import grpc
import structlog
from aetcd import rpc

from controlplane import model
from controlplane.errors import (
    ConflictError,
    ControlPlaneError,
    NotImplementedYetError,
    UnavailableError,
)
from controlplane.metrics import ServerMetrics
from controlplane.model import (
    GLOBAL_SCOPE,
    AuditEntry,
    Flag,
    FlagValue,
    KnownGood,
    Meta,
    Pin,
    RecordError,
    Shedding,
    Tier,
    WriteOptions,
)

log = structlog.get_logger("controlplane.store")

R = TypeVar("R", Flag, Shedding, Pin, KnownGood)

DEFAULT_PREFIX = "/controlplane/v1/"
_MAX_CAS_ATTEMPTS = 16
_HISTORY_PAGE = 512
_CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    # gRPC's own reconnect backoff grows to 120 s; etcd coming back must be
    # noticed within about a second.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "controlplane_etcd_deadline", default=None
)


# ---------------------------------------------------------------- results


@dataclass(frozen=True, slots=True)
class Stored(Generic[R]):
    """A record with the mod revision of the key that holds it."""

    record: R
    mod_revision: int


@dataclass(frozen=True, slots=True)
class WriteOutcome(Generic[R]):
    """What a write did (or would do, on a dry run)."""

    changed: bool
    dry_run: bool
    revision: int
    mod_revision: int
    record: R | None
    previous: R | None
    restored: R | None = None
    audit_id: str = ""
    overridden_by: tuple[str, ...] = ()
    summary: str = ""


@dataclass(frozen=True, slots=True)
class _Decision(Generic[R]):
    new: R | None
    action: str
    summary: str
    changed: bool = True
    restored: R | None = None


@dataclass(slots=True)
class _KeyLock:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


@dataclass(slots=True)
class _Key:
    """Where a record lives and how to parse and name it."""

    path: str  # relative to the prefix, e.g. "flags/global/new-ui"
    kind: str  # flag, shedding, pin, known_good
    scope: str
    name: str
    parse: Callable[[dict[str, Any]], Any] = field(repr=False)


# ---------------------------------------------------------------- channel


def channel_target(endpoints: Sequence[str]) -> str:
    """A gRPC target for one or more ``host:port`` endpoints.

    One endpoint is used as it is (DNS resolution by gRPC). Several become one
    multi-address target (``ipv4:a:p,b:p``), so gRPC fails over between them;
    host names among several are resolved here, once.
    """
    cleaned = [e.strip() for e in endpoints if e.strip()]
    if not cleaned:
        raise ValueError("no etcd endpoint given")
    for endpoint in cleaned:
        _split_endpoint(endpoint)
    if len(cleaned) == 1:
        return cleaned[0]
    v4: list[str] = []
    v6: list[str] = []
    for endpoint in cleaned:
        host, port = _split_endpoint(endpoint)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = [ipaddress.ip_address(info[4][0]) for info in infos]
        for address in addresses:
            if address.version == 4:
                v4.append(f"{address}:{port}")
            else:
                v6.append(f"[{address}]:{port}")
    if v4 and v6:
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses; use one family")
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def _split_endpoint(endpoint: str) -> tuple[str, int]:
    endpoint = endpoint.removeprefix("http://")
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"etcd endpoint {endpoint!r} is not host:port")
    return host.strip("[]"), int(port)


def _range_end(prefix: bytes) -> bytes:
    """The etcd range end that covers every key starting with ``prefix``."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"


def new_audit_id(now: datetime) -> str:
    """A time-ordered audit id: 20-digit unix nanoseconds and 8 random hex digits."""
    ns = int(now.timestamp()) * 1_000_000_000 + now.microsecond * 1000
    return f"{ns:020d}-{secrets.token_hex(4)}"


# ---------------------------------------------------------------- the store


class Store:
    """Flags, shedding, pins and known-good marks in etcd, each write audited.

    Lifecycle: build, ``await connect()`` once (opens the channel; does not wait
    for etcd, which may come later), use, ``await close()`` (idempotent).
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        prefix: str = DEFAULT_PREFIX,
        *,
        etcd_timeout: float = 2.0,
        metrics: ServerMetrics,
        on_etcd_health: Callable[[bool], None] | None = None,
    ) -> None:
        if not prefix.startswith("/") or not prefix.endswith("/"):
            raise ValueError(f"prefix {prefix!r} must start and end with '/'")
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.etcd_timeout = etcd_timeout
        self._target = channel_target(self.endpoints)
        self._metrics = metrics
        self._on_etcd_health = on_etcd_health
        self._etcd_ok: bool | None = None
        self._channel: grpc.aio.Channel | None = None
        self._kv: Any = None
        self._maintenance: Any = None
        self._last_good: dict[str, Any] = {}
        self._key_locks: dict[str, _KeyLock] = {}

    # -- lifecycle ---------------------------------------------------------

    async def connect(self) -> None:
        """Open the channel to etcd. Call once."""
        if self._channel is not None:
            raise RuntimeError("Store.connect() called twice")
        self._channel = grpc.aio.insecure_channel(self._target, options=_CHANNEL_OPTIONS)
        self._kv = rpc.KVStub(self._channel)
        self._maintenance = rpc.MaintenanceStub(self._channel)

    async def close(self) -> None:
        """Close the channel. Idempotent."""
        channel, self._channel = self._channel, None
        if channel is not None:
            await channel.close(grace=None)

    @contextlib.contextmanager
    def budget(self, seconds: float) -> Iterator[None]:
        """Give the etcd calls made inside at most ``seconds`` in all."""
        token = _deadline.set(time.monotonic() + max(seconds, 0.0))
        try:
            yield
        finally:
            _deadline.reset(token)

    # -- raw etcd calls ----------------------------------------------------

    def _timeout(self) -> float:
        deadline = _deadline.get()
        if deadline is None:
            return self.etcd_timeout
        left = deadline - time.monotonic()
        if left <= 0:
            raise UnavailableError(self._unreachable("no time left for etcd"))
        return left

    def _unreachable(self, detail: str) -> str:
        return f"etcd is unreachable at {','.join(self.endpoints)}: {detail}"

    def _set_etcd_ok(self, ok: bool) -> None:
        self._metrics.etcd_up.set(1 if ok else 0)
        if ok != self._etcd_ok:
            self._etcd_ok = ok
            if ok:
                log.info("etcd_reachable", endpoints=self.endpoints)
            else:
                log.error("etcd_unreachable", endpoints=self.endpoints)
            if self._on_etcd_health is not None:
                self._on_etcd_health(ok)

    async def _call(self, operation: str, method: Callable[..., Any], request: Any) -> Any:
        if self._kv is None:
            raise RuntimeError("Store is not connected")
        timeout = self._timeout()
        start = time.perf_counter()
        outcome = "ok"
        try:
            response = await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            outcome = "error"
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                self._set_etcd_ok(False)
                detail = (
                    f"no answer within {timeout:.2f}s"
                    if code is grpc.StatusCode.DEADLINE_EXCEEDED
                    else str(exc.details())
                )
                raise UnavailableError(self._unreachable(detail)) from None
            if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise UnavailableError(
                    f"etcd refused the write: {exc.details()} (its space quota is full: "
                    "compact and defragment etcd)"
                ) from None
            raise ControlPlaneError(f"etcd error ({code.name}): {exc.details()}") from None
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            self._metrics.etcd_seconds.labels(operation, outcome).observe(
                time.perf_counter() - start
            )
        self._set_etcd_ok(True)
        return response

    async def _range(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        limit: int = 0,
        descending: bool = False,
        keys_only: bool = False,
        count_only: bool = False,
    ) -> Any:
        request = rpc.RangeRequest(
            key=key,
            range_end=range_end or b"",
            limit=limit,
            keys_only=keys_only,
            count_only=count_only,
        )
        if descending:
            request.sort_order = rpc.RangeRequest.DESCEND
            request.sort_target = rpc.RangeRequest.KEY
        return await self._call("range", self._kv.Range, request)

    async def ping(self) -> int:
        """Read etcd's current revision (a linearizable read); raise if unreachable."""
        response = await self._range(self.prefix.encode(), count_only=True)
        return int(response.header.revision)

    async def revision(self) -> int:
        """etcd's current revision."""
        return await self.ping()

    # -- keys --------------------------------------------------------------

    def _abs(self, path: str) -> bytes:
        return (self.prefix + path).encode()

    def _flag_key(self, scope: str, name: str) -> _Key:
        def parse(data: dict[str, Any]) -> Flag:
            flag = Flag.from_record(data)
            if (flag.scope, flag.name) != (scope, name):
                raise RecordError(f"record names {flag.scope}/{flag.name}, not {scope}/{name}")
            return flag

        return _Key(f"flags/{scope}/{name}", "flag", scope, name, parse)

    def _shedding_key(self, service: str) -> _Key:
        def parse(data: dict[str, Any]) -> Shedding:
            record = Shedding.from_record(data)
            if record.service != service:
                raise RecordError(f"record names service {record.service}, not {service}")
            return record

        return _Key(f"shedding/{service}", "shedding", service, "", parse)

    def _pin_key(self, service: str) -> _Key:
        def parse(data: dict[str, Any]) -> Pin:
            record = Pin.from_record(data)
            if record.service != service:
                raise RecordError(f"record names service {record.service}, not {service}")
            return record

        return _Key(f"pins/{service}", "pin", service, "", parse)

    def _known_good_key(self, service: str, version: str) -> _Key:
        def parse(data: dict[str, Any]) -> KnownGood:
            record = KnownGood.from_record(data)
            if (record.service, record.version) != (service, version):
                raise RecordError(
                    f"record names {record.service}/{record.version}, not {service}/{version}"
                )
            return record

        return _Key(f"known-good/{service}/{version}", "known_good", service, version, parse)

    def _key_for_path(self, path: str) -> _Key | None:
        """The key description for a relative path, or None for an unknown layout."""
        parts = path.split("/")
        try:
            if parts[0] == "flags" and len(parts) == 3:
                return self._flag_key(parts[1], parts[2])
            if parts[0] == "shedding" and len(parts) == 2:
                return self._shedding_key(parts[1])
            if parts[0] == "pins" and len(parts) == 2:
                return self._pin_key(parts[1])
            if parts[0] == "known-good" and len(parts) == 3:
                return self._known_good_key(parts[1], parts[2])
        except IndexError:
            return None
        return None

    # -- decoding with last-good fallback ------------------------------------

    def _decode(self, key: _Key, raw: bytes, mod_revision: int) -> Any:
        try:
            record = key.parse(model.decode_record(raw))
        except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
            fallback = self._last_good.get(key.path)
            self._metrics.invalid_records.labels(key.kind).inc()
            log.error(
                "record_invalid",
                key=self.prefix + key.path,
                mod_revision=mod_revision,
                error=str(exc),
                serving="last good record" if fallback is not None else "nothing (absent)",
            )
            return fallback
        self._last_good[key.path] = record
        return record

    async def _read(self, key: _Key) -> tuple[Any, int]:
        response = await self._range(self._abs(key.path))
        if not response.kvs:
            self._last_good.pop(key.path, None)
            return None, 0
        kv = response.kvs[0]
        return self._decode(key, kv.value, kv.mod_revision), int(kv.mod_revision)

    async def _read_prefix(self, path_prefix: str) -> tuple[list[tuple[_Key, Any, int]], int]:
        start = self._abs(path_prefix)
        response = await self._range(start, _range_end(start))
        out: list[tuple[_Key, Any, int]] = []
        for kv in response.kvs:
            path = kv.key.decode(errors="replace")[len(self.prefix) :]
            key = self._key_for_path(path)
            if key is None:
                log.error("record_unexpected_key", key=kv.key.decode(errors="replace"))
                continue
            record = self._decode(key, kv.value, kv.mod_revision)
            if record is not None:
                out.append((key, record, int(kv.mod_revision)))
        return out, int(response.header.revision)

    # -- the write path ------------------------------------------------------

    async def _mutate(
        self,
        key: _Key,
        opts: WriteOptions,
        decide: Callable[[Any], _Decision[Any]],
        *,
        overridden_by: Callable[[], Any] | None = None,
    ) -> WriteOutcome[Any]:
        # Writers of one key in this process take turns, so that a burst of
        # last-writer-wins writes does not lose compare-and-set races to itself;
        # races with other replicas are retried with jittered backoff.
        lock = self._key_locks.setdefault(key.path, _KeyLock())
        lock.users += 1
        try:
            async with lock.lock:
                return await self._mutate_locked(key, opts, decide, overridden_by=overridden_by)
        finally:
            lock.users -= 1
            if lock.users == 0:
                self._key_locks.pop(key.path, None)

    async def _mutate_locked(
        self,
        key: _Key,
        opts: WriteOptions,
        decide: Callable[[Any], _Decision[Any]],
        *,
        overridden_by: Callable[[], Any] | None = None,
    ) -> WriteOutcome[Any]:
        for attempt in range(_MAX_CAS_ATTEMPTS):
            if attempt:
                await asyncio.sleep(random.uniform(0, min(0.2, 0.005 * 2**attempt)))  # noqa: S311 (jitter)
            current, mod_revision = await self._read(key)
            expected = opts.expected_mod_revision
            if expected is not None and expected != mod_revision:
                raise ConflictError(self.prefix + key.path, expected, mod_revision)
            decision = decide(current)
            hidden: tuple[str, ...] = ()
            if overridden_by is not None and decision.changed:
                hidden = tuple(await overridden_by())
            if not decision.changed:
                return WriteOutcome(
                    changed=False,
                    dry_run=opts.dry_run,
                    revision=0,
                    mod_revision=mod_revision,
                    record=current,
                    previous=current,
                    summary=decision.summary,
                )
            raw = model.encode_record(decision.new.to_record()) if decision.new else None
            now = model.utcnow()
            audit = AuditEntry(
                id=new_audit_id(now),
                time=now,
                actor=opts.actor,
                actor_authenticated=opts.actor_authenticated,
                action=decision.action,
                kind=key.kind,
                scope=key.scope,
                name=key.name,
                key=self.prefix + key.path,
                reason=opts.reason,
                incident=opts.incident,
                before=current.to_record() if current is not None else None,
                after=decision.new.to_record() if decision.new is not None else None,
                expires_at=opts.expires_at,
            )
            audit_raw = model.encode_record(audit.to_record(), "audit record")
            if opts.dry_run:
                return WriteOutcome(
                    changed=False,
                    dry_run=True,
                    revision=0,
                    mod_revision=mod_revision,
                    record=decision.new,
                    previous=current,
                    restored=decision.restored,
                    overridden_by=hidden,
                    summary=decision.summary,
                )
            target = self._abs(key.path)
            write_op = (
                rpc.RequestOp(request_put=rpc.PutRequest(key=target, value=raw))
                if raw is not None
                else rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=target))
            )
            audit_op = rpc.RequestOp(
                request_put=rpc.PutRequest(key=self._abs("audit/" + audit.id), value=audit_raw)
            )
            compare = rpc.Compare(
                key=target,
                result=rpc.Compare.EQUAL,
                target=rpc.Compare.MOD,
                mod_revision=mod_revision,
            )
            response = await self._call(
                "txn",
                self._kv.Txn,
                rpc.TxnRequest(compare=[compare], success=[write_op, audit_op]),
            )
            if not response.succeeded:
                if expected is not None:
                    _, now_mod = await self._read(key)
                    raise ConflictError(self.prefix + key.path, expected, now_mod)
                continue
            revision = int(response.header.revision)
            if decision.new is not None:
                self._last_good[key.path] = decision.new
            else:
                self._last_good.pop(key.path, None)
            self._metrics.changes.labels(decision.action).inc()
            log.info(
                "change_written",
                action=decision.action,
                key=self.prefix + key.path,
                revision=revision,
                actor=opts.actor,
                actor_authenticated=opts.actor_authenticated,
                reason=opts.reason,
                incident=opts.incident,
                summary=decision.summary,
                audit_id=audit.id,
            )
            return WriteOutcome(
                changed=True,
                dry_run=False,
                revision=revision,
                mod_revision=revision if decision.new is not None else 0,
                record=decision.new,
                previous=current,
                restored=decision.restored,
                audit_id=audit.id,
                overridden_by=hidden,
                summary=decision.summary,
            )
        raise UnavailableError(
            f"{self.prefix + key.path} is being changed by others too often: "
            f"gave up after {_MAX_CAS_ATTEMPTS} attempts; try again"
        )

    @staticmethod
    def _no_expiry_yet(opts: WriteOptions) -> None:
        if opts.expires_at is not None:
            raise NotImplementedYetError(
                "time-boxed changes (ttl / expires_at) are not implemented yet: "
                "nothing was written; write without an expiry and clear it by hand"
            )

    # -- flags -----------------------------------------------------------------

    async def set_flag(
        self, scope: str, name: str, value: FlagValue, opts: WriteOptions
    ) -> WriteOutcome[Flag]:
        """Set a flag for a scope (``global`` or a service)."""
        self._no_expiry_yet(opts)
        key = self._flag_key(scope, name)
        now = model.utcnow()

        def decide(current: Flag | None) -> _Decision[Flag]:
            was = f" (was {model.describe_value(current.value)})" if current else " (new)"
            summary = f"flag {name} = {model.describe_value(value)}{was}"
            if (
                current is not None
                and model.value_key(current.value) == model.value_key(value)
                and current.meta.expires_at is None
            ):
                return _Decision(current, "flag.set", summary, changed=False)
            new = Flag(scope, name, value, Meta.from_options(opts, now))
            return _Decision(new, "flag.set", summary)

        hidden = (lambda: self.services_overriding(name)) if scope == GLOBAL_SCOPE else None
        return await self._mutate(key, opts, decide, overridden_by=hidden)

    async def clear_flag(
        self, scope: str, name: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Flag]:
        """Clear a flag; a time-boxed layer restores what it replaced unless ``all_layers``."""
        self._no_expiry_yet(opts)
        key = self._flag_key(scope, name)

        def decide(current: Flag | None) -> _Decision[Flag]:
            if current is None:
                return _Decision(None, "flag.clear", f"flag {name} not set", changed=False)
            restored = None if all_layers else current.replaced
            after = f", {model.describe_value(restored.value)} again" if restored else ""
            summary = f"flag {name} cleared (was {model.describe_value(current.value)}{after})"
            return _Decision(restored, "flag.clear", summary, restored=restored)

        hidden = (lambda: self.services_overriding(name)) if scope == GLOBAL_SCOPE else None
        return await self._mutate(key, opts, decide, overridden_by=hidden)

    async def get_flag(self, scope: str, name: str) -> Stored[Flag] | None:
        """The flag of exactly this scope."""
        record, mod_revision = await self._read(self._flag_key(scope, name))
        return Stored(record, mod_revision) if record is not None else None

    async def get_effective_flag(self, service: str, name: str) -> Stored[Flag] | None:
        """The flag a service sees: its own entry, else the global one."""
        own = await self.get_flag(service, name)
        return own if own is not None else await self.get_flag(GLOBAL_SCOPE, name)

    async def list_flags(
        self, scope: str = "", *, effective: bool = False
    ) -> tuple[list[Stored[Flag]], int]:
        """Flags of one scope (all when empty); with ``effective``, what a service sees."""
        if not scope:
            rows, revision = await self._read_prefix("flags/")
            return [Stored(r, m) for _, r, m in rows], revision
        rows, revision = await self._read_prefix(f"flags/{scope}/")
        flags = [Stored(r, m) for _, r, m in rows]
        if effective and scope != GLOBAL_SCOPE:
            own = {f.record.name for f in flags}
            global_rows, revision = await self._read_prefix(f"flags/{GLOBAL_SCOPE}/")
            flags += [Stored(r, m) for _, r, m in global_rows if r.name not in own]
            flags.sort(key=lambda f: f.record.name)
        return flags, revision

    async def services_overriding(self, name: str) -> list[str]:
        """Services with an entry of their own for flag ``name`` (hiding the global one)."""
        start = self._abs("flags/")
        response = await self._range(start, _range_end(start), keys_only=True)
        services = []
        for kv in response.kvs:
            parts = kv.key.decode(errors="replace")[len(self.prefix) :].split("/")
            if len(parts) == 3 and parts[2] == name and parts[1] != GLOBAL_SCOPE:
                services.append(parts[1])
        return sorted(services)

    # -- shedding ----------------------------------------------------------------

    async def set_shedding(
        self, service: str, tier: Tier, percent: float, opts: WriteOptions
    ) -> WriteOutcome[Shedding]:
        """Set a service's shedding level."""
        self._no_expiry_yet(opts)
        key = self._shedding_key(service)
        now = model.utcnow()

        def decide(current: Shedding | None) -> _Decision[Shedding]:
            new = Shedding(service, tier, percent, Meta.from_options(opts, now))
            was = f" (was {current.describe()})" if current else " (was none)"
            summary = f"shedding {new.describe()}{was}"
            if (
                current is not None
                and (current.tier, current.percent) == (tier, percent)
                and current.meta.expires_at is None
            ):
                return _Decision(current, "shedding.set", summary, changed=False)
            return _Decision(new, "shedding.set", summary)

        return await self._mutate(key, opts, decide)

    async def clear_shedding(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Shedding]:
        """Stop shedding for a service (or restore the level a time-boxed one replaced)."""
        self._no_expiry_yet(opts)

        def decide(current: Shedding | None) -> _Decision[Shedding]:
            if current is None:
                return _Decision(None, "shedding.clear", "shedding not set", changed=False)
            restored = None if all_layers else current.replaced
            after = f", {restored.describe()} again" if restored else ""
            summary = f"shedding cleared (was {current.describe()}{after})"
            return _Decision(restored, "shedding.clear", summary, restored=restored)

        return await self._mutate(self._shedding_key(service), opts, decide)

    async def get_shedding(self, service: str) -> Stored[Shedding] | None:
        """A service's shedding level."""
        record, mod_revision = await self._read(self._shedding_key(service))
        return Stored(record, mod_revision) if record is not None else None

    async def list_shedding(self) -> tuple[list[Stored[Shedding]], int]:
        """Every service's shedding level."""
        rows, revision = await self._read_prefix("shedding/")
        return [Stored(r, m) for _, r, m in rows], revision

    # -- pins and known-good -------------------------------------------------------

    async def pin(self, service: str, version: str, opts: WriteOptions) -> WriteOutcome[Pin]:
        """Pin a service to a version; the pin records the one it replaced."""
        self._no_expiry_yet(opts)
        now = model.utcnow()

        def decide(current: Pin | None) -> _Decision[Pin]:
            was = f" (was {current.version})" if current else " (was unpinned)"
            summary = f"pinned to {version}{was}"
            if current is not None and current.version == version and not current.meta.expires_at:
                return _Decision(current, "pin.set", summary, changed=False)
            previous = current.history() if current is not None else None
            new = Pin(service, version, Meta.from_options(opts, now), previous=previous)
            return _Decision(new, "pin.set", summary)

        return await self._mutate(self._pin_key(service), opts, decide)

    async def unpin(
        self, service: str, opts: WriteOptions, *, all_layers: bool = False
    ) -> WriteOutcome[Pin]:
        """Remove a service's pin and say what it was."""
        self._no_expiry_yet(opts)

        def decide(current: Pin | None) -> _Decision[Pin]:
            if current is None:
                return _Decision(None, "pin.clear", "not pinned", changed=False)
            restored = None if all_layers else current.replaced
            after = f", {restored.version} again" if restored else ""
            summary = f"pin cleared (was {current.version}{after})"
            return _Decision(restored, "pin.clear", summary, restored=restored)

        return await self._mutate(self._pin_key(service), opts, decide)

    async def get_pin(self, service: str) -> Stored[Pin] | None:
        """A service's pin."""
        record, mod_revision = await self._read(self._pin_key(service))
        return Stored(record, mod_revision) if record is not None else None

    async def list_pins(self) -> tuple[list[Stored[Pin]], int]:
        """Every service's pin."""
        rows, revision = await self._read_prefix("pins/")
        return [Stored(r, m) for _, r, m in rows], revision

    async def mark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Mark a version of a service known-good (a rollback target)."""
        now = model.utcnow()

        def decide(current: KnownGood | None) -> _Decision[KnownGood]:
            if current is not None:
                return _Decision(
                    current, "known_good.mark", f"{version} already known-good", changed=False
                )
            new = KnownGood(service, version, Meta.from_options(opts, now))
            return _Decision(new, "known_good.mark", f"{version} marked known-good")

        return await self._mutate(self._known_good_key(service, version), opts, decide)

    async def unmark_known_good(
        self, service: str, version: str, opts: WriteOptions
    ) -> WriteOutcome[KnownGood]:
        """Withdraw a known-good mark ("mark as bad")."""

        def decide(current: KnownGood | None) -> _Decision[KnownGood]:
            if current is None:
                return _Decision(
                    None, "known_good.unmark", f"{version} is not marked known-good", changed=False
                )
            return _Decision(None, "known_good.unmark", f"{version} no longer known-good")

        return await self._mutate(self._known_good_key(service, version), opts, decide)

    async def list_known_good(self, service: str) -> list[Stored[KnownGood]]:
        """A service's known-good versions, most recently marked first."""
        rows, _ = await self._read_prefix(f"known-good/{service}/")
        marks = [Stored(r, m) for _, r, m in rows]
        marks.sort(key=lambda s: (s.record.meta.set_at, s.mod_revision), reverse=True)
        return marks

    # -- audit history and retention -------------------------------------------------

    async def list_history(
        self,
        *,
        service: str = "",
        incident: str = "",
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
    ) -> list[AuditEntry]:
        """Audit entries, newest first, filtered (a service's includes global changes)."""
        lower = self._abs("audit/" + (new_audit_id(since)[:20] if since else ""))
        upper = (
            self._abs("audit/" + new_audit_id(until)[:20] + "~")
            if until
            else _range_end(self._abs("audit/"))
        )
        entries: list[AuditEntry] = []
        while len(entries) < limit and lower < upper:
            response = await self._range(lower, upper, limit=_HISTORY_PAGE, descending=True)
            for kv in response.kvs:
                try:
                    entry = AuditEntry.from_record(model.decode_record(kv.value), kv.mod_revision)
                except (RecordError, ValueError, TypeError, KeyError, AttributeError) as exc:
                    self._metrics.invalid_records.labels("audit").inc()
                    log.error("record_invalid", key=kv.key.decode(errors="replace"), error=str(exc))
                    continue
                if service and entry.scope not in (service, GLOBAL_SCOPE):
                    continue
                if incident and entry.incident != incident:
                    continue
                entries.append(entry)
                if len(entries) >= limit:
                    break
            if not response.more or not response.kvs:
                break
            upper = bytes(response.kvs[-1].key)  # exclusive: continue below the last key seen
        return entries

    async def enforce_retention(self, retention: timedelta) -> int:
        """Delete audit records older than ``retention``; return how many."""
        cutoff = model.utcnow() - retention
        start = self._abs("audit/")
        end = self._abs("audit/" + new_audit_id(cutoff)[:20])
        response = await self._call(
            "delete",
            self._kv.DeleteRange,
            rpc.DeleteRangeRequest(key=start, range_end=end),
        )
        deleted = int(response.deleted)
        if deleted:
            self._metrics.audit_deleted.inc(deleted)
            log.info("audit_retention", deleted=deleted, older_than=model.format_time(cutoff))
        return deleted

    async def count_active(self) -> dict[str, int]:
        """How many flags, shedding levels and pins are in force."""
        counts = {}
        for kind, path in (("flag", "flags/"), ("shedding", "shedding/"), ("pin", "pins/")):
            start = self._abs(path)
            response = await self._range(start, _range_end(start), count_only=True)
            counts[kind] = int(response.count)
        return counts
