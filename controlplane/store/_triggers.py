"""Triggers in etcd: alerts mapped to a bundle, and what each alert group fired.

Under the record prefix (every write audited, in the same transaction)::

    triggers/<name>                        the trigger: matchers, the bundle, its options
    trigger-fires/<name>/<sha256 of group> what one alert group fired (the bundle applied,
                                           when; when it resolved)
    trigger-last/<name>                    when it last applied its bundle (cooldown)

The records are JSON documents made by the server (``server/_trigger_service.py``);
this module reads and writes them and nothing else.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from controlplane import model
from controlplane.errors import ConflictError
from controlplane.model import AuditEntry, WriteOptions
from controlplane.store._audit import audit_op
from controlplane.store._etcd import Etcd, delete, put, unchanged_since
from controlplane.store.keys import new_audit_id, range_end

__all__ = ["TRIGGERS", "TriggerStore"]

TRIGGERS = "triggers/"
_FIRES = "trigger-fires/"
_LAST = "trigger-last/"


def group_digest(group_key: str) -> str:
    return hashlib.sha256(group_key.encode()).hexdigest()[:32]


class TriggerStore:
    """Reads and audited writes of triggers and their firings."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self._etcd = etcd
        self.prefix = prefix

    def _abs(self, path: str) -> bytes:
        return (self.prefix + path).encode()

    async def get(self, name: str) -> tuple[dict[str, Any], int] | None:
        """A trigger's record and mod revision (None: no such trigger)."""
        response = await self._etcd.range(self._abs(TRIGGERS + name))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return json.loads(bytes(kv.value)), int(kv.mod_revision)

    async def list(self) -> list[tuple[dict[str, Any], int]]:
        start = self._abs(TRIGGERS)
        response = await self._etcd.range(start, range_end(start))
        found = []
        for kv in response.kvs:
            try:
                record = json.loads(bytes(kv.value))
            except ValueError:
                continue
            if isinstance(record, dict):
                found.append((record, int(kv.mod_revision)))
        return found

    async def write(
        self,
        name: str,
        record: dict[str, Any] | None,
        opts: WriteOptions,
        action: str,
        *,
        expected: int,
        before: dict[str, Any] | None,
    ) -> int:
        """Put (or, ``record`` None, delete) a trigger if its key is still at ``expected``
        (0: absent), with its audit record; returns the revision.

        Raises:
            ConflictError: Someone else wrote it meanwhile.
        """
        key = self._abs(TRIGGERS + name)
        now = model.utcnow()
        entry = AuditEntry(
            id=new_audit_id(now),
            time=now,
            actor=opts.actor,
            actor_authenticated=opts.actor_authenticated,
            action=action,
            kind="trigger",
            scope="global",
            name=name,
            key=self.prefix + TRIGGERS + name,
            reason=opts.reason,
            incident=opts.incident,
            before=before,
            after=record,
        )
        op = put(key, json.dumps(record).encode()) if record is not None else delete(key)
        response = await self._etcd.txn(
            [unchanged_since(key, expected)], [op, audit_op(self.prefix, entry)]
        )
        if not response.succeeded:
            current = await self.get(name)
            raise ConflictError(f"trigger {name}", expected, current[1] if current else 0)
        return int(response.header.revision)

    async def fire(self, name: str, group_key: str) -> dict[str, Any] | None:
        """What ``group_key`` fired of trigger ``name`` (None: nothing yet)."""
        found = await self._fire_kv(name, group_key)
        return found[0] if found else None

    async def _fire_kv(self, name: str, group_key: str) -> tuple[dict[str, Any], int] | None:
        response = await self._etcd.range(self._abs(f"{_FIRES}{name}/{group_digest(group_key)}"))
        if not response.kvs:
            return None
        kv = response.kvs[0]
        return json.loads(bytes(kv.value)), int(kv.mod_revision)

    async def _last_kv(self, name: str) -> tuple[datetime | None, int]:
        response = await self._etcd.range(self._abs(_LAST + name))
        if not response.kvs:
            return None, 0
        kv = response.kvs[0]
        try:
            return model.parse_time(bytes(kv.value).decode()), int(kv.mod_revision)
        except (ValueError, UnicodeDecodeError):
            return None, int(kv.mod_revision)

    async def claim(
        self, name: str, group_key: str, record: dict[str, Any], cooldown: float
    ) -> tuple[str, Any]:
        """Take the firing of ``group_key`` for this call alone (compare-and-set), and,
        with a ``cooldown``, the trigger's cooldown too: two replicas given the same
        alert, or two groups at once, apply the bundle once.

        Returns ``("claimed", revision)``, ``("fired", record)`` (the group fired
        already), or ``("cooldown", last firing time)``.
        """
        while True:
            prior = await self._fire_kv(name, group_key)
            if prior is not None and not prior[0].get("resolved_at"):
                return "fired", prior[0]
            last, last_mod = await self._last_kv(name)
            now = model.utcnow()
            if cooldown and last is not None and (now - last).total_seconds() < cooldown:
                return "cooldown", last
            fire_key = self._abs(f"{_FIRES}{name}/{group_digest(group_key)}")
            last_key = self._abs(_LAST + name)
            compare = [unchanged_since(fire_key, prior[1] if prior else 0)]
            if cooldown:
                compare.append(unchanged_since(last_key, last_mod))
            response = await self._etcd.txn(
                compare,
                [
                    put(fire_key, json.dumps(record).encode()),
                    put(last_key, model.format_time(now).encode()),
                ],
            )
            if response.succeeded:
                return "claimed", int(response.header.revision)

    async def release(self, name: str, group_key: str, revision: int) -> None:
        """Give a claim up (the bundle could not be applied): a retry may fire."""
        key = self._abs(f"{_FIRES}{name}/{group_digest(group_key)}")
        await self._etcd.txn([unchanged_since(key, revision)], [delete(key)])

    async def record_fire(self, name: str, group_key: str, record: dict[str, Any]) -> int:
        """Write what ``group_key`` fired (or that it resolved); returns the revision."""
        path = f"{_FIRES}{name}/{group_digest(group_key)}"
        ops = [put(self._abs(path), json.dumps(record).encode())]
        return int((await self._etcd.txn([], ops)).header.revision)

    async def last_fired(self, name: str) -> datetime | None:
        return (await self._last_kv(name))[0]

    async def forget(self, name: str) -> None:
        """A deleted trigger's firings and cooldown go with it."""
        start = f"{self.prefix}{_FIRES}{name}/"
        await self._etcd.txn([], [delete(self._abs(_LAST + name))])
        await self._etcd.delete_range_raw(start, range_end(start.encode()).decode())
