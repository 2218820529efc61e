"""The notifier's state in etcd: who sends, how far each destination got, what failed.

It lives beside the records, under a prefix agents do not watch
(``/controlplane/v1-notify/``)::

    leader                                    the server process that sends (leased)
    state/<destination>                       its cursor and the message in flight
    failed/<20-digit unix ns>-<destination>   a message given up on

One server process sends at a time: it creates ``leader`` under its lease when the key
is free, and every state write it makes is fenced on that key's create revision, so a
process that lost its place (a lease that ran out while it was paused) writes nothing.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from aetcd import rpc

from controlplane.store._etcd import Etcd, delete, put
from controlplane.store.keys import notify_prefix, ns, range_end

__all__ = ["NotifyState"]


def _created_at(key: bytes, revision: int) -> Any:
    """A transaction's compare: ``key`` was created at ``revision`` (0: absent)."""
    return rpc.Compare(
        key=key, result=rpc.Compare.EQUAL, target=rpc.Compare.CREATE, create_revision=revision
    )


class NotifyState:
    """Reads and fenced writes of the notifier's keys."""

    def __init__(self, etcd: Etcd, prefix: str) -> None:
        self._etcd = etcd
        self.root = notify_prefix(prefix)
        self._leader = f"{self.root}leader".encode()

    def _state_key(self, destination: str) -> bytes:
        return f"{self.root}state/{destination}".encode()

    async def claim(self, owner: str, lease: int) -> int | None:
        """Become the sender if no one is: the fence (the leader key's create revision),
        or None when another process holds the place."""
        response = await self._etcd.txn(
            [_created_at(self._leader, 0)], [put(self._leader, owner.encode(), lease=lease)]
        )
        return int(response.header.revision) if response.succeeded else None

    async def holder(self) -> str | None:
        """Which server process sends now (None: none)."""
        response = await self._etcd.range(self._leader)
        return bytes(response.kvs[0].value).decode(errors="replace") if response.kvs else None

    async def release(self, fence: int) -> None:
        """Give the place up (when still ours)."""
        await self._etcd.txn([_created_at(self._leader, fence)], [delete(self._leader)])

    async def states(self) -> dict[str, dict[str, Any]]:
        """Every destination's state: ``{"cursor": revision, "pending": {...} | None}``."""
        start = f"{self.root}state/".encode()
        response = await self._etcd.range(start, range_end(start))
        states: dict[str, dict[str, Any]] = {}
        for kv in response.kvs:
            name = bytes(kv.key)[len(start) :].decode(errors="replace")
            try:
                value = json.loads(bytes(kv.value))
            except ValueError:
                continue
            if isinstance(value, dict):
                states[name] = value
        return states

    async def save(self, fence: int, destination: str, state: dict[str, Any]) -> bool:
        """Write a destination's state if the place is still ours."""
        raw = json.dumps(state, separators=(",", ":")).encode()
        response = await self._etcd.txn(
            [_created_at(self._leader, fence)], [put(self._state_key(destination), raw)]
        )
        return bool(response.succeeded)

    async def give_up(
        self,
        fence: int,
        destination: str,
        state: dict[str, Any],
        failure: dict[str, Any],
        now: datetime,
    ) -> bool:
        """Record a message given up on and move the destination past it, at once."""
        key = f"{self.root}failed/{ns(now):020d}-{destination}".encode()
        raw = json.dumps(state, separators=(",", ":")).encode()
        response = await self._etcd.txn(
            [_created_at(self._leader, fence)],
            [put(key, json.dumps(failure).encode()), put(self._state_key(destination), raw)],
        )
        return bool(response.succeeded)

    async def failed(self, limit: int) -> list[dict[str, Any]]:
        """The messages given up on, newest first."""
        start = f"{self.root}failed/".encode()
        response = await self._etcd.range(start, range_end(start))
        entries: list[dict[str, Any]] = []
        for kv in reversed(response.kvs):
            try:
                value = json.loads(bytes(kv.value))
            except ValueError:
                continue
            if isinstance(value, dict):
                entries.append(value)
            if len(entries) >= limit:
                break
        return entries

    async def forget_failed_before(self, cutoff: datetime) -> int:
        """Delete the failures recorded before ``cutoff`` (retention)."""
        start = f"{self.root}failed/".encode()
        end = f"{self.root}failed/{ns(cutoff):020d}".encode()
        response = await self._etcd.call(
            "delete", "DeleteRange", rpc.DeleteRangeRequest(key=start, range_end=end)
        )
        return int(response.deleted)
