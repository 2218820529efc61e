"""The services the control plane knows, and the suspicion a name nobody runs deserves.

A service is known when an agent of it has connected within the server's memory of
agents (its last contact, under the presence prefix, kept as long as the audit
trail), or when records are held for it. A write, a dry run or a status for a
service no agent has ever reported is made all the same (a kill switch may be
staged before the service ships), but the answer says so and names the closest
known services: ``chekout`` is far more often a typo than a new service.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable
from datetime import timedelta

from controlplane import model
from controlplane.api.v1 import mitigation_pb2 as mpb
from controlplane.api.v1 import types_pb2 as pb
from controlplane.server._presence import Presence
from controlplane.store import Store

SUGGESTIONS = 3
KNOWN_FOR = 60.0
"""Seconds a service found known stays known without asking etcd again."""
UNKNOWN_FOR = 1.0
"""Seconds a service found unknown stays so (writes in a burst ask etcd once)."""


class ServiceDirectory:
    """Which services are known; what to say of one that is not."""

    def __init__(self, store: Store, presence: Presence, memory: timedelta) -> None:
        self.store = store
        self.presence = presence
        self.memory = memory
        # service -> (monotonic time decided, the notice; None: known)
        self._decided: dict[str, tuple[float, pb.UnknownService | None]] = {}

    async def unknown(self, service: str) -> pb.UnknownService | None:
        """None when an agent of ``service`` has connected within memory; else what to say."""
        if self.presence.local(service):
            return None
        decided = self._decided.get(service)
        if decided is not None:
            age = time.monotonic() - decided[0]
            if age < (KNOWN_FOR if decided[1] is None else UNKNOWN_FOR):
                return decided[1]
        notice = await self._decide(service)
        if len(self._decided) > 10_000:
            self._decided.clear()
        self._decided[service] = (time.monotonic(), notice)
        return notice

    async def _decide(self, service: str) -> pb.UnknownService | None:
        if await self.presence.last_contact(service) is not None:
            return None
        # Agents connected to a replica that has not recorded their last contact yet.
        connected = await self.presence.connected_counts()
        if connected.get(service):
            return None
        contacts = await self.presence.last_contacts()
        seen = closest(service, [*contacts, *connected])
        held = closest(service, await self.store.records_by_service())
        # Services agents run first, then those only records name.
        candidates = [*seen, *(name for name in held if name not in seen)][:SUGGESTIONS]
        notice = pb.UnknownService(service=service, did_you_mean=candidates)
        notice.memory.FromTimedelta(self.memory)
        return notice

    async def unknown_of(self, services: Iterable[str]) -> list[pb.UnknownService]:
        """The notices of the services among ``services`` (``global`` aside) nobody runs."""
        notices = []
        for service in sorted(set(services) - {model.GLOBAL_SCOPE}):
            notice = await self.unknown(service)
            if notice is not None:
                notices.append(notice)
        return notices

    async def summaries(self) -> mpb.ListServicesResponse:
        """Every known service: instances connected now, last contact, records held."""
        contacts = await self.presence.last_contacts()
        connected = await self.presence.connected_counts()
        records = await self.store.records_by_service()
        pins, _ = await self.store.list_pins()
        pinned = {p.record.service: p.record.version for p in pins}
        response = mpb.ListServicesResponse()
        response.memory.FromTimedelta(self.memory)
        for service in sorted(set(contacts) | set(connected) | set(records)):
            held = records.get(service, {})
            summary = mpb.ServiceSummary(
                service=service,
                connected=connected.get(service, 0),
                flags=held.get("flag", 0),
                shedding=bool(held.get("shedding")),
                pinned_version=pinned.get(service, ""),
                known_good=held.get("known_good", 0),
            )
            if service in contacts:
                summary.last_contact.CopyFrom(model.datetime_to_timestamp(contacts[service]))
            response.services.append(summary)
        return response


def closest(name: str, known: Iterable[str]) -> list[str]:
    """The known names closest to ``name``, closest first (none when nothing is close)."""
    return difflib.get_close_matches(name, sorted(set(known) - {name}), n=SUGGESTIONS, cutoff=0.6)
