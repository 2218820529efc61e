"""The notifier: audited changes to Slack, PagerDuty and webhooks, nothing lost or doubled.

Lifecycle: ``await start()`` once (returns at once; the work runs in a task),
:meth:`reload` with a new configuration at any time (SIGHUP), ``await stop()``
(idempotent; gives the sender's place up).

- **One sender.** Every server process with ``--notify`` runs a notifier; the one
  that holds the leased ``leader`` key (:class:`~controlplane.store.NotifyState`)
  sends, the others wait for the place to free up (a stopped process gives it up at
  once, a killed one when its lease runs out, :data:`LEASE_TTL`). Every state write is
  fenced on that key, so a process that lost the place unknowingly writes nothing.
- **From the audit trail.** The audit record is written in its change's own
  transaction, so the sender follows the trail with an etcd watch from each
  destination's cursor (a revision kept in etcd): a server killed between a commit and
  the message loses nothing, the next sender starts where the cursor is.
- **Outbox.** A group of changes (:func:`~._events.next_group`) is written to the
  destination's state as *pending* (its id and revisions) before it is sent, and the
  cursor moves past it only once it is delivered: a sender that dies mid-send leaves
  the group to the next, which sends the same event with the same id
  (``X-Controlplane-Event-Id``), for receivers to drop a repeat.
- **Retries.** A failed send is retried with exponential backoff (1 s doubling to
  5 min, or the receiver's ``Retry-After``) until ``give_up_after`` (1 h) from the
  first attempt; then it is recorded as failed (``cpctl notifications failed``, a
  metric, an error log line) and the destination goes on. Destinations never wait
  for each other.
- Secrets (URLs, keys) never reach a log line or an error: a destination is its name.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from controlplane import model
from controlplane.errors import CompactedError, ControlPlaneError
from controlplane.metrics import ServerMetrics
from controlplane.model import GLOBAL_SCOPE
from controlplane.server._presence import Presence
from controlplane.server.hub import Hub
from controlplane.server.notify._config import Destination, NotifyConfig
from controlplane.server.notify._events import Change, Event, change_of, event_of, next_group
from controlplane.server.notify._render import request_of
from controlplane.store import Store, WatchEvent
from controlplane.store.keys import AUDIT

__all__ = ["Notifier"]

log = structlog.get_logger("controlplane.notify")

LEASE_TTL = 10
"""Seconds the sender's place outlives a killed sender."""
SEND_TIMEOUT = 10.0
"""Seconds one delivery attempt may take."""
MAX_BACKOFF = 300.0
IDLE_CURSOR_SECONDS = 30.0
"""A destination with nothing to send moves its cursor up at most this often."""
CLAIM_INTERVAL = 2.0
"""How often a waiting process looks whether the sender's place is free."""


@dataclass
class _Pending:
    id: str
    first: int
    last: int
    since: datetime
    attempts: int = 0

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "first": self.first,
            "last": self.last,
            "since": model.format_time(self.since),
            "attempts": self.attempts,
        }

    @classmethod
    def parse(cls, data: Any) -> _Pending | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(
                id=str(data["id"]),
                first=int(data["first"]),
                last=int(data["last"]),
                since=model.parse_time(str(data["since"])),
                attempts=int(data.get("attempts", 0)),
            )
        except (KeyError, ValueError, TypeError):
            return None


def _redact(text: str, destination: Destination) -> str:
    """``text`` without the destination's secrets: its URL (a Slack webhook's path is
    its secret), routing key and signing secret, as a receiver may echo them."""
    path = httpx.URL(destination.url).path if "://" in destination.url else ""
    for secret in (destination.url, path, destination.routing_key, destination.secret):
        if secret and len(secret) >= 6:
            text = text.replace(secret, f"<secret of {destination.name}>")
    return text


def _duration(delta: timedelta) -> str:
    seconds = delta.total_seconds()
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


_CHECKER = " applied"
"""The applied check's place among the cursors (no destination is named so)."""


class _LostPlace(Exception):
    """A fenced write failed: another process sends now."""


def _first(error: BaseException) -> BaseException:
    """The first error inside (nested) task-group errors."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


class Notifier:
    """Sends the events of the audit trail to the destinations of a notifications file."""

    def __init__(
        self,
        store: Store,
        config: NotifyConfig,
        server_id: str,
        metrics: ServerMetrics,
        presence: Presence | None = None,
        hub: Hub | None = None,
        stale_after: timedelta | None = None,
    ) -> None:
        self.store = store
        self.presence = presence
        self.hub = hub
        self.stale_after = stale_after
        self.config = config
        self.server_id = server_id
        self.metrics = metrics
        self.sending = False
        """Whether this process holds the sender's place."""
        self._task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None
        self._trail: list[Change] = []
        self._latest = 0
        self._cursors: dict[str, int] = {}
        self._appended = asyncio.Event()
        self._reloaded = asyncio.Event()
        self._progress = asyncio.Event()
        self.ready = asyncio.Event()
        """Set while sending, once every destination's cursor is in place."""

    def _moved(self) -> None:
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    async def changed(self) -> None:
        """Return at the next step of the notifier: the sender's place taken or lost, a
        message sent, retried or given up on (for tests and tools that wait on it)."""
        await self._progress.wait()

    async def start(self) -> None:
        if self._task is None:
            self._client = httpx.AsyncClient(timeout=SEND_TIMEOUT, follow_redirects=False)
            self._task = asyncio.create_task(self._run(), name="notifier")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def reload(self, config: NotifyConfig) -> None:
        """Send to the destinations of ``config`` from now on (one added, or back after
        it was removed, starts at the present: it gets no backlog)."""
        self.config = config
        self._reloaded.set()

    # -- the place ------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            fence: int | None = None
            try:
                lease = await self.store.grant_lease(LEASE_TTL)
                fence = await self.store.notify_state.claim(self.server_id, lease)
                if fence is None:
                    await asyncio.sleep(CLAIM_INTERVAL)
                    continue
                log.info("notify_sender", server_id=self.server_id)
                self.sending = True
                self.metrics.notify_sender.set(1)
                self._moved()
                await self._send_while_held(lease, fence)
            except asyncio.CancelledError:
                if fence is not None:
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(2.0):
                            await self.store.notify_state.release(fence)
                raise
            except Exception as exc:
                cause = _first(exc)
                if isinstance(cause, ControlPlaneError | _LostPlace):
                    log.warning("notify_paused", error=str(cause))
                else:
                    log.error("notify_failed", exc_info=cause)
                await asyncio.sleep(CLAIM_INTERVAL)
            finally:
                self.sending = False
                self.ready.clear()
                self.metrics.notify_sender.set(0)
                self._moved()

    async def _send_while_held(self, lease: int, fence: int) -> None:
        async def keep() -> None:
            while True:
                await asyncio.sleep(LEASE_TTL / 3)
                if await self.store.keep_lease_alive(lease) <= 0:
                    raise _LostPlace("the sender's lease ran out")

        async with asyncio.TaskGroup() as group:
            group.create_task(keep())
            group.create_task(self._send(fence))

    # -- following the trail ---------------------------------------------------------

    async def _send(self, fence: int) -> None:
        states = await self.store.notify_state.states()
        now_revision = await self.store.revision()
        cursors: dict[str, int] = {}
        for destination in self.config.destinations:
            state = states.get(destination.name)
            if state is None or not isinstance(state.get("cursor"), int):
                state = {"cursor": now_revision, "pending": None}
                if not await self.store.notify_state.save(fence, destination.name, state):
                    raise _LostPlace("another process sends notifications")
                states[destination.name] = state
            cursors[destination.name] = int(state["cursor"])
        start = min(cursors.values(), default=now_revision)
        self._trail, self._latest, self._cursors = [], start, dict(cursors)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._follow(start + 1))
            if self.presence is not None:
                group.create_task(self._check_applied(self.presence, start))
            if self.hub is not None and self.stale_after is not None:
                group.create_task(self._check_stale(self.hub, self.stale_after))
            workers: dict[str, asyncio.Task[None]] = {}
            while True:
                # Cleared before the file is read: a reload during what follows is seen.
                self._reloaded.clear()
                for name in [n for n, task in workers.items() if task.done()]:
                    del workers[name]  # it ended (its destination went): back if it returns
                    cursors.pop(name, None)
                for destination in self.config.destinations:
                    if destination.name not in workers:
                        state = states.get(destination.name) or {}
                        if destination.name not in cursors:
                            # Added by a reload (or back): from the present on.
                            state = {"cursor": self._latest, "pending": None}
                            await self._save(fence, destination.name, state)
                            cursors[destination.name] = self._latest
                        workers[destination.name] = group.create_task(
                            self._destination(fence, destination.name, state)
                        )
                wanted = {d.name for d in self.config.destinations}
                for name in list(workers):
                    if name not in wanted:
                        workers.pop(name).cancel()
                        cursors.pop(name, None)
                self.ready.set()
                self._moved()
                await self._reloaded.wait()
                states = await self.store.notify_state.states()

    async def _follow(self, start: int) -> None:
        """Append the audited changes from ``start`` on to the trail."""
        revision = start
        backfill_delay = 0.5
        while True:
            try:
                async for seen, events in self.store.watch(revision):
                    self._append(e for e in events if e.path.startswith(AUDIT))
                    self._latest = max(self._latest, seen)
                    revision = seen + 1
                    self._wake()
            except CompactedError as exc:
                # etcd keeps no history of those revisions, but keeps the audit records
                # written then (until the audit retention): they are read instead.
                upto = exc.compact_revision
                try:
                    events = await self.store.audit_between(revision - 1, upto)
                except ControlPlaneError as failed:
                    # Tried again (nothing of the gap appended yet), less often each time.
                    log.error(
                        "notify_backfill_failed",
                        revisions=f"{revision} to {upto}",
                        error=str(failed),
                        retry_in=backfill_delay,
                    )
                    await asyncio.sleep(backfill_delay)
                    backfill_delay = min(backfill_delay * 2, 30.0)
                    continue
                backfill_delay = 0.5
                self._append(events)
                log.warning(
                    "notify_history_compacted",
                    revisions=f"{revision} to {upto}",
                    read_from_audit=len(events),
                )
                self._latest = max(self._latest, upto)
                revision = upto + 1
                self._wake()
            except ControlPlaneError as exc:
                log.warning("notify_watch_broken", error=str(exc))
                await asyncio.sleep(0.5)

    def _append(self, events: Iterable[WatchEvent]) -> None:
        """Audit records, as the watch or the audit trail gives them, to the trail."""
        for event in events:
            entry = self.store.decode_audit(event)
            if entry is not None:
                self._trail.append(change_of(entry))

    def _wake(self) -> None:
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()
        # What every destination is past is not needed any more.
        floor = min(self._cursors.values(), default=self._latest)
        if self._trail and self._trail[0].revision <= floor:
            self._trail = [c for c in self._trail if c.revision > floor]

    # -- changes not applied everywhere in time --------------------------------------

    async def _check_applied(self, presence: Presence, checked: int) -> None:
        """``incomplete_after`` after each change, audit (once) the connected instances
        that have not applied it; the destinations then tell it like any record."""
        while True:
            self._cursors[_CHECKER] = checked  # the trail keeps what is not checked yet
            after = self.config.incomplete_after
            due = [
                c
                for c in self._trail
                if c.revision > checked
                and c.event_kind in ("change", "expiry")
                and c.record_kind in ("flag", "shedding", "pin")
            ]
            now = model.utcnow()
            for change in due:
                if change.time + after > now:
                    break
                await self._audit_unapplied(presence, change, after)
                checked = change.revision
            waiting = [c for c in due if c.revision > checked]
            timeout = IDLE_CURSOR_SECONDS
            if waiting:
                timeout = max((waiting[0].time + after - now).total_seconds(), 0.0) + 0.01
            else:
                checked = max(checked, self._latest)  # nothing to check up to here
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._appended.wait()

    async def _audit_unapplied(self, presence: Presence, change: Change, after: timedelta) -> None:
        if change.scope == GLOBAL_SCOPE:
            services = sorted(await presence.connected_counts())
        else:
            services = [change.scope]
        for service in services:
            instances = [i for i in await presence.instances(service) if i.connected]
            lagging = [i.instance_id for i in instances if i.applied < change.revision]
            if not lagging:
                continue
            shown = ", ".join(lagging[:10]) + (
                f" and {len(lagging) - 10} more" if len(lagging) > 10 else ""
            )
            what = change.line.removeprefix(f"{change.scope}: ")
            reason = (
                f"{what} (revision {change.revision}, by {change.actor}) not applied by "
                f"{len(lagging)} of {len(instances)} instance(s) {_duration(after)} after it "
                f"was written: {shown}"
            )
            written = await self.store.record_event(
                action="notify.incomplete",
                kind="incomplete",
                scope=service,
                name=f"revision {change.revision}",
                actor="controlplane:notify",
                reason=reason,
                mark=f"incomplete/{service}/{change.revision}",
                after={"revision": change.revision, "instances": lagging, "of": len(instances)},
                incident=change.incident,
            )
            if written:
                log.warning(
                    "change_incomplete",
                    service=service,
                    revision=change.revision,
                    lagging=len(lagging),
                    instances=len(instances),
                )

    # -- mitigations left in force ---------------------------------------------------

    async def _check_stale(self, hub: Hub, stale_after: timedelta) -> None:
        """Audit (so tell) each mitigation in force without expiry for ``stale_after``,
        once per multiple of it (4 h, 8 h, ...): a kill switch left on for three days is
        said three times a day, not found by accident."""
        every = min(max(stale_after.total_seconds() / 4, 0.05), 60.0)
        while True:
            now = model.utcnow().timestamp()
            for kind, scope, name, set_at in hub.unexpiring():
                age = now - set_at
                if age < stale_after.total_seconds():
                    continue
                times = int(age // stale_after.total_seconds())
                what = f"{kind} {name}".strip() if kind == "flag" else kind
                clear = {
                    "flag": f"cpctl flag clear {scope} {name}",
                    "shedding": f"cpctl shed clear {scope}",
                    "pin": f"cpctl pin clear {scope}",
                }.get(kind, "")
                reason = (
                    f"{what} in force for {_duration(timedelta(seconds=age))} with no expiry "
                    f"(stale after {_duration(stale_after)}): clear it once its incident is "
                    f"over ({clear} --reason ...)"
                )
                await self.store.record_event(
                    action="notify.stale",
                    kind="stale",
                    scope=scope,
                    name=name or kind,
                    actor="controlplane:notify",
                    reason=reason,
                    mark=f"stale/{kind}/{scope}/{name or '-'}/{int(set_at)}/{times}",
                    after={"kind": kind, "set_at": set_at, "age_seconds": round(age)},
                )
            await asyncio.sleep(every)

    # -- one destination -------------------------------------------------------------

    async def _destination(self, fence: int, name: str, state: Mapping[str, Any]) -> None:
        cursor = int(state.get("cursor", self._latest))
        self._cursors[name] = cursor
        pending = _Pending.parse(state.get("pending"))
        saved_at = asyncio.get_running_loop().time()
        try:
            while True:
                destination = self.config.destination(name)
                if destination is None:
                    return
                waiting = [
                    c
                    for c in self._trail
                    if c.revision > cursor and destination.wants(c.event_kind, [c.scope])
                ]
                self.metrics.notifications_pending.labels(name).set(len(waiting))
                if pending is not None:
                    if self._latest < pending.last:
                        # The watch has not caught up with the whole group yet.
                        await self._appended.wait()
                        continue
                    group = [c for c in waiting if pending.first <= c.revision <= pending.last]
                    await self._deliver(fence, destination, group, pending, cursor)
                    cursor, pending = pending.last, None
                    self._cursors[name] = cursor
                    saved_at = asyncio.get_running_loop().time()
                    continue
                now = model.utcnow()
                group, complete = next_group(waiting, self.config.group_window, now)
                if group and complete:
                    event = event_of(name, group)
                    pending = _Pending(event.id, group[0].revision, group[-1].revision, now)
                    await self._save(fence, name, {"cursor": cursor, "pending": pending.record()})
                    continue
                idle = asyncio.get_running_loop().time() - saved_at
                if not group and self._latest > cursor and idle > IDLE_CURSOR_SECONDS:
                    cursor = self._latest
                    self._cursors[name] = cursor
                    await self._save(fence, name, {"cursor": cursor, "pending": None})
                    saved_at = asyncio.get_running_loop().time()
                timeout = IDLE_CURSOR_SECONDS
                if group:
                    closes = group[0].time + self.config.group_window - now
                    timeout = max(closes.total_seconds(), 0.0) + 0.01
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._appended.wait()
        finally:
            self.metrics.notifications_pending.labels(name).set(0)
            self._cursors.pop(name, None)

    async def _applied(self, event: Event, group: Sequence[Change]) -> str:
        """``applied by 3/3 instances`` for a change of one service, when known."""
        services = [s for s in event.services if s != GLOBAL_SCOPE]
        if self.presence is None or event.kind not in ("change", "expiry") or len(services) != 1:
            return ""
        try:
            instances = [i for i in await self.presence.instances(services[0]) if i.connected]
        except ControlPlaneError:
            return ""
        if not instances:
            return ""
        done = sum(1 for i in instances if i.applied >= group[-1].revision)
        return f"applied by {done}/{len(instances)} instances"

    async def _save(self, fence: int, name: str, state: dict[str, Any]) -> None:
        if not await self.store.notify_state.save(fence, name, state):
            raise _LostPlace("another process sends notifications")

    async def _deliver(
        self,
        fence: int,
        destination: Destination,
        group: Sequence[Change],
        pending: _Pending,
        cursor: int,
    ) -> None:
        """Send the pending group until delivered or given up on, then move past it."""
        name = destination.name
        if not group:
            # Its changes are filtered out now (the file changed) or no longer in etcd's
            # history: nothing left to say.
            log.warning("notification_dropped", destination=name, event_id=pending.id)
            await self._save(fence, name, {"cursor": pending.last, "pending": None})
            return
        event = dataclasses.replace(event_of(name, group), id=pending.id)
        event = dataclasses.replace(event, applied=await self._applied(event, group))
        backoff = 1.0
        error = ""
        while True:
            destination = self.config.destination(name) or destination
            pending.attempts += 1
            error_text, retry_after = await self._attempt(destination, event)
            if error_text is None:
                self.metrics.notifications_sent.labels(name, event.kind).inc()
                log.info(
                    "notification_sent",
                    destination=name,
                    event_id=event.id,
                    kind=event.kind,
                    title=event.title,
                    attempts=pending.attempts,
                )
                await self._save(fence, name, {"cursor": pending.last, "pending": None})
                self._moved()
                return
            error = error_text
            self.metrics.notification_errors.labels(name).inc()
            self._moved()
            now = model.utcnow()
            if now - pending.since >= self.config.give_up_after:
                break
            jitter = random.uniform(0.5, 1.0)  # noqa: S311 (jitter)
            # A receiver's Retry-After wins, but not below a second (Retry-After: 0 from a
            # busy receiver must not turn the retries into a busy loop).
            delay = max(retry_after, 1.0) if retry_after is not None else backoff * jitter
            delay = min(delay, (pending.since + self.config.give_up_after - now).total_seconds())
            log.warning(
                "notification_retry",
                destination=name,
                event_id=event.id,
                error=error,
                attempts=pending.attempts,
                retry_in_s=round(max(delay, 0.0), 3),
            )
            backoff = min(backoff * 2, MAX_BACKOFF)
            await asyncio.sleep(max(delay, 0.0))
        failure = {
            "id": pending.id,
            "destination": name,
            "kind": event.kind,
            "title": event.title,
            "lines": list(event.lines),
            "first_attempt": model.format_time(pending.since),
            "given_up_at": model.format_time(model.utcnow()),
            "attempts": pending.attempts,
            "error": error,
        }
        self.metrics.notifications_failed.labels(name).inc()
        log.error("notification_failed", **failure)
        state = {"cursor": pending.last, "pending": None}
        if not await self.store.notify_state.give_up(fence, name, state, failure, model.utcnow()):
            raise _LostPlace("another process sends notifications")
        self._moved()

    async def _attempt(
        self, destination: Destination, event: Event
    ) -> tuple[str | None, float | None]:
        """One delivery: (None, None) when delivered, else what went wrong (never the
        URL or a key) and the receiver's Retry-After in seconds, if it gave one."""
        assert self._client is not None
        body, headers = request_of(destination, event, self.config.link)
        try:
            response = await self._client.post(destination.url, content=body, headers=headers)
        except Exception as exc:  # httpx's errors, and an URL it refuses (InvalidURL)
            text = _redact(str(exc), destination)
            return f"{type(exc).__name__}: {text or 'no answer'}"[:300], None
        if 200 <= response.status_code < 300:
            return None, None
        retry_after = None
        given = response.headers.get("retry-after", "")
        if given.isdigit():
            retry_after = float(given)
        text = _redact(response.text[:200], destination)
        return f"HTTP {response.status_code}: {text}".strip(), retry_after
