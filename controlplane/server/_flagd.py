"""The flagd sync protocol: OpenFeature's flagd providers read our mitigations.

``flagd.sync.v1.FlagSyncService`` on the gRPC port: a provider in in-process mode
(Go, Java, Node, .NET, Python, Rust) opens ``SyncFlags`` with a selector naming a
service and evaluates, in its own process, the flag configuration we stream: every
flag in effect for that service (its own entry over the global one) as flagd's
flag-configuration JSON, sent again whenever what concerns the service changes.

- A flag is one variant, the value in force (``on``/``off`` for a boolean, ``value``
  otherwise), with no targeting: providers resolve it with reason ``STATIC`` and the
  value ``Agent.value()`` returns; a flag that is not set is absent (``FLAG_NOT_FOUND``,
  so the caller's default applies). A time-boxed change carries its expiry in the flag's
  metadata; when it expires the server restores what it replaced and the stream says so.
- Shedding and the pin are served as reserved flags: ``controlplane.shedding`` (an
  object ``{"tier": "SHEDDABLE", "percent": 50}``) and ``controlplane.pin`` (the pinned
  version), absent when off.
- A stream costs the hub nothing per change beyond a wake-up: the configuration is built
  and serialized once per service per relevant revision and shared by every stream of
  the service; a slow stream skips to the newest (never an older one after a newer).
- With authentication on, a sync client is an agent: its identity must allow the
  service it selects, as for the agents' own ``Sync``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import grpc
import structlog
from google.protobuf import struct_pb2

from controlplane import model
from controlplane.api.flagd.sync.v1 import sync_pb2
from controlplane.api.v1 import agent_pb2
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import ControlPlaneError, InvalidArgumentError
from controlplane.metrics import ServerMetrics
from controlplane.server._presence import Presence
from controlplane.server._rpc import SHUTTING_DOWN, OpenStreams, actor_of, log_rpc
from controlplane.server.auth import check_sync_service
from controlplane.server.hub import Hub

log = structlog.get_logger("controlplane.flagd")

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["FlagSyncService"].full_name
SELECTOR_HEADER = "flagd-selector"
SHEDDING_FLAG = "controlplane.shedding"
PIN_FLAG = "controlplane.pin"
RESERVED_PREFIX = "controlplane."
SCHEMA = "https://flagd.dev/schema/v0/flags.json"


def service_of(selector: str) -> str:
    """The service a selector names: ``checkout`` or ``service=checkout``."""
    text = selector.strip()
    if "=" in text:
        pairs = dict(part.strip().partition("=")[::2] for part in text.split(",") if part.strip())
        if set(pairs) != {"service"}:
            raise InvalidArgumentError(
                "selector",
                f"{text[:80]!r} names no service: select one with 'checkout' or "
                "'service=checkout' (the flagd-selector header or the selector field)",
            )
        text = pairs["service"].strip()
    if not text:
        raise InvalidArgumentError(
            "selector",
            "is required: name the service whose flags to sync, e.g. flagd-selector: checkout",
        )
    return model.validate_service(text, "selector")


def _in_force(flag: pb.Flag, now: datetime) -> pb.Flag | None:
    """The layer of a (possibly time-boxed) flag record in force at ``now``."""
    layer: pb.Flag | None = flag
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


def flag_configuration(
    service: str, snapshot: agent_pb2.Snapshot, revision: int, now: datetime
) -> str:
    """flagd's flag-configuration JSON for ``service`` (what its agents would apply)."""
    effective: dict[str, tuple[pb.Flag, str]] = {}
    for flag in snapshot.flags:
        layer = _in_force(flag, now)
        if layer is None:
            continue
        if flag.scope == service or flag.name not in effective:
            effective[flag.name] = (layer, flag.scope)
    flags: dict[str, Any] = {}
    for name in sorted(effective):
        layer, scope = effective[name]
        value = model.flag_value_from_proto(layer.value)
        variants, default = _variants(value)
        flags[name] = {
            "state": "ENABLED",
            "variants": variants,
            "defaultVariant": default,
            "metadata": _metadata(layer.meta, scope),
        }
    if snapshot.HasField("shedding"):
        shedding = snapshot.shedding
        flags[SHEDDING_FLAG] = {
            "state": "ENABLED",
            "variants": {
                "value": {"tier": pb.Tier.Name(shedding.tier), "percent": shedding.percent}
            },
            "defaultVariant": "value",
            "metadata": _metadata(shedding.meta, service),
        }
    if snapshot.HasField("pin"):
        flags[PIN_FLAG] = {
            "state": "ENABLED",
            "variants": {"value": snapshot.pin.version},
            "defaultVariant": "value",
            "metadata": _metadata(snapshot.pin.meta, service),
        }
    document = {
        "$schema": SCHEMA,
        "flags": flags,
        "metadata": {"service": service, "revision": revision},
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=False)


class FlagSyncServicer:
    """``SyncFlags``, ``FetchAllFlags`` and ``GetMetadata`` over the hub's mirror."""

    def __init__(
        self,
        hub: Hub,
        metrics: ServerMetrics,
        streams: OpenStreams,
        presence: Presence | None = None,
    ) -> None:
        self.hub = hub
        self.presence = presence
        self.metrics = metrics
        self.streams = streams
        # service -> (stamp it was built at, serialized SyncFlagsResponse, its JSON, when
        # a time-boxed value in it ends: built again from then on, even before a server
        # writes what it restores)
        self._built: dict[str, tuple[int, bytes, str, datetime | None]] = {}

    def _service(self, selector: str, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        metadata: Mapping[str, Any] = dict(context.invocation_metadata() or ())
        header = metadata.get(SELECTOR_HEADER)
        service = service_of(str(header) if header else selector)
        check_sync_service(service)
        return service

    def _configuration(self, service: str) -> tuple[bytes, str]:
        """The service's configuration now, built once per change that concerns it."""
        stamp = self.hub.stamp(service)
        now = model.utcnow()
        built = self._built.get(service)
        if built is None or built[0] != stamp or (built[3] is not None and built[3] <= now):
            snapshot = self.hub.snapshot(service)
            text = flag_configuration(service, snapshot, self.hub.revision, now)
            payload = sync_pb2.SyncFlagsResponse(flag_configuration=text).SerializeToString()
            if len(self._built) > 10_000:
                self._built.clear()
            built = self._built[service] = (stamp, payload, text, _next_expiry(snapshot, now))
        return built[1], built[2]

    async def SyncFlags(
        self, request: sync_pb2.SyncFlagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> None:
        """The service's configuration now, then again whenever it changes."""
        if self.streams.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        start = time.perf_counter()
        code = "OK"
        with self.streams.held():
            try:
                service = self._service(request.selector, context)
                await self.hub.ready.wait()
                await self._stream(service, context)
            except ControlPlaneError as exc:
                code = exc.code.name
                await context.abort(exc.code, exc.message)
            except asyncio.CancelledError:
                if not self.streams.ended_by_close():
                    code = "CANCELLED"
                    raise
                code = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            finally:
                log_rpc(self.metrics, "SyncFlags", code, start, actor_of(), None)

    async def _stream(self, service: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        feed = self.hub.feed(service)
        feed.streams += 1
        if self.presence is not None:
            self.presence.sync_connect(service)
        try:
            sent = -1
            while True:
                stamp = self.hub.stamp(service)
                if stamp != sent:
                    payload, _ = self._configuration(service)
                    sent = stamp
                    await context.write(payload)
                # One event wait per stream per change, as for the agents' streams.
                await feed.wait_past(feed.latest)
        finally:
            feed.streams -= 1
            self.hub.release(feed)
            if self.presence is not None:
                self.presence.sync_disconnect(service)

    async def FetchAllFlags(
        self, request: sync_pb2.FetchAllFlagsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.FetchAllFlagsResponse:
        start = time.perf_counter()
        try:
            service = self._service(request.selector, context)
            await self.hub.ready.wait()
            _, text = self._configuration(service)
        except ControlPlaneError as exc:
            log_rpc(self.metrics, "FetchAllFlags", exc.code.name, start, actor_of(), exc.message)
            await context.abort(exc.code, exc.message)
        log_rpc(self.metrics, "FetchAllFlags", "OK", start, actor_of(), None)
        return sync_pb2.FetchAllFlagsResponse(flag_configuration=text)

    async def GetMetadata(
        self, request: sync_pb2.GetMetadataRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> sync_pb2.GetMetadataResponse:
        metadata = struct_pb2.Struct()
        metadata.update({"source": "controlplane", "revision": self.hub.revision})
        return sync_pb2.GetMetadataResponse(metadata=metadata)


def _next_expiry(snapshot: agent_pb2.Snapshot, now: datetime) -> datetime | None:
    """When the first time-boxed value in force in ``snapshot`` ends (None: none)."""
    metas = [flag.meta for flag in snapshot.flags]
    metas += [r.meta for r in (snapshot.shedding, snapshot.pin) if r.HasField("meta")]
    ends = [
        end
        for meta in metas
        if meta.HasField("expires_at") and (end := meta.expires_at.ToDatetime(tzinfo=UTC)) > now
    ]
    return min(ends, default=None)


def add_flag_sync_service(servicer: FlagSyncServicer, server: grpc.aio.Server) -> None:
    """Register FlagSyncService as the generated code does, but let SyncFlags write the
    bytes built once for every stream of a service."""
    handlers = {
        "SyncFlags": grpc.unary_stream_rpc_method_handler(
            servicer.SyncFlags,
            request_deserializer=sync_pb2.SyncFlagsRequest.FromString,
            response_serializer=_serialize,
        ),
        "FetchAllFlags": grpc.unary_unary_rpc_method_handler(
            servicer.FetchAllFlags,
            request_deserializer=sync_pb2.FetchAllFlagsRequest.FromString,
            response_serializer=_serialize,
        ),
        "GetMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetMetadata,
            request_deserializer=sync_pb2.GetMetadataRequest.FromString,
            response_serializer=_serialize,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def _serialize(message: Any) -> bytes:
    return message if isinstance(message, bytes) else bytes(message.SerializeToString())
