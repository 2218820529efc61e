"""Records as this server reads them: decoding, last-good recovery, what it last saw.

A record that does not parse (hand-edited) is never served: the server keeps the
key's last good record in memory and serves that (or, for a key it never saw good,
the newest record the audit trail shows, else nothing), logs ``record_invalid`` and
counts it. Agents only ever receive validated records.

Each key is also kept as this server last read or wrote it: a write builds its
transaction on that without reading first; the transaction's compare-and-set on the
mod revision catches another writer, and the write is then made again on a read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

from controlplane import model
from controlplane.errors import DeadlineExceededError
from controlplane.metrics import ServerMetrics
from controlplane.model import GLOBAL_SCOPE, Flag, KnownGood, Pin, RecordError, Shedding
from controlplane.store._audit import Audit
from controlplane.store._etcd import Etcd, WatchEvent
from controlplane.store.keys import FLAGS, MITIGATIONS, Key, key_for_path, range_end

__all__ = ["Current", "Records", "Stored", "stored"]

log = structlog.get_logger("controlplane.store")

R = TypeVar("R", Flag, Shedding, Pin, KnownGood)

_KNOWN_MAX = 10_000
"""Keys a store remembers as it last saw them (for writes without a read first)."""

_PARSE_ERRORS = (RecordError, ValueError, TypeError, KeyError, AttributeError)
"""What decoding a record that breaks a rule raises."""


@dataclass(frozen=True, slots=True)
class Stored(Generic[R]):
    """A record with the mod revision of the key that holds it."""

    record: R
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Current:
    """A key as read: its record (or last good one), mod revision, and invalid bytes."""

    record: Any
    mod_revision: int
    invalid: bytes | None = None


def stored(current: Current) -> Stored[Any] | None:
    """A key as read, for callers: None when it holds nothing."""
    if current.record is None:
        return None
    return Stored(current.record, current.mod_revision)


class Records:
    """The mitigation records under the prefix, read and decoded, with what was last seen."""

    def __init__(self, etcd: Etcd, audit: Audit, metrics: ServerMetrics) -> None:
        self._etcd = etcd
        self._audit = audit
        self._metrics = metrics
        self.prefix = etcd.prefix
        self._last_good: dict[str, Any] = {}
        self._known: dict[str, Current] = {}

    def abs(self, path: str) -> bytes:
        """The absolute etcd key of a path relative to the prefix."""
        return (self.prefix + path).encode()

    # -- decoding with last-good fallback ------------------------------------------------

    async def decode(self, key: Key, raw: bytes, mod_revision: int) -> tuple[Any, bool]:
        """The record in ``raw`` and True; if it does not parse, the last good one and False."""
        try:
            record = key.parse(model.decode_record(raw))
        except _PARSE_ERRORS as exc:
            self._metrics.invalid_records.labels(key.kind).inc()
            if key.path not in self._last_good:
                self._last_good[key.path] = await self._recover_last_good(key)
            fallback = self._last_good[key.path]
            log.error(
                "record_invalid",
                key=self.prefix + key.path,
                mod_revision=mod_revision,
                error=str(exc),
                serving="last good record" if fallback is not None else "nothing (absent)",
            )
            return fallback, False
        self._last_good[key.path] = record
        return record, True

    async def _recover_last_good(self, key: Key) -> Any:
        """The newest record the audit trail shows for ``key`` (None: absent or unknown).

        A replica that never saw the key's last good value (it restarted, or another
        replica wrote it) still must not serve a corrupted kill switch as absent.
        """
        target = self.prefix + key.path
        try:
            entries = await self._audit.scan(accept=lambda e: e.key == target, limit=1)
        except DeadlineExceededError:
            return None
        if not entries or entries[0].after is None:
            return None
        try:
            return key.parse(entries[0].after)
        except _PARSE_ERRORS:
            return None

    def remember(self, path: str, record: Any) -> None:
        """``record`` (None: deleted) is the key's newest good record: it was just written."""
        if record is not None:
            self._last_good[path] = record
        else:
            self._last_good.pop(path, None)

    # -- reads ------------------------------------------------------------------------------

    async def read(self, key: Key, *, remember: bool = True) -> Current:
        """The key as etcd has it now; ``remember``: as this server's last sight of it
        (only under the key's lock)."""
        response = await self._etcd.range(self.abs(key.path))
        if not response.kvs:
            self._last_good.pop(key.path, None)
            current = Current(None, 0)
        else:
            kv = response.kvs[0]
            record, valid = await self.decode(key, kv.value, kv.mod_revision)
            current = Current(record, int(kv.mod_revision), None if valid else bytes(kv.value))
        if remember:
            self.know(key.path, current)
        return current

    async def read_prefix(self, path_prefix: str) -> tuple[list[tuple[Key, Any, int]], int]:
        start = self.abs(path_prefix)
        response = await self._etcd.range(start, range_end(start))
        out: list[tuple[Key, Any, int]] = []
        for kv in response.kvs:
            path = kv.key.decode(errors="replace")[len(self.prefix) :]
            key = key_for_path(path)
            if key is None:
                log.error("record_unexpected_key", key=kv.key.decode(errors="replace"))
                continue
            record, _valid = await self.decode(key, kv.value, kv.mod_revision)
            if record is not None:
                out.append((key, record, int(kv.mod_revision)))
        return out, int(response.header.revision)

    async def read_state(self) -> tuple[list[tuple[str, Any, int]], int]:
        """Every flag, shedding level and pin (validated; bad records skipped), and the revision.

        Three ranges read at one revision (not the whole prefix: the audit trail and
        bundles would make it large).
        """
        out = []
        revision = 0
        for path in MITIGATIONS:
            start = self.abs(path)
            response = await self._etcd.range(start, range_end(start), revision=revision)
            revision = revision or int(response.header.revision)
            for kv in response.kvs:
                rel = kv.key.decode(errors="replace")[len(self.prefix) :]
                key = key_for_path(rel)
                if key is None:
                    continue
                record, _valid = await self.decode(key, kv.value, kv.mod_revision)
                if record is not None:
                    out.append((rel, record, int(kv.mod_revision)))
        return out, revision

    async def decode_event(self, event: WatchEvent) -> tuple[str, Any] | None:
        """A watched change as (kind, record or None for a deletion); None if not agents' business.

        A record that does not parse gives the key's last good record, so agents
        only ever receive validated records.
        """
        if not event.path.startswith(MITIGATIONS):
            return None
        key = key_for_path(event.path)
        if key is None:
            return None
        if event.value is None:
            self._last_good.pop(key.path, None)
            return key.kind, None
        record, valid = await self.decode(key, event.value, event.mod_revision)
        if not valid:
            return None  # keep serving what agents have
        return key.kind, record

    async def flag_scopes(self, name: str) -> list[str]:
        """Every scope (``global`` and services) with an entry for flag ``name``."""
        start = self.abs(FLAGS)
        response = await self._etcd.range(start, range_end(start), keys_only=True)
        scopes = []
        for kv in response.kvs:
            parts = kv.key.decode(errors="replace")[len(self.prefix) :].split("/")
            if len(parts) == 3 and parts[2] == name:
                scopes.append(parts[1])
        return sorted(scopes)

    async def paths_under(self, path_prefix: str) -> list[str]:
        """The relative paths of every key under ``path_prefix`` (keys only)."""
        start = self.abs(path_prefix)
        response = await self._etcd.range(start, range_end(start), keys_only=True)
        return [kv.key.decode(errors="replace")[len(self.prefix) :] for kv in response.kvs]

    async def services_overriding(self, name: str) -> list[str]:
        """Services with an entry of their own for flag ``name`` (hiding the global one)."""
        return [scope for scope in await self.flag_scopes(name) if scope != GLOBAL_SCOPE]

    # -- what this server last saw of a key -----------------------------------------------

    def known(self, path: str) -> Current | None:
        """The key as this server last read or wrote it (None: not known)."""
        return self._known.get(path)

    def know(self, path: str, current: Current | None) -> None:
        if current is None or current.invalid is not None:
            self._known.pop(path, None)
            return
        if len(self._known) >= _KNOWN_MAX and path not in self._known:
            self._known.clear()
        self._known[path] = current

    async def txn(self, compare: Sequence[Any], success: Sequence[Any]) -> Any:
        """One transaction; what it changed is no longer as last seen.

        What a bundle, a revert or an expiry changed is forgotten here; a write
        through the write path records its own result after this.
        """
        response = await self._etcd.txn(compare, success)
        if response.succeeded and self._known:
            start = len(self.prefix)
            for op in success:
                kind = op.WhichOneof("request")
                if kind == "request_put":
                    self._known.pop(op.request_put.key.decode(errors="replace")[start:], None)
                elif kind == "request_delete_range":
                    self._known.pop(
                        op.request_delete_range.key.decode(errors="replace")[start:], None
                    )
        return response
