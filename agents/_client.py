"""The agent's background half: one Sync stream, reconnects, acks, expiry, cache.

:class:`Client` runs as one coroutine, :meth:`Client.run`, in one asyncio loop:
the loop of the agent's own thread for :class:`agents.Agent`, the caller's loop
for :class:`agents.AsyncAgent`. Everything it does happens in that loop, so it
needs no lock of its own; it hands each new snapshot to the agent through
``publish`` (one attribute assignment), which is all the read path ever sees.

Per connection::

    channel (own subchannel pool, keepalive; TLS as config.security says)
      -> wait until connected (CONNECT_TIMEOUT; a failure says gRPC's reason,
         e.g. a TLS handshake error)
    a channel that could not connect is kept as the server's spare (up to
      SPARE_MAX_AGE): gRPC retries it in the background, the backoff ends early
      when it connects, and the next attempt to that server uses it
    the token, if any, in the Sync's metadata (a token file read again each time)
    Sync: Hello(service, instance, version, last applied revision, agent version)
          (revision 0 after a rejection: a full snapshot, please)
      <- Snapshot   replaces the state, ack (older than the applied one: etcd
                    went back, applied with a warning)
      <- Resume     nothing missed but what follows
      <- Change     applied as one unit: ack; not newer than the state: dropped
      READY once the first Snapshot is applied or the Resume accepted
    a malformed Snapshot or Change: nack, keep the state, end the stream and
      reconnect (with backoff) asking for a snapshot
    token refused (UNAUTHENTICATED, PERMISSION_DENIED): logged at ERROR (once per
      server, again every AUTH_ERROR_REPEAT seconds while it lasts), state kept,
      backoff, next server
    stream lost -> STALE (or CONNECTING without state), backoff, next server;
      the backoff starts again from its base only after a session that stayed
      up STABLE_SESSION seconds

Beside the stream, in the same loop, :class:`agents._client_state.ClientState`
(the base class of :class:`Client`) keeps the state: the swaps and acks, the
callbacks, the expiry timer, the cache writer and the break-glass override.
All of it happens whether a server answers or not (fail static).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

import controlplane
from agents import _codec, _state
from agents._channels import CHANNEL_OPTIONS, Backoff, SessionError, Spare, wait_connected
from agents._client_state import STREAM_EOF, AgentState, ClientState, Rejected, utcnow
from agents._config import SECURITY_NAMES, AgentConfig
from agents._override import override_to_proto
from agents._state import InvalidChangeError, Snapshot, StaleRevisionError, StateChange
from controlplane.api.v1 import agent_pb2, agent_pb2_grpc
from controlplane.transport import TransportConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("agents")

AGENT_VERSION = controlplane.__version__

CONNECT_TIMEOUT = 3.0
"""Seconds to wait for a TCP + HTTP/2 connection before trying the next server."""

SPARE_MAX_AGE = 10.0
"""Seconds a channel that could not connect is reused for the next attempts to its
server (gRPC retrying in the background) before a new one is made, which reads
the TLS files again."""

FIRST_RESPONSE_TIMEOUT = 10.0
"""Seconds to wait for the first response after the Hello (the server may wait up
to 5 s for its etcd watch to catch up with the agent's revision)."""

STABLE_SESSION = 5.0
"""Seconds a session must have stayed up (from its first applied answer) for the
reconnect backoff to start again from its base: a server that accepts streams
and drops them at once is retried with a growing backoff, not every 50 ms by
every agent."""

AUTH_ERROR_REPEAT = 300.0
"""Seconds after which a refused token (or unusable connection settings) is logged
at ERROR again while it goes on; in between, the same refusal is DEBUG."""

_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)

REFUSED_BACKOFF_CAP = 30.0
"""Seconds: the longest wait before trying again after the server refused the token
(full jitter from 1 s up; a fixed token file is used at the next try)."""


class Client(ClientState):
    """The background client of one agent: :class:`ClientState` (whose arguments it
    takes) and the stream."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        publish: Callable[[Snapshot], None],
        on_state: Callable[[AgentState], None],
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__(config, publish=publish, on_state=on_state, registry=registry)
        self._next_server = 0
        self.backoff = Backoff()
        """The reconnect backoff, across sessions."""
        self._sent_token: str | None = None
        """The token the last session sent, to keep it out of logged server details."""
        self._hello_revision = 0
        self._synced_at: float | None = None
        self._spares: dict[str, Spare] = {}
        """Per server, a channel that could not connect, gRPC retrying it."""
        self.closing_channels: list[Any] = []
        """gRPC's channel objects of the sessions closed by a stop, for
        :func:`release_channels`."""

    # ------------------------------------------------------------ start-up

    def after_fork_in_child(self, config: AgentConfig) -> None:
        """Forget the parent's connection and locks; keep its state.

        The state becomes ``STALE`` (``CONNECTING`` without state): also when
        the parent's thread was still running, connected, at the fork.
        """
        self.config = config
        self._callbacks_lock = threading.Lock()
        if self._cache is not None:
            self._cache.reset_after_fork()
        self._tasks = set()
        self._cache_wakeup = self._expiry_wakeup = None
        self._report_call = self._report_task = self._write_lock = None
        self._spares = {}
        self.closing_channels = []
        self.server = None
        self._set_connected(False)

    # ------------------------------------------------------------ the coroutine

    async def run(self) -> None:
        """Keep a stream to one of the servers until cancelled.

        Cancel the task running it to stop; it then closes its channel and writes
        the last applied state to the cache before returning. It may be run again
        (in another loop) afterwards and resumes from the state it has.
        """
        self._cache_wakeup = asyncio.Event()
        self._expiry_wakeup = asyncio.Event()
        self._write_lock = asyncio.Lock()
        helpers = [
            asyncio.create_task(self._expiry_loop(), name="controlplane-agent-expiry"),
            asyncio.create_task(self._cache_loop(), name="controlplane-agent-cache"),
        ]
        if self._override_file is not None:
            helpers.append(
                asyncio.create_task(self._override_loop(), name="controlplane-agent-override")
            )
        try:
            if self._unnotified is not None:
                before, self._unnotified = self._unnotified, None
                self._notify(_state.diff(before, self.effective))
            await self._connect_loop()
        finally:
            if self._report_task is not None:
                helpers.append(self._report_task)
                self._report_task = None
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            self._tasks.clear()
            await self._drop_spares(release=True)
            self._set_connected(False)

    async def _connect_loop(self) -> None:
        backoff = self.backoff
        # A refused token is not fixed by retrying at once: a fleet whose token was
        # revoked must not hammer the servers with handshakes (REFUSED_BACKOFF_CAP).
        refused_backoff = Backoff(base=1.0, cap=REFUSED_BACKOFF_CAP)
        servers = self.config.servers
        # The last failure per server: a new kind of failure is a warning, the
        # same one again (every couple of seconds while a server is down) is not.
        failures: dict[str, str] = {}
        # A refused token (or unusable connection settings) per server, and when
        # it was last logged at ERROR: an ERROR at first, then every
        # AUTH_ERROR_REPEAT seconds while it lasts.
        refusals: dict[str, tuple[str, float]] = {}
        while True:
            target = servers[self._next_server % len(servers)]
            self._next_server = (self._next_server + 1) % len(servers)
            synced = False
            code: grpc.StatusCode | None = None
            # Why the token was refused or the connection settings are unusable.
            refused: str | None = None
            try:
                synced = await self._session(target)
                detail = "the server ended the stream"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                detail = f"{code.name}: {exc.details()}"
            except asyncio.InvalidStateError:
                detail = "the stream ended while acknowledging"
            except TimeoutError:
                detail = "timed out"
            except SessionError as exc:
                synced, code = exc.synced, exc.code
                detail = str(exc)
            except TransportConfigError as exc:
                # The token file or a TLS file became unreadable since start-up.
                detail = exc.render(SECURITY_NAMES)
                refused = "the connection settings cannot be used"
            except Exception as exc:  # the stream must survive whatever a session hits
                log.exception(
                    "agent_session_error service=%s server=%s", self.config.service, target
                )
                detail = repr(exc)
            if code in _AUTH_CODES:
                refused = self._auth_advice(code)
                detail = self._redact(detail)
            lost = synced or self.state is AgentState.READY
            synced_at, self._synced_at = self._synced_at, None
            if synced_at is not None and time.monotonic() - synced_at >= STABLE_SESSION:
                backoff.reset()
            self._set_connected(False)
            delay = backoff.next()
            if lost:
                failures.clear()
            if synced:
                refused_backoff.reset()
            if refused is not None:
                delay = max(delay, refused_backoff.next())
                failures[target] = detail
                now = time.monotonic()
                seen = refusals.get(target)
                again = seen is not None and seen[0] == detail
                if again and seen is not None and now - seen[1] < AUTH_ERROR_REPEAT:
                    level = logging.DEBUG
                else:
                    level = logging.ERROR
                    refusals[target] = (detail, now)
                log.log(
                    level,
                    "agent_auth_failed service=%s server=%s: %s (%s) state=%s, serving the "
                    "last known state and retrying, retry_in=%.3f",
                    self.config.service,
                    target,
                    refused,
                    detail,
                    self.state.value,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            refusals.pop(target, None)
            if lost:
                log.warning(
                    "agent_disconnected service=%s server=%s reason=%s state=%s",
                    self.config.service,
                    target,
                    detail,
                    self.state.value,
                )
            else:
                level = logging.DEBUG if failures.get(target) == detail else logging.WARNING
                failures[target] = detail
                log.log(
                    level,
                    "agent_connect_failed service=%s server=%s reason=%s state=%s retry_in=%.3f",
                    self.config.service,
                    target,
                    detail,
                    self.state.value,
                    delay,
                )
            await self._rest(delay)

    async def _rest(self, delay: float) -> None:
        """The backoff: ``delay`` seconds, or until the next server's spare channel
        connects, if there is one (gRPC's retries found the server back)."""
        servers = self.config.servers
        spare = self._spares.get(servers[self._next_server % len(servers)])
        if spare is None:
            await asyncio.sleep(delay)
        else:
            await asyncio.wait((spare.ready,), timeout=delay)

    async def _drop_spares(self, *, release: bool = False) -> None:
        """Close the spare channels (``release``: leave them to release_channels)."""
        spares, self._spares = list(self._spares.values()), {}
        for spare in spares:
            spare.ready.cancel()
            if release:
                self.closing_channels.append(getattr(spare.channel, "_channel", None))
            await spare.channel.close(grace=None)
        del spares

    def _auth_advice(self, code: grpc.StatusCode | None) -> str:
        """What an UNAUTHENTICATED or PERMISSION_DENIED means for this agent."""
        where = f"{SECURITY_NAMES['token']} or {SECURITY_NAMES['token_file']}"
        if code is grpc.StatusCode.PERMISSION_DENIED:
            return (
                f"the token does not allow service {self.config.service} (agent tokens are "
                f"limited to their services): use one that does ({where})"
            )
        if self._sent_token:
            return f"the server refused the token (unknown, expired or revoked?): check {where}"
        return f"the server requires a token and none was sent: give {where}"

    def _redact(self, text: str) -> str:
        """``text`` without the token in it, should a server have echoed it."""
        token = self._sent_token
        return text.replace(token, "<token>") if token else text

    # ------------------------------------------------------------ one session

    async def _session(self, target: str) -> bool:
        """One connection to ``target``; returns (or raises) when it ends.

        Returns whether the stream got as far as an applied first answer (a
        Snapshot applied or a Resume accepted); until then the agent stays
        ``CONNECTING`` (``STALE`` with a state).
        """
        security = self.config.security
        # Read for each connection: a rotated token file is used from the next one.
        metadata = security.metadata()
        self._sent_token = metadata[0][1].removeprefix("Bearer ") if metadata else None
        spare = self._spares.pop(target, None)
        if spare is not None and time.monotonic() - spare.since > SPARE_MAX_AGE:
            spare.ready.cancel()
            await spare.channel.close(grace=None)
            spare = None
        if spare is None:
            channel = security.aio_channel(target, CHANNEL_OPTIONS)
            since = time.monotonic()
        else:
            spare.ready.cancel()
            channel, since = spare.channel, spare.since
        stub: Any = None
        call: Any = None
        synced = False
        # Why the channel could not connect: it is then kept as the server's spare.
        unconnected: str | None = None
        self._synced_at = None
        try:
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await wait_connected(channel, spare.why if spare is not None else None)
            except SessionError as exc:
                unconnected = str(exc)
                raise
            except TimeoutError:
                unconnected = "timed out"
                raise
            del spare
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Sync(metadata=metadata)
            hello = self._hello()
            self._hello_revision = hello.last_applied_revision
            # A Hello with the override says all the queue does (the override in
            # force); what the watcher queues meanwhile stays queued.
            covered = list(self._outbox) if hello.HasField("override") else []
            try:
                await call.write(agent_pb2.SyncRequest(hello=hello))
            except asyncio.InvalidStateError:
                # The server ended the call before the Hello (a refused token):
                # its status says why.
                code = await call.code()
                details = await call.details()
                raise SessionError(f"{code.name}: {details}", False, code) from None
            if covered and self._outbox[: len(covered)] == covered:
                del self._outbox[: len(covered)]
            delta: StateChange | None = None
            async with asyncio.timeout(FIRST_RESPONSE_TIMEOUT):
                while not synced:
                    first = await call.read()
                    if first is STREAM_EOF:
                        code = await call.code()
                        raise SessionError(
                            f"stream closed before a first answer ({code.name})", False, code
                        )
                    kind = first.WhichOneof("message")
                    if kind == "change":
                        self._resync = True
                        raise Rejected("a change before the first snapshot or resume")
                    delta = await self._handle(call, first)
                    # Anything else (a kind from a newer server) is ignored.
                    synced = kind in ("snapshot", "resume")
            self._synced_at = time.monotonic()
            self.server = target
            self._set_connected(True)
            log.info(
                "agent_connected service=%s server=%s revision=%d",
                self.config.service,
                target,
                self.snapshot.revision,
            )
            self._report_call = call
            self._flush_reports()
            self._notify(delta)
            await self._drop_spares()  # other servers' spares: this one answers
            while True:
                response = await call.read()
                if response is STREAM_EOF:
                    return True
                self._notify(await self._handle(call, response))
        except Rejected as exc:
            raise SessionError(f"{exc}: asking for a snapshot", synced) from None
        except grpc.aio.AioRpcError as exc:
            if synced:
                code = exc.code()
                raise SessionError(f"{code.name}: {exc.details()}", True, code) from None
            raise
        finally:
            self.server = None
            self._report_call = None
            if self._report_task is not None:
                self._report_task.cancel()
                self._report_task = None
            # Closing cancels the call. gRPC's asyncio machinery (a poller thread)
            # lives as long as some channel *object* does, and an exception's
            # traceback keeps this frame: drop every reference, so that no
            # channel survives its session (and none a fork); a spare is closed
            # by the next session or when run() ends.
            if unconnected is not None and not _stopping():
                self._spares[target] = Spare(channel, since, unconnected)
            else:
                if _stopping():
                    self.closing_channels.append(getattr(channel, "_channel", None))
                await channel.close(grace=None)
            del channel, stub, call

    def _hello(self) -> agent_pb2.Hello:
        config = self.config
        hello = agent_pb2.Hello(
            service=config.service,
            instance_id=config.instance_id,
            running_version=config.version,
            last_applied_revision=(
                self.snapshot.revision if self._has_state and not self._resync else 0
            ),
            agent_version=AGENT_VERSION,
        )
        if self.override is not None:
            # Each stream is an instance anew on the server: the override in
            # force is reported in every Hello (audited once, by its digest),
            # unless the queue holds more than that (sent, in order, after the
            # first answer).
            current = override_to_proto(self.override)
            if not self._outbox or self._outbox == [current]:
                hello.override.CopyFrom(current)
        return hello

    async def _handle(self, call: Any, response: agent_pb2.SyncResponse) -> StateChange | None:
        """Apply one response and ack it; return what changed, for the callbacks.

        Raises:
            Rejected: A Snapshot or Change was rejected (and nacked), or a
                Resume does not continue from the Hello's revision; the state is
                kept and the stream is to end.
        """
        self._last_contact = time.monotonic()
        kind = response.WhichOneof("message")
        service = self.config.service
        if kind == "snapshot":
            revision = response.snapshot.revision
            try:
                new = _codec.snapshot_from_proto(service, response.snapshot, utcnow())
            except InvalidChangeError as exc:
                await self._reject(call, "snapshot", revision, str(exc))
            older = self._has_state and revision < self.snapshot.revision
            if older:
                # The server sends one only when etcd itself went back (restored
                # from an older backup): its state is the truth, older or not.
                log.warning(
                    "agent_snapshot_older service=%s revision=%d applied=%d (applied: the "
                    "control plane's store went back)",
                    service,
                    revision,
                    self.snapshot.revision,
                )
            self._resync = False
            return await self._applied(call, new, replace_newer=older)
        if kind == "change":
            revision = response.change.revision
            try:
                new = _codec.apply_change(self.snapshot, response.change, utcnow())
            except StaleRevisionError:
                log.debug(
                    "agent_change_stale service=%s revision=%d applied=%d",
                    service,
                    revision,
                    self.snapshot.revision,
                )
                return None
            except InvalidChangeError as exc:
                await self._reject(call, "change", revision, str(exc))
            return await self._applied(call, new)
        if kind == "resume":
            sent = self._hello_revision
            if sent == 0 or response.resume.revision != sent:
                log.warning(
                    "agent_resume_mismatch service=%s resume=%d hello=%d applied=%d",
                    service,
                    response.resume.revision,
                    sent,
                    self.snapshot.revision,
                )
                self._resync = True
                raise Rejected(
                    f"a resume from revision {response.resume.revision}, not from {sent}"
                )
        # An unknown kind is from a newer server: ignored, so that old agents keep working.
        return None


def _stopping() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
