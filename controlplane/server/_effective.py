"""The flags in effect for a service, as OpenFeature sees them: one view for flagd and OFREP.

Both OpenFeature surfaces (the flagd sync stream on the gRPC port, OFREP on the HTTP
listener) serve the same thing: every flag in effect for one service (its own entry
over the global one, the layer of a time-boxed change in force now), plus shedding and
the pin as reserved flags. :class:`Views` builds that once per service per change that
concerns it (the hub's stamp) and shares it between every stream and request:

- a flag is one variant, the value in force (``on``/``off`` for a boolean, ``value``
  otherwise), with no targeting: evaluation gives reason ``STATIC`` and the value
  ``Agent.value()`` gives; a flag that is not set is absent (``FLAG_NOT_FOUND``, so the
  caller's default applies);
- shedding is ``controlplane.shedding`` (an object ``{"tier": "SHEDDABLE", "percent":
  50}``) and the pin ``controlplane.pin`` (the version), absent when off;
- each flag's metadata says its scope, who set it, why, the incident and the expiry.

A view is built again once its first time-boxed value ends, even before a server
writes what it restores, so nothing expired is served.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from controlplane import model
from controlplane.api.flagd.sync.v1 import sync_pb2
from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as pb
from controlplane.server.hub import Hub

SHEDDING_FLAG = "controlplane.shedding"
PIN_FLAG = "controlplane.pin"
RESERVED_PREFIX = "controlplane."
FLAGD_SCHEMA = "https://flagd.dev/schema/v0/flags.json"

_MAX_VIEWS = 10_000


def _in_force(record: Any, now: datetime) -> Any:
    """The layer of a (possibly time-boxed) flag, shedding or pin record in force at
    ``now`` (None: every layer has ended)."""
    layer = record
    while layer is not None:
        if (
            not layer.meta.HasField("expires_at")
            or layer.meta.expires_at.ToDatetime(tzinfo=now.tzinfo) > now
        ):
            return layer
        layer = layer.replaced if layer.HasField("replaced") else None
    return None


def _variants(value: Any) -> tuple[dict[str, Any], str]:
    if isinstance(value, bool):
        return {"on": True, "off": False}, "on" if value else "off"
    return {"value": value}, "value"


def _metadata(meta: pb.Meta, scope: str) -> dict[str, Any]:
    data: dict[str, Any] = {"scope": scope, "setBy": meta.actor}
    for key, text in (("reason", meta.reason), ("incident", meta.incident)):
        if text:
            data[key] = text
    if meta.HasField("expires_at"):
        data["expiresAt"] = model.format_time(meta.expires_at.ToDatetime(tzinfo=UTC))
    return data


def effective_flags(
    service: str, snapshot: agent_pb2.Snapshot, now: datetime
) -> dict[str, dict[str, Any]]:
    """Name -> flagd flag definition (state, variants, defaultVariant, metadata) of every
    flag in effect for ``service``, in name order, reserved flags last."""
    effective: dict[str, tuple[pb.Flag, str]] = {}
    for flag in snapshot.flags:
        layer = _in_force(flag, now)
        if layer is None:
            continue
        if flag.scope == service or flag.name not in effective:
            effective[flag.name] = (layer, flag.scope)
    flags: dict[str, dict[str, Any]] = {}
    for name in sorted(effective):
        layer, scope = effective[name]
        variants, default = _variants(model.flag_value_from_proto(layer.value))
        flags[name] = {
            "state": "ENABLED",
            "variants": variants,
            "defaultVariant": default,
            "metadata": _metadata(layer.meta, scope),
        }
    shedding = _in_force(snapshot.shedding, now) if snapshot.HasField("shedding") else None
    if shedding is not None:
        flags[SHEDDING_FLAG] = {
            "state": "ENABLED",
            "variants": {
                "value": {"tier": pb.Tier.Name(shedding.tier), "percent": shedding.percent}
            },
            "defaultVariant": "value",
            "metadata": _metadata(shedding.meta, service),
        }
    pin = _in_force(snapshot.pin, now) if snapshot.HasField("pin") else None
    if pin is not None:
        flags[PIN_FLAG] = {
            "state": "ENABLED",
            "variants": {"value": pin.version},
            "defaultVariant": "value",
            "metadata": _metadata(pin.meta, service),
        }
    return flags


def evaluation(name: str, flag: dict[str, Any]) -> dict[str, Any]:
    """OFREP's successful evaluation of a flag definition: its one variant, STATIC."""
    variant = flag["defaultVariant"]
    return {
        "key": name,
        "value": flag["variants"][variant],
        "reason": "STATIC",
        "variant": variant,
        "metadata": flag["metadata"],
    }


@dataclass(frozen=True, slots=True)
class View:
    """What one service sees at one stamp."""

    stamp: int
    """The hub's last revision that changed what concerns the service."""
    flags: dict[str, dict[str, Any]]
    flagd_payload: bytes
    """A serialized ``SyncFlagsResponse``, written as is to every flagd stream."""
    flagd_json: str
    bulk: bytes
    """OFREP's bulk evaluation answer (without ``eventStreams``), its ETag's content."""
    etag: str
    """``"<stamp>-<hash of bulk>"``: the stamp orders views across server processes."""
    until: datetime | None
    """When the first time-boxed value in it ends (then it is built again)."""


def etag_stamp(etag: str) -> int | None:
    """The stamp an ETag of ours carries (None: not one of ours)."""
    text = etag.strip()
    text = text.removeprefix("W/").strip('"')
    stamp, _, digest = text.partition("-")
    # ASCII digits only ("²" is a digit to isdigit), and no more than a revision has.
    ok = stamp.isascii() and stamp.isdigit() and len(stamp) <= 19 and len(digest) == 16
    return int(stamp) if ok else None


class Views:
    """The services' views, built once per relevant change and shared."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self._views: dict[str, View] = {}

    def get(self, service: str) -> View:
        """The service's view now (the hub must be ready)."""
        stamp = self.hub.stamp(service)
        now = model.utcnow()
        view = self._views.get(service)
        if view is None or view.stamp != stamp or (view.until is not None and view.until <= now):
            view = self._build(service, stamp, now)
            if len(self._views) >= _MAX_VIEWS:
                self._views.clear()
            self._views[service] = view
        return view

    def _build(self, service: str, stamp: int, now: datetime) -> View:
        snapshot = self.hub.snapshot(service)
        flags = effective_flags(service, snapshot, now)
        flagd_json = json.dumps(
            {
                "$schema": FLAGD_SCHEMA,
                "flags": flags,
                "metadata": {"service": service, "revision": self.hub.revision},
            },
            separators=(",", ":"),
        )
        payload = sync_pb2.SyncFlagsResponse(flag_configuration=flagd_json).SerializeToString()
        bulk = json.dumps(
            {
                "flags": [evaluation(name, flag) for name, flag in flags.items()],
                "metadata": {"service": service},
            },
            separators=(",", ":"),
        ).encode()
        digest = hashlib.blake2b(bulk, digest_size=8).hexdigest()
        return View(
            stamp=stamp,
            flags=flags,
            flagd_payload=payload,
            flagd_json=flagd_json,
            bulk=bulk,
            etag=f'"{stamp}-{digest}"',
            until=_next_expiry(snapshot, now),
        )


def _next_expiry(snapshot: agent_pb2.Snapshot, now: datetime) -> datetime | None:
    """When the first time-boxed layer in force in ``snapshot`` ends (None: none); the
    layer beneath it may be time-boxed too, and is looked at then."""
    records: list[Any] = list(snapshot.flags)
    records += [r for r in (snapshot.shedding, snapshot.pin) if r.HasField("meta")]
    ends = []
    for record in records:
        layer = _in_force(record, now)
        if layer is not None and layer.meta.HasField("expires_at"):
            ends.append(layer.meta.expires_at.ToDatetime(tzinfo=UTC))
    return min(ends, default=None)
