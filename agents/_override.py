"""Break-glass overrides: a file on the host that the agent applies above the server's state.

When the control plane itself is down (or cannot be reached from the host), an
engineer on the host writes an override file; the agent applies it at once
(within a second where the file cannot be watched), whatever the server says,
until it expires or the file is removed.

Where: ``override_path`` (argument), else ``CONTROLPLANE_OVERRIDE_PATH``, else
next to the cache file, ``<cache file>.override.json``; no override file without
any of these (``agents._config``). The file grants power (it changes what the service
serves and the version it is pinned to), so it is refused unless it and its directory
are owned by the agent's user or root and writable by no one else, and a symbolic link
there is refused (``controlplane._files``).

The file is one JSON object (UTF-8, at most 64 KiB)::

    {
      "reason": "control plane down, errors on /pay",
      "actor": "sre@host-7",
      "expires_at": "2026-11-26T18:00:00Z",
      "flags": {"new-ui": false, "checkout.mode": "read-only"},
      "shedding": {"tier": "SHEDDABLE_PLUS", "percent": 50},
      "pin": "v1.4.2"
    }

==============  ========  =====================================================
field           required  what
==============  ========  =====================================================
``reason``      yes       Why: 1-1024 characters, no control characters.
``actor``       no        Who wrote it (up to 256 characters); as written,
                          nobody checks it.
``expires_at``  yes       When it stops applying: an RFC 3339 time with its
                          zone (``Z`` or ``+hh:mm``), in the future and at most
                          7 days ahead. An override must expire.
``flags``       (*)       Flag name (``[a-z0-9][a-z0-9._-]{0,127}``) to value:
                          a bool, a finite number, a string or a JSON object.
``shedding``    (*)       ``{"tier": T, "percent": P}``: ``T`` one of
                          ``CRITICAL_PLUS``, ``CRITICAL``, ``SHEDDABLE_PLUS``,
                          ``SHEDDABLE`` (the default; any case, ``-`` for
                          ``_``), ``P`` from 0 to 100.
``pin``         (*)       A version label (``[A-Za-z0-9][A-Za-z0-9._+-]{0,127}``).
==============  ========  =====================================================

(*) At least one of ``flags``, ``shedding`` and ``pin``. Any other field, a
key given twice, or a value that breaks these rules (the server's own) rejects
the whole file: the agent logs an error naming the problem and keeps what was
in force before (the previous override, or none). Nothing is ever half-applied.

Precedence: the override's values replace the server's for what it names, and
only that; the server's state keeps updating underneath and applies again when
the override goes (at ``expires_at``, or when the file is removed). The agent
reports the override to the server when connected (status and audit history).

Write the file atomically (a temporary file in the same directory, then
``mv``): the agent checks the file's identity, size and modification time
whenever its directory tells of a change to it (``agents._filewatch``: inotify
on Linux; elsewhere, or where the directory cannot be watched, every second)
and reads it when they change, so a write caught half-way is rejected (and
logged) until the next change completes it.

This module is pure apart from :class:`OverrideFile`, which stats and reads the
file; it imports only the agent's value types (``agents._types``), protobuf
and the standard library.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from agents._types import Criticality, FlagValue, Override, SheddingLevel
from controlplane._files import UnsafeFileError, read_guarded
from controlplane.api.v1 import agent_pb2

log = logging.getLogger("agents")

MAX_AHEAD = timedelta(days=7)
"""The latest an override may expire, from the moment it is read."""
MAX_FILE_BYTES = 64 * 1024
"""The largest override file the agent reads."""

_MAX_REASON = 1024
_MAX_ACTOR = 256
_MAX_JSON_DEPTH = 32
_FIELDS = ("reason", "actor", "expires_at", "flags", "shedding", "pin")
_SHEDDING_FIELDS = ("tier", "percent")
# The server's rules (controlplane.model), repeated: the agent imports nothing of the server.
_FLAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_TIERS = {member.name: member for member in Criticality}


class OverrideError(ValueError):
    """An override file the agent rejects; ``str(error)`` names the problem."""


class OverrideExpiredError(OverrideError):
    """An override file whose ``expires_at`` has passed (left behind after an incident)."""


# ---------------------------------------------------------------- parsing


def parse_override(
    data: bytes | str, now: datetime, *, max_ahead: timedelta = MAX_AHEAD
) -> Override:
    """The override an override file holds, checked at ``now``.

    Raises:
        OverrideExpiredError: ``expires_at`` is not after ``now``.
        OverrideError: Anything else wrong with the content (the message
            names the field and the rule); never another exception.
    """
    try:
        return _parse(data, now, max_ahead)
    except OverrideError:
        raise
    except Exception as exc:  # whatever else a hand-written file can cause
        raise OverrideError(f"unusable ({type(exc).__name__}: {exc})") from None


def _parse(data: bytes | str, now: datetime, max_ahead: timedelta) -> Override:
    if len(data) > MAX_FILE_BYTES:
        raise OverrideError(f"the file is {len(data)} bytes, over {MAX_FILE_BYTES}")
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise OverrideError(f"not UTF-8: {exc}") from None
    if not data.strip():
        raise OverrideError("the file is empty")
    try:
        doc = json.loads(data, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise OverrideError(f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise OverrideError("not a JSON object ({...})")
    unknown = sorted(set(doc) - set(_FIELDS))
    if unknown:
        raise OverrideError(
            f"unknown field {', '.join(map(repr, unknown))} (the fields are {', '.join(_FIELDS)})"
        )

    reason = _text(doc, "reason", _MAX_REASON, required=True)
    actor = _text(doc, "actor", _MAX_ACTOR, required=False)
    expires_at = _expires_at(doc.get("expires_at"), now, max_ahead)
    flags = _flags(doc.get("flags"))
    shedding = _shedding(doc.get("shedding"))
    pin = _pin(doc.get("pin"))
    if not flags and shedding is None and pin is None:
        raise OverrideError("nothing to override: give at least one of flags, shedding and pin")

    content: dict[str, Any] = {}
    if flags:
        content["flags"] = {name: _plain(v) for name, v in flags.items()}
    if shedding is not None:
        content["shedding"] = {"tier": shedding.tier.name, "percent": _plain(shedding.percent)}
    if pin is not None:
        content["pin"] = pin
    content_json = json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return Override(
        reason=reason,
        actor=actor,
        expires_at=expires_at,
        flags=flags,
        shedding=shedding,
        pin=pin,
        content_json=content_json,
        digest=hashlib.sha256(content_json.encode()).hexdigest(),
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, v in pairs:
        if key in result:
            raise OverrideError(f"key {_show(key)} appears twice in one object")
        result[key] = v
    return result


def _show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def _text(doc: Mapping[str, Any], field: str, limit: int, *, required: bool) -> str:
    raw = doc.get(field)
    if raw is None:
        if required:
            raise OverrideError(f"{field}: missing (an override must say why)")
        return ""
    if not isinstance(raw, str):
        raise OverrideError(f"{field}: must be a string, not {_kind(raw)}")
    value = raw.strip()
    if required and not value:
        raise OverrideError(f"{field}: is empty")
    if len(value) > limit:
        raise OverrideError(f"{field}: is {len(value)} characters, over {limit}")
    if any(ord(c) < 32 and c != "\t" for c in value):
        raise OverrideError(f"{field}: must not contain control characters")
    return value


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a bool"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _expires_at(raw: object, now: datetime, max_ahead: timedelta) -> datetime:
    if raw is None:
        raise OverrideError(
            'expires_at: missing (an override must expire; e.g. "2026-11-26T18:00:00Z")'
        )
    if not isinstance(raw, str):
        raise OverrideError(f"expires_at: must be an RFC 3339 time string, not {_kind(raw)}")
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise OverrideError(
            f'expires_at: {_show(raw)} is not an RFC 3339 time (e.g. "2026-11-26T18:00:00Z")'
        ) from None
    if value.tzinfo is None or value.utcoffset() is None:
        raise OverrideError(f"expires_at: {_show(raw)} has no time zone (add Z or +hh:mm)")
    if value <= now:
        raise OverrideExpiredError(f"expires_at: {raw.strip()} has passed (expired)")
    if value - now > max_ahead:
        raise OverrideError(
            f"expires_at: {raw.strip()} is more than {_duration(max_ahead)} ahead "
            "(a break-glass override is for an incident)"
        )
    return value


def _duration(value: timedelta) -> str:
    if value.days and not value.seconds:
        return f"{value.days} days"
    return str(value)


def _flags(raw: object) -> dict[str, FlagValue]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise OverrideError(f"flags: must be an object of flag name to value, not {_kind(raw)}")
    flags: dict[str, FlagValue] = {}
    for name, v in raw.items():
        if not _FLAG_RE.fullmatch(name):
            raise OverrideError(
                f"flags: {_show(name)} is not a flag name: 1-128 characters a-z, 0-9, '.', '_' "
                "and '-', starting with a letter or digit"
            )
        flags[name] = _flag_value(v, f"flags[{name!r}]")
    return flags


def _flag_value(v: object, label: str) -> FlagValue:
    if isinstance(v, bool | str):
        return v
    if isinstance(v, int | float):
        if not math.isfinite(v):
            raise OverrideError(f"{label}: a number value must be finite")
        return float(v)
    if isinstance(v, dict):
        _check_json(v, label, 1)
        return v
    raise OverrideError(
        f"{label}: {_kind(v)} is not a flag value (a bool, a number, a string or a JSON object)"
    )


def _check_json(value: object, label: str, depth: int) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise OverrideError(f"{label}: JSON is nested deeper than {_MAX_JSON_DEPTH}")
    if isinstance(value, dict):
        for v in value.values():
            _check_json(v, label, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, label, depth + 1)
    elif isinstance(value, float) and not math.isfinite(value):
        raise OverrideError(f"{label}: JSON numbers must be finite")


def _shedding(raw: object) -> SheddingLevel | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise OverrideError(
            f'shedding: must be an object like {{"tier": "SHEDDABLE", "percent": 30}}, '
            f"not {_kind(raw)}"
        )
    unknown = sorted(set(raw) - set(_SHEDDING_FIELDS))
    if unknown:
        raise OverrideError(
            f"shedding: unknown field {', '.join(map(repr, unknown))} (the fields are tier, "
            "percent)"
        )
    tier_raw = raw.get("tier", Criticality.SHEDDABLE.name)
    tier = None
    if isinstance(tier_raw, str):
        tier = _TIERS.get(tier_raw.strip().upper().replace("-", "_"))
    if tier is None:
        shown = _show(tier_raw) if isinstance(tier_raw, str) else _kind(tier_raw)
        raise OverrideError(f"shedding.tier: {shown} is not a tier (one of {', '.join(_TIERS)})")
    if "percent" not in raw:
        raise OverrideError("shedding.percent: missing (0 to 100)")
    percent = raw["percent"]
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        raise OverrideError(f"shedding.percent: must be a number, not {_kind(percent)}")
    if not math.isfinite(percent) or not 0 <= percent <= 100:
        raise OverrideError(f"shedding.percent: {percent!r} is out of range: must be 0 to 100")
    return SheddingLevel(tier, float(percent))


def _pin(raw: object) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str):
        raise OverrideError(f"pin: must be a version string, not {_kind(raw)}")
    if not _VERSION_RE.fullmatch(raw):
        raise OverrideError(
            f"pin: {_show(raw)} is not a version: 1-128 characters A-Z, a-z, 0-9, '.', '_', "
            "'+' and '-', starting with a letter or digit"
        )
    return raw


def _plain(v: Any) -> Any:
    """A number as the canonical content writes it: 50.0 as 50 (so that 50 and 50.0
    have one digest)."""
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return v


# ---------------------------------------------------------------- reporting


def override_to_proto(override: Override) -> agent_pb2.Override:
    """The override as the agent reports it in force (``Hello.override``, ``SyncRequest``)."""
    msg = agent_pb2.Override(
        active=True,
        reason=override.reason,
        actor=override.actor,
        content_json=override.content_json,
        digest=override.digest,
    )
    msg.expires_at.FromDatetime(override.expires_at)
    return msg


def cleared_to_proto(override: Override, why: str) -> agent_pb2.Override:
    """The report that ``override`` no longer applies (``why``: expired, file removed)."""
    msg = override_to_proto(override)
    msg.active = False
    msg.reason = f"{why} (it was: {override.reason})"[:_MAX_REASON]
    return msg


# ---------------------------------------------------------------- the file


@dataclass(frozen=True, slots=True)
class OverrideRead:
    """What the override file holds after a change.

    Attributes:
        override: The file's override; None when the file is gone (or the
            content was rejected: see ``error``).
        error: Why the content was rejected; None when it was not. The agent
            keeps what was in force.
    """

    override: Override | None
    error: OverrideError | None = None


class OverrideFile:
    """One override file, checked by its stat: read and parsed only when its
    identity (device, inode), size or modification time changed.

    Args:
        path: The file's path (it need not exist).
        insecure_permissions: Read it even when someone else can change it (or it is a
            symlink), the refusal logged as a warning each time.
    """

    def __init__(self, path: Path, *, insecure_permissions: bool = False) -> None:
        self.path = path
        self.insecure_permissions = insecure_permissions
        self._seen: tuple[int, ...] | None = None

    def check(self, now: datetime) -> OverrideRead | None:
        """What the file holds if it changed since the last check, else None.

        A file that was there and is gone is ``OverrideRead(None)``; a file that
        cannot be read or parsed is ``OverrideRead(None, error)``, once per
        change. Never raises.
        """
        try:
            # The link itself, not where it points: a symlink is refused below. Owner and
            # mode count: a file refused for them is read again once they are fixed.
            # (With insecure permissions allowed, a symlink is followed: its target counts.)
            st = os.stat(self.path) if self.insecure_permissions else os.lstat(self.path)
            parent = os.stat(self.path.parent)
        except FileNotFoundError:
            if self._seen is None:
                return None
            self._seen = None
            return OverrideRead(None)
        except OSError as exc:
            seen: tuple[int, ...] = (-1, exc.errno or 0)
            if self._seen == seen:
                return None
            self._seen = seen
            return OverrideRead(None, OverrideError(f"cannot stat the file: {exc}"))
        seen = (
            st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_mode, st.st_uid,
            parent.st_mode, parent.st_uid,
        )  # fmt: skip
        if seen == self._seen:
            return None
        # Recorded before the read: a change during the read is seen at the next check.
        self._seen = seen
        try:
            data, warning = read_guarded(
                self.path,
                "the override file",
                follow_symlinks=self.insecure_permissions,
                max_bytes=MAX_FILE_BYTES + 1,
                strict=not self.insecure_permissions,
            )
            if warning is not None:
                log.warning(
                    "agent_override_insecure path=%s: %s; read all the same (%s=1)",
                    self.path,
                    warning,
                    "CONTROLPLANE_OVERRIDE_INSECURE_PERMISSIONS",
                )
        except UnsafeFileError as exc:
            return OverrideRead(None, OverrideError(str(exc)))
        except FileNotFoundError:
            self._seen = None
            return OverrideRead(None)
        except OSError as exc:
            return OverrideRead(None, OverrideError(f"cannot read the file: {exc}"))
        try:
            return OverrideRead(parse_override(data, now))
        except OverrideError as exc:
            return OverrideRead(None, exc)

    def forget(self) -> None:
        """Read the file at the next check even if it did not change."""
        self._seen = None


__all__ = [
    "MAX_AHEAD",
    "Override",
    "OverrideError",
    "OverrideExpiredError",
    "OverrideFile",
    "OverrideRead",
    "cleared_to_proto",
    "override_to_proto",
    "parse_override",
]
