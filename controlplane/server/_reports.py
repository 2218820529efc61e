"""What agents report of their host's break-glass override: bounded, checked, rate-limited.

An agent is trusted no more than the service it runs in. Its report of an override
becomes an audit record, so the server bounds it before anything is written: the
override file's content is at most :data:`MAX_REPORT_BYTES` (a file people write by
hand: larger content is recorded as its size and digest), its reason and actor are cut
to the operators' limits with control and bidirectional characters written out as
``\\u`` escapes (``\\u001b``), the digest that makes "audited once" is computed here from what is
audited (the one the agent sends is not trusted), and each instance may have a
report audited at most :data:`REPORT_BURST` times at once, then one every
:data:`REPORT_EVERY` seconds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controlplane import model
from controlplane.api.v1 import agent_pb2

__all__ = [
    "MAX_REPORT_BYTES",
    "REPORT_BURST",
    "REPORT_EVERY",
    "OverrideReport",
    "ReportLimiter",
    "read_report",
]

MAX_REPORT_BYTES = 8 * 1024
"""The most override-file content (JSON) an audit record keeps; the agent reads files of
at most 64 KiB, and one people write by hand is a few hundred bytes."""
_SHOWN_WHEN_TOO_LARGE = 512
"""Characters of a too-large content kept in its audit record, to tell what it was."""
REPORT_BURST = 10
"""Reports of one instance audited at once (an engineer editing the file a few times)."""
REPORT_EVERY = 6.0
"""Seconds after which an instance may have one more report audited."""
_TRACKED_INSTANCES = 20_000
"""Instances whose report budget is remembered (the oldest are forgotten first)."""


@dataclass(frozen=True, slots=True)
class OverrideReport:
    """A report as it is audited."""

    active: bool
    content: dict[str, Any] | None
    reason: str
    actor: str
    expires_at: datetime | None
    digest: str


def read_report(msg: agent_pb2.Override) -> OverrideReport:
    """The bounded, cleaned report of an agent's Override message, with its digest."""
    content: dict[str, Any] | None = None
    raw = msg.content_json
    size = len(raw.encode(errors="replace"))
    if size > MAX_REPORT_BYTES:
        content = {
            "too_large": True,
            "bytes": size,
            "sha256": hashlib.sha256(raw.encode(errors="replace")).hexdigest(),
            "start": model.clean_text(raw, _SHOWN_WHEN_TOO_LARGE),
        }
    elif raw:
        try:
            parsed = json.loads(raw)
            content = parsed if isinstance(parsed, dict) else {"content": parsed}
            # Lone surrogates, and numbers JSON cannot hold (1e400 parses as infinity):
            # a record with them could not be read back.
            json.dumps(content, ensure_ascii=False, allow_nan=False).encode()
        except (ValueError, RecursionError):
            content = {"content": model.clean_text(raw, MAX_REPORT_BYTES)}
    expires = None
    if msg.HasField("expires_at"):
        with contextlib.suppress(ValueError):
            expires = model.timestamp_to_datetime(msg.expires_at)
    reason = model.clean_text(msg.reason, model.MAX_REASON_CHARS)
    actor = model.clean_text(msg.actor, model.MAX_ACTOR_CHARS)
    audited = {
        "active": msg.active,
        "content": content,
        "reason": reason,
        "actor": actor,
        "expires_at": model.format_time(expires) if expires is not None else None,
    }
    canonical = json.dumps(audited, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    digest = hashlib.sha256(canonical.encode()).hexdigest()
    return OverrideReport(msg.active, content, reason, actor, expires, digest)


class ReportLimiter:
    """How many reports each instance may still have audited (a token bucket each)."""

    def __init__(
        self,
        burst: int = REPORT_BURST,
        every: float = REPORT_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.every = every
        self._clock = clock
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def allow(self, service: str, instance_id: str) -> bool:
        """Take one report from the instance's budget; False when it has none left."""
        key = (service, instance_id)
        now = self._clock()
        tokens, since = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) / self.every)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._buckets[key] = (tokens, now)
        if len(self._buckets) > _TRACKED_INSTANCES:
            self._buckets.popitem(last=False)
        return allowed
