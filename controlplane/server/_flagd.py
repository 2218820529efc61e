"""The flagd sync protocol: OpenFeature's flagd providers read our mitigations.

``flagd.sync.v1.FlagSyncService`` on the gRPC port: a provider in in-process mode
(Go, Java, Node, .NET, Python, Rust) opens ``SyncFlags`` with a selector naming a
service and evaluates, in its own process, the flag configuration we stream: every
flag in effect for that service (its own entry over the global one) as flagd's
flag-configuration JSON, sent again whenever what concerns the service changes.

- What is served is the service's view (:mod:`._effective`, shared with OFREP): one
  variant per flag with no targeting, so providers resolve reason ``STATIC`` and the
  value ``Agent.value()`` gives; a flag not set is absent (``FLAG_NOT_FOUND``);
  shedding and the pin as the reserved flags ``controlplane.shedding`` and
  ``controlplane.pin``. A time-boxed change carries its expiry in the flag's metadata.
- A stream costs the hub nothing per change beyond a wake-up: the configuration is built
  and serialized once per service per relevant revision and shared by every stream of
  the service; a slow stream skips to the newest (never an older one after a newer).
- With authentication on, a sync client is an agent: its identity must allow the
  service it selects, as for the agents' own ``Sync``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import grpc
import structlog
from google.protobuf import struct_pb2

from controlplane import model
from controlplane.api.flagd.sync.v1 import sync_pb2
from controlplane.errors import ControlPlaneError, InvalidArgumentError
from controlplane.metrics import ServerMetrics
from controlplane.server._effective import Views
from controlplane.server._presence import Presence
from controlplane.server._rpc import SHUTTING_DOWN, OpenStreams, actor_of, log_rpc
from controlplane.server.auth import check_sync_service
from controlplane.server.hub import Hub

log = structlog.get_logger("controlplane.flagd")

SERVICE_NAME = sync_pb2.DESCRIPTOR.services_by_name["FlagSyncService"].full_name
SELECTOR_HEADER = "flagd-selector"


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


class FlagSyncServicer:
    """``SyncFlags``, ``FetchAllFlags`` and ``GetMetadata`` over the hub's mirror."""

    def __init__(
        self,
        hub: Hub,
        metrics: ServerMetrics,
        streams: OpenStreams,
        views: Views,
        presence: Presence | None = None,
    ) -> None:
        self.hub = hub
        self.views = views
        self.presence = presence
        self.metrics = metrics
        self.streams = streams

    def _service(self, selector: str, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        metadata: Mapping[str, Any] = dict(context.invocation_metadata() or ())
        header = metadata.get(SELECTOR_HEADER)
        service = service_of(str(header) if header else selector)
        check_sync_service(service)
        return service

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
                    payload = self.views.get(service).flagd_payload
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
            text = self.views.get(service).flagd_json
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
