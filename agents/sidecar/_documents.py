"""The JSON documents the sidecar serves, writes and gives its hooks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agents._state import StateChange
from agents._types import FlagValue, PinnedVersion, SheddingLevel


def format_time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def shedding_doc(level: SheddingLevel | None) -> dict[str, Any] | None:
    if level is None:
        return None
    return {"tier": level.tier.name, "percent": level.percent}


def pin_doc(pin: PinnedVersion | None) -> dict[str, Any] | None:
    if pin is None:
        return None
    return {
        "version": pin.version,
        "reason": pin.reason,
        "since": format_time(pin.since),
        "expires_at": format_time(pin.expires_at),
    }


def flag_type(value: FlagValue) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, float | int):
        return "number"
    if isinstance(value, str):
        return "string"
    return "object"


def change_document(
    service: str, change: StateChange, state: str, *, expired: bool = False
) -> dict[str, Any]:
    """The JSON an ``--on-change`` hook gets on stdin for ``change``."""
    doc: dict[str, Any] = {
        "service": service,
        "revision": change.revision,
        "state": state,
        "expired": expired,
        "flags": {name: {"old": old, "new": new} for name, (old, new) in change.flags.items()},
        "shedding": None,
        "pin": None,
    }
    if change.shedding is not None:
        old_level, new_level = change.shedding
        doc["shedding"] = {"old": shedding_doc(old_level), "new": shedding_doc(new_level)}
    if change.pin is not None:
        old_pin, new_pin = change.pin
        doc["pin"] = {"old": pin_doc(old_pin), "new": pin_doc(new_pin)}
    return doc


JSON = "application/json"


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer: status, JSON body and extra headers; or, with ``text``, that
    body as it is, of ``content_type``."""

    status: int
    body: dict[str, Any]
    headers: tuple[tuple[str, str], ...] = ()
    text: bytes | None = None
    content_type: str = JSON

    def encode(self) -> bytes:
        """The body: ``text``, or ``body`` as UTF-8 JSON with a final newline."""
        if self.text is not None:
            return self.text
        return (json.dumps(self.body, ensure_ascii=False) + "\n").encode()
