"""AgentService: the agents' Sync stream.

An agent opens the stream with a Hello, gets a snapshot (or resumes from the revision
it applied), then every change that concerns its service, coalesced when it falls
behind; its acks and rejections come back on the same stream and go to presence.
When the server stops, the stream ends at once with UNAVAILABLE (``OpenStreams``):
the agent keeps what it has and connects again, to another server if it knows one.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import grpc
import structlog

from controlplane import model
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.errors import ControlPlaneError, InvalidArgumentError, UnavailableError
from controlplane.metrics import ServerMetrics
from controlplane.server._presence import Instance, Presence
from controlplane.server._reports import ReportLimiter, read_report
from controlplane.server._rpc import SHUTTING_DOWN, OpenStreams, actor_of, log_rpc
from controlplane.server.auth import check_sync_service, current_identity
from controlplane.server.hub import Feed, Hub, coalesce

log = structlog.get_logger("controlplane.rpc")

_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
HELLO_TIMEOUT = 10.0
LATENCY_SAMPLE_EVERY = 16
# How long a stream waits for this server to catch up with an agent that already
# applied a newer revision (it came from a replica that is ahead).
CATCH_UP_TIMEOUT = 5.0


def _override_audit(actor: str, reason: str) -> tuple[str, str]:
    """The audit actor and reason of a break-glass override. With authentication on,
    the actor is the agent's identity; the name in the override file is kept in the
    reason, as what the host reported."""
    identity = current_identity.get()
    if identity is None:
        return actor, reason
    if actor:
        reason = f"{reason or 'break-glass override on the host'} (override file names {actor})"
    return identity.name, reason


@dataclass(slots=True, eq=False)
class _Live:
    """An instance's live Sync stream in this process."""

    task: asyncio.Task[Any] | None
    peer: str
    replaced_by: str | None = None  # the peer of the stream that replaced it


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """The agents' Sync stream: hello, snapshot or resume, then changes; acks back."""

    def __init__(
        self,
        hub: Hub,
        presence: Presence,
        metrics: ServerMetrics,
        *,
        streams: OpenStreams | None = None,
    ) -> None:
        self.hub = hub
        self.presence = presence
        self.metrics = metrics
        self.streams = streams if streams is not None else OpenStreams()
        self._streams_seen = 0
        self._reports = ReportLimiter()
        # The live Sync of each instance in this process: one at a time.
        self._live: dict[tuple[str, str], _Live] = {}

    async def Sync(self, request_iterator: Any, context: Any) -> None:
        if self.streams.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        with self.streams.held():
            try:
                await self._sync(request_iterator, context)
            except asyncio.CancelledError:
                # Ended by the server's stop before it was under way (no hello yet, say);
                # once under way, _sync says so itself.
                if not self.streams.ended_by_close():
                    raise
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)

    async def _sync(self, request_iterator: Any, context: Any) -> None:
        start = time.perf_counter()
        try:
            hello = await self._hello(request_iterator)
            check_sync_service(hello.service)
        except ControlPlaneError as exc:
            log_rpc(self.metrics, "Sync", exc.code.name, start, actor_of(), exc.message)
            await context.abort(exc.code, exc.message)
            return
        instance = Instance(
            service=hello.service,
            instance_id=hello.instance_id,
            # Shown to operators as the agent wrote them: bounded, nothing a terminal acts on.
            running_version=model.clean_text(hello.running_version, 128),
            agent_version=model.clean_text(hello.agent_version, 64),
            connected_at=model.utcnow(),
            server_id=self.presence.server_id,
        )
        live = self._replace_live(instance, context.peer())
        log.info(
            "agent_connected",
            service=instance.service,
            instance_id=instance.instance_id,
            running_version=instance.running_version,
            last_applied_revision=hello.last_applied_revision,
            peer=context.peer(),
        )
        self.presence.connect(instance)
        try:
            if hello.HasField("override"):
                await self._override(instance, hello.override)
            # A feed made before the hub read the state would claim a history it lacks.
            await self.hub.ready.wait()
        except BaseException:
            self.presence.disconnect(instance)
            self._forget_live(instance, live)
            raise
        feed = self.hub.feed(instance.service)
        feed.streams += 1
        # Latency histograms take a lock per observation: on the fan-out path, only
        # one stream in LATENCY_SAMPLE_EVERY is timed.
        self._streams_seen += 1
        sampled = self._streams_seen % LATENCY_SAMPLE_EVERY == 1
        reader = asyncio.create_task(
            self._read_acks(request_iterator, instance, feed, sampled=sampled)
        )
        # The agent closing its side ends the stream (a cancel does that by itself).
        handler = asyncio.current_task()
        reader_ended = False

        def on_reader_done(task: asyncio.Task[None]) -> None:
            nonlocal reader_ended
            # The agent closed its side: the call ends with OK. A reader that failed
            # (a bug) ends it as cancelled, and says why in the log; one that read on
            # after this handler ended the call (an abort) did not fail.
            error = None if task.cancelled() else task.exception()
            reader_ended = not task.cancelled() and error is None
            if error is not None and not isinstance(error, grpc.aio.AbortError):
                log.error("ack_reader_failed", instance_id=instance.instance_id, error=repr(error))
            if handler is not None:
                handler.cancel()

        reader.add_done_callback(on_reader_done)
        code = "OK"
        try:
            sent = await self._first(context, instance, feed, hello.last_applied_revision)
            while True:
                # One event wait per stream per change: no task or queue per change.
                await feed.wait_past(sent)
                missed = feed.since(sent)
                if missed is None:
                    self.metrics.snapshots.labels("behind").inc()
                    sent = self.hub.revision
                    instance.sent = sent
                    await context.write(self.hub.snapshot_response(instance.service))
                elif missed:
                    # A stream that keeps up sends the feed's own serialized message.
                    payload = (
                        feed.serialized(missed[0].revision)
                        if len(missed) == 1
                        else agent_pb2.SyncResponse(change=coalesce(missed))
                    )
                    sent = missed[-1].revision
                    instance.sent = sent
                    await context.write(payload)
                    if sampled:
                        appended = feed.appended_at.get(sent)
                        if appended is not None:
                            self.metrics.stream_write_seconds.observe(time.monotonic() - appended)
        except asyncio.CancelledError:
            # The agent closed its side (the reader ended and cancelled us): end the call
            # with OK rather than leave it without a status.
            if reader_ended and handler is not None and handler.uncancel() == 0:
                return
            if live.replaced_by is not None and handler is not None:
                handler.uncancel()
                code = "ABORTED"
                await context.abort(
                    grpc.StatusCode.ABORTED,
                    f"another stream of instance {instance.instance_id} (from "
                    f"{live.replaced_by}) replaced this one: two agents share an instance id",
                )
            if self.streams.ended_by_close():
                # Said while the ack reader still runs: its end would cancel us again.
                code = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
            code = "CANCELLED"
            raise
        except ControlPlaneError as exc:
            code = exc.code.name
            await context.abort(exc.code, exc.message)
        finally:
            reader.cancel()
            feed.streams -= 1
            self.hub.release(feed)
            self.presence.disconnect(instance)
            self._forget_live(instance, live)
            log_rpc(self.metrics, "Sync", code, start, actor_of(), None)
            log.info(
                "agent_disconnected",
                service=instance.service,
                instance_id=instance.instance_id,
                applied=instance.applied,
            )

    def _replace_live(self, instance: Instance, peer: str) -> _Live:
        """Make this stream the instance's one live stream, ending an older one.

        Two streams with one instance id would show as one instance (a rogue agent
        could hide a real one from status): the newer replaces the older, which ends
        with ABORTED, and both are logged, so that a flapping pair is seen.
        """
        key = (instance.service, instance.instance_id)
        live = _Live(asyncio.current_task(), peer)
        old = self._live.get(key)
        self._live[key] = live
        if old is not None and old.task is not None and not old.task.done():
            log.warning(
                "agent_stream_replaced",
                service=instance.service,
                instance_id=instance.instance_id,
                old_peer=old.peer,
                new_peer=peer,
                message="a second stream with this instance id replaces the first",
            )
            old.replaced_by = peer
            old.task.cancel()
        return live

    def _forget_live(self, instance: Instance, live: _Live) -> None:
        key = (instance.service, instance.instance_id)
        if self._live.get(key) is live:
            del self._live[key]

    async def _hello(self, request_iterator: Any) -> agent_pb2.Hello:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await anext(request_iterator)
        except (StopAsyncIteration, TimeoutError):
            raise InvalidArgumentError(
                "hello", f"the stream must open with a Hello within {HELLO_TIMEOUT:g}s"
            ) from None
        if first.WhichOneof("message") != "hello":
            raise InvalidArgumentError("hello", "the first message of Sync must be a Hello")
        hello: agent_pb2.Hello = first.hello
        model.validate_service(hello.service, "hello.service")
        if not _INSTANCE_RE.fullmatch(hello.instance_id):
            raise InvalidArgumentError(
                "hello.instance_id",
                "is required: 1-128 characters A-Z, a-z, 0-9, '.', '_', ':', '@', '/' and '-'",
            )
        if hello.last_applied_revision < 0:
            raise InvalidArgumentError("hello.last_applied_revision", "must not be negative")
        return hello

    async def _first(self, context: Any, instance: Instance, feed: Feed, last: int) -> int:
        """Send the snapshot, or resume; return the revision the agent now has."""
        if last > self.hub.revision and not await self.hub.wait_for_revision(
            last, CATCH_UP_TIMEOUT
        ):
            # Never send an agent back in time: if etcd has the agent's revision, this
            # server is behind (its watch lags) and the agent should try another.
            with self.store_budget():
                current = await self.hub.store.revision()
            if current >= last:
                raise UnavailableError(
                    f"this server is behind etcd (at revision {self.hub.revision}, the agent "
                    f"applied {last}): try another server"
                )
            # etcd itself is older (restored from a backup, or another cluster): the
            # agent's revision will never come; its state is replaced by a snapshot.
            log.warning(
                "agent_ahead_of_etcd",
                service=instance.service,
                instance_id=instance.instance_id,
                agent_revision=last,
                etcd_revision=current,
            )
            last = 0
        missed = feed.since(last) if last > 0 else None
        if missed is None:
            self.metrics.snapshots.labels("connect" if last == 0 else "resume_impossible").inc()
            revision = self.hub.revision
            instance.sent = revision
            await context.write(self.hub.snapshot_response(instance.service))
            return revision
        self.metrics.resumes.inc()
        # Resuming: the agent has ``last`` (it said so; it cannot claim more than that).
        # Counted as an ack, so that the service's count of instances that applied its
        # latest change includes it.
        self.presence.ack(instance, last)
        instance.sent = last
        await context.write(
            agent_pb2.SyncResponse(
                resume=agent_pb2.Resume(revision=last, server_revision=self.hub.revision)
            )
        )
        if missed:
            change = coalesce(missed)
            instance.sent = change.revision
            await context.write(agent_pb2.SyncResponse(change=change))
            return change.revision
        return last

    def store_budget(self) -> Any:
        return self.hub.store.budget(self.hub.store.etcd_timeout)

    async def _override(self, instance: Instance, override: agent_pb2.Override) -> None:
        """A host's break-glass override: shown in status, audited once (bounded and
        rate-limited per instance: ``_reports``)."""
        instance.override_active = override.active
        self.presence.touch(instance.service)
        report = read_report(override)
        if not self._reports.allow(instance.service, instance.instance_id):
            self.metrics.override_reports_dropped.inc()
            log.warning(
                "override_report_dropped",
                service=instance.service,
                instance_id=instance.instance_id,
                report_reason=report.reason[:200],
                why="over the reports an instance may have audited",
            )
            return
        actor, reason = _override_audit(report.actor, report.reason)
        try:
            with self.hub.store.budget(self.hub.store.etcd_timeout):
                await self.hub.store.record_override(
                    instance.service,
                    instance.instance_id,
                    active=report.active,
                    digest=report.digest,
                    actor=actor,
                    actor_authenticated=current_identity.get() is not None,
                    reason=reason,
                    expires_at=report.expires_at,
                    content=report.content,
                )
        except ControlPlaneError as exc:
            # Reported again at the agent's next connect; the stream goes on.
            log.warning(
                "override_audit_failed", instance_id=instance.instance_id, error=exc.message
            )

    async def _read_acks(
        self, request_iterator: Any, instance: Instance, feed: Feed, *, sampled: bool
    ) -> None:
        async for request in request_iterator:
            kind = request.WhichOneof("message")
            if kind == "override":
                await self._override(instance, request.override)
                continue
            if kind != "ack":
                continue
            ack = request.ack
            if ack.revision > instance.sent:
                # An agent cannot have applied what it was not sent.
                log.warning(
                    "agent_ack_beyond_sent",
                    service=instance.service,
                    instance_id=instance.instance_id,
                    acked=ack.revision,
                    sent=instance.sent,
                )
                continue
            if ack.rejected_reason:
                log.warning(
                    "agent_rejected_change",
                    service=instance.service,
                    instance_id=instance.instance_id,
                    revision=ack.revision,
                    reason=ack.rejected_reason[:500],
                )
                self.presence.nack(instance, ack.revision, ack.rejected_reason)
            else:
                if sampled:
                    appended = feed.appended_at.get(ack.revision)
                    if appended is not None:
                        self.metrics.ack_seconds.observe(time.monotonic() - appended)
                self.presence.ack(instance, ack.revision)


def add_agent_service(servicer: AgentServicer, server: grpc.aio.Server) -> None:
    """Register AgentService as the generated code does, but let Sync write bytes.

    A change that many agents receive is serialized once by its feed; the stream
    writes those bytes as they are (a message is serialized as usual).
    """
    handlers = {
        "Sync": grpc.stream_stream_rpc_method_handler(
            servicer.Sync,
            request_deserializer=agent_pb2.SyncRequest.FromString,
            response_serializer=_serialize_response,
        )
    }
    name = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))


def _serialize_response(message: agent_pb2.SyncResponse | bytes) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()
