"""Output of ``cpctl``: protobuf responses to plain data, JSON documents, and the parts of
human text every command uses (times, values, tables, the line of a write).

The CLI converts every response to plain Python here (``to_plain``) right after the call;
everything past that point (JSON output, one-line confirmations, tables) works on plain
dicts and never on protobuf messages. Each command's own renderer lives with the command,
in its noun's module.

Plain form of a message: a dict with one key per proto field, named as in the proto
(snake_case), in field order. Times are aware UTC ``datetime`` objects (ISO 8601 strings
with ``Z`` in JSON), durations ``timedelta`` (seconds in JSON), 64-bit integers Python
ints, enums their names, an unset message field ``None``. Two rules keep the output
useful to scripts: a ``FlagValue`` becomes the plain value it holds (``true``, ``50``,
``"read-only"``, ``{...}``), and a string field named ``<x>_json`` (JSON text) becomes
``<x>`` holding the parsed JSON (``None`` when empty).

This module imports no protobuf or gRPC code at import time, so ``cpctl --help`` stays fast.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NamedTuple

from controlplane._text import escaped

if TYPE_CHECKING:
    from google.protobuf.message import Message


def terminal_safe(text: str) -> str:
    """``text`` as cpctl prints it in its human form: names, versions and reasons come
    from the store, and agents write some of them, so the characters a terminal would
    act on are written out as ``\\u`` escapes (``\\u001b``) (newlines and tabs are cpctl's own)."""
    return escaped(text, keep="\n")


_FLAG_VALUE = "controlplane.api.v1.FlagValue"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_JSON_TEXT_SUFFIX = "_json"
# Doubles that are whole numbers up to this size print as integers ("50", not "50.0").
_MAX_EXACT_INT = 2**53
# Durations shorter than this show their seconds (4m30s); longer ones whole minutes.
_SECONDS_SHOWN_UNDER = 10 * 60

# The JSON objects cpctl prints, for `cpctl --help`; a unit test checks them against the
# proto so the help cannot drift from the output.
JSON_SHAPES: dict[str, tuple[str, ...]] = {
    "WriteResult": (
        "changed",
        "dry_run",
        "revision",
        "mod_revision",
        "overridden_by",
        "audit_id",
        "summary",
        "would_change",
        "unknown_services",
        "in_force_since",
    ),
    "UnknownService": ("service", "did_you_mean", "memory"),
    "Meta": (
        "actor",
        "actor_authenticated",
        "reason",
        "incident",
        "set_at",
        "expires_at",
        "mod_revision",
        "bundle_id",
    ),
    "Flag": ("scope", "name", "value", "meta", "replaced"),
    "Shedding": ("service", "tier", "percent", "meta", "replaced"),
    "Pin": ("service", "version", "meta", "previous", "replaced"),
    "PinHistory": ("version", "actor", "reason", "set_at"),
    "KnownGood": ("service", "version", "meta"),
    "AuditEntry": (
        "id",
        "revision",
        "time",
        "actor",
        "actor_authenticated",
        "action",
        "kind",
        "scope",
        "name",
        "reason",
        "incident",
        "before",
        "after",
        "bundle_id",
        "expires_at",
    ),
    "ServiceApplied": ("service", "applied_at", "instances"),
    "TimelineEntry": ("change", "applied"),
    "Instance": (
        "service",
        "instance_id",
        "running_version",
        "applied_revision",
        "connected",
        "last_seen",
        "lag",
        "server_id",
        "override_active",
    ),
    "Bundle": (
        "id",
        "name",
        "changes",
        "meta",
        "state",
        "revision",
        "reverted",
        "keys",
        "overridden_keys",
    ),
    "BundleChange": (
        "set_flag",
        "clear_flag",
        "set_shedding",
        "clear_shedding",
        "pin_version",
        "unpin_version",
    ),
    # Not proto messages: what a write with --wait adds under "wait" (null on a dry run,
    # or when no service was named to wait for).
    "Wait": ("outcome", "revision", "seconds", "services"),
    "WaitService": (
        "service",
        "outcome",
        "revision",
        "seconds",
        "all_applied",
        "connected",
        "applied",
        "pending",
        "nacks",
        "applied_at",
        "sync_clients",
        "unknown",
    ),
}

# The shapes above that are not proto messages (cpctl builds them).
CLI_SHAPES = ("Wait", "WaitService")


# ---- protobuf -> plain ----


def to_plain(message: Message) -> dict[str, Any]:
    """Convert a response message to its plain form (see the module docstring)."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        name = field.name
        value = getattr(message, name)
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[name] = {k: _plain_single(value_field, value[k]) for k in sorted(value)}
        elif field.is_repeated:
            out[name] = [_plain_single(field, item) for item in value]
        elif field.has_presence and not message.HasField(name):
            out[name] = None
        elif field.type == field.TYPE_STRING and name.endswith(_JSON_TEXT_SUFFIX):
            out[name.removesuffix(_JSON_TEXT_SUFFIX)] = _parse_json_text(value)
        else:
            out[name] = _plain_single(field, value)
    return out


def plain_flag_value(message: Message) -> Any:
    """The plain value a ``FlagValue`` holds: bool, int/float, str, dict, or None if unset."""
    kind = message.WhichOneof("kind")
    if kind is None:
        return None
    value = getattr(message, kind)
    if kind == "number_value":
        number = float(value)
        if number.is_integer() and abs(number) <= _MAX_EXACT_INT:
            return int(number)
        return number
    if kind == "json_value":
        return _parse_json_text(value)
    return value


def _plain_single(field: Any, value: Any) -> Any:
    if field.type == field.TYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name == _FLAG_VALUE:
            return plain_flag_value(value)
        if full_name == _TIMESTAMP:
            return value.ToDatetime(tzinfo=UTC)
        if full_name == _DURATION:
            return value.ToTimedelta()
        return to_plain(value)
    if field.type == field.TYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else value
    if field.type == field.TYPE_BYTES:
        return base64.b64encode(value).decode("ascii")
    return value


def _parse_json_text(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


# ---- JSON ----


def dumps(document: Mapping[str, Any]) -> str:
    """One JSON document, indented, UTF-8 kept as is; times as ISO 8601 UTC strings."""
    return json.dumps(document, indent=2, ensure_ascii=False, default=_json_default)


def dumps_line(document: Mapping[str, Any]) -> str:
    """One JSON document on one line (JSON Lines), otherwise as ``dumps``."""
    return json.dumps(document, ensure_ascii=False, default=_json_default)


def _json_default(value: object) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot encode {type(value).__name__} as JSON")


# ---- small formatters ----


def iso(moment: datetime, *, seconds: bool = False) -> str:
    """``2026-11-26T18:00:00.250000Z`` (fraction only when non-zero); ``seconds`` drops it."""
    moment = moment.astimezone(UTC)
    if seconds:
        moment = moment.replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def format_age(delta: timedelta) -> str:
    """A short duration, rounded to the nearest unit it shows: ``45s``, ``4m30s`` (seconds
    up to 10 minutes), ``29m``, ``2h5m``, ``3d4h``.

    Rounded, not truncated: an expiry 30 minutes away, read a moment after it was written
    (29m59.8s), is ``30m``, not ``29m``.
    """
    seconds = int(abs(delta.total_seconds()) + 0.5)
    if seconds < _SECONDS_SHOWN_UNDER:
        minutes, secs = divmod(seconds, 60)
        if not minutes:
            return f"{secs}s"
        return f"{minutes}m{secs}s" if secs else f"{minutes}m"
    minutes = (seconds + 30) // 60
    if minutes < 24 * 60:
        hours, minutes = divmod(minutes, 60)
        if not hours:
            return f"{minutes}m"
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod((seconds + 1800) // 3600, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def format_time(moment: datetime | None, now: datetime) -> str:
    """``2026-11-26T18:00:00Z (in 30m)`` or ``... (12m ago)`` (``format_age``); ``-`` when
    unset."""
    if moment is None:
        return "-"
    delta = moment - now
    relative = f"in {format_age(delta)}" if delta >= timedelta(0) else f"{format_age(delta)} ago"
    return f"{iso(moment, seconds=True)} ({relative})"


def format_value(value: Any) -> str:
    """A flag value as JSON text: ``false``, ``50``, ``"read-only"``, ``{"a": 1}``."""
    if value is None:
        return "unset"
    return json.dumps(value, ensure_ascii=False, default=_json_default)


def format_percent(percent: Any) -> str:
    return f"{float(percent):g}%"


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """Left-aligned columns separated by two spaces; newlines in cells are escaped."""
    cells = [list(headers), *([one_line(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def one_line(text: str) -> str:
    """``text`` on one line: newlines and carriage returns escaped, tabs as spaces."""
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")


# ---- human output: the parts every command's renderer uses ----


class Rendered(NamedTuple):
    """Human output: lines for stdout, warnings for stderr."""

    lines: Sequence[str]
    warnings: Sequence[str] = ()


Renderer = Callable[[Mapping[str, Any], datetime], Rendered]


def meta_of(record: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """The ``meta`` of a record, ``{}`` when it has none."""
    if not record:
        return {}
    meta = record.get("meta")
    return meta if meta else {}


def write_line(
    result: Mapping[str, Any],
    *,
    done: str,
    would: str,
    same: str,
    expiry: str = "",
) -> str:
    """The one-line confirmation of a write: done, unchanged, or dry run.

    A dry run reports what the server says it would do (``would_change``).
    """
    if result.get("dry_run"):
        if not result.get("would_change"):
            return f"dry run: unchanged (nothing would change) · {same}"
        return f"dry run: would {would}{expiry} · nothing written"
    if not result.get("changed"):
        return f"{same} · unchanged"
    return f"{done} · rev {result.get('revision', 0)}{expiry}"


def expiry_note(
    record: Mapping[str, Any] | None,
    now: datetime,
    describe: Callable[[Mapping[str, Any] | None], str],
) -> str:
    """`` · expires ..., then <what it replaced>`` for a time-boxed record, else empty."""
    expires_at = meta_of(record).get("expires_at")
    if record is None or expires_at is None:
        return ""
    return f" · expires {format_time(expires_at, now)}, then {describe(record.get('replaced'))}"


def overridden_warning(result: Mapping[str, Any], what: str) -> list[str]:
    """The warning that services with their own ``what`` do not see a global change."""
    services = list(result.get("overridden_by") or [])
    if not services:
        return []
    return [
        f"warning: {len(services)} service(s) keep their own {what} and do not see this "
        f"global change: {', '.join(services)}"
    ]


def record_details(
    record: Mapping[str, Any],
    now: datetime,
    describe_replaced: Callable[[Mapping[str, Any] | None], str],
) -> list[str]:
    """Indented who/why/when lines under a record."""
    meta = meta_of(record)
    actor = str(meta.get("actor") or "?")
    if not meta.get("actor_authenticated"):
        actor += " (unauthenticated)"
    lines = [f"  set by    {actor}, {format_time(meta.get('set_at'), now)}"]
    if meta.get("reason"):
        lines.append(f"  reason    {meta['reason']}")
    if meta.get("incident"):
        lines.append(f"  incident  {meta['incident']}")
    lines.append(f"  revision  {meta.get('mod_revision', 0)}")
    if meta.get("expires_at") is not None:
        replaced = describe_replaced(record.get("replaced"))
        lines.append(f"  expires   {format_time(meta['expires_at'], now)}, then {replaced}")
    if meta.get("bundle_id"):
        lines.append(f"  bundle    {meta['bundle_id']}")
    return [one_line(line) for line in lines]


def expires_cell(record: Mapping[str, Any], now: datetime) -> str:
    """The EXPIRES cell of a table: when the record expires, ``-`` when it does not."""
    expires_at = meta_of(record).get("expires_at")
    return format_time(expires_at, now) if expires_at is not None else "-"


def meta_cells(record: Mapping[str, Any]) -> list[str]:
    """The REV, ACTOR, INCIDENT and REASON cells of a table."""
    meta = meta_of(record)
    return [
        str(meta.get("mod_revision", 0)),
        str(meta.get("actor") or ""),
        str(meta.get("incident") or ""),
        str(meta.get("reason") or ""),
    ]


class Cleared(NamedTuple):
    """What a clear's answer says, for its renderer."""

    result: Mapping[str, Any]
    removed: Mapping[str, Any] | None
    """The layer removed (the top one), with the chain beneath it as stored."""
    restored: Mapping[str, Any] | None
    """The layer beneath that applies now, if one came back."""
    beneath: list[Mapping[str, Any]]
    """The layers beneath ``removed`` that had not expired: removed with it (--all-layers)
    when nothing was restored."""


def cleared(doc: Mapping[str, Any], now: datetime) -> Cleared:
    """A clear's answer (``removed``, ``restored``) taken apart for its renderer."""
    removed, restored = doc.get("removed"), doc.get("restored")
    beneath: list[Mapping[str, Any]] = []
    below = removed.get("replaced") if removed else None
    while below:
        expires_at = meta_of(below).get("expires_at")
        if expires_at is None or expires_at > now:
            beneath.append(below)
        below = below.get("replaced")
    return Cleared(doc.get("result") or {}, removed, restored, beneath if not restored else [])


def time_boxed(record: Mapping[str, Any] | None) -> str:
    """``time-boxed `` for a record with an expiry, else empty."""
    return "time-boxed " if meta_of(record).get("expires_at") is not None else ""


def every_layer(
    beneath: Sequence[Mapping[str, Any]], describe: Callable[[Mapping[str, Any] | None], str]
) -> str:
    """``, and every layer beneath it: a, b`` when --all-layers removed layers beneath."""
    if not beneath:
        return ""
    return f", and every layer beneath it: {', '.join(describe(b) for b in beneath)}"


def beneath_lines(
    clear: Cleared,
    now: datetime,
    describe: Callable[[Mapping[str, Any] | None], str],
    *,
    layer: str,
    command: str,
) -> list[str]:
    """The lines under a clear that removed a time-boxed layer and left the one beneath in
    force: that one applies now (and until when), and ``command`` with --all-layers
    removes every layer.

    ``layer`` names a layer as people say it ("pin", "value", "level").
    """
    restored = clear.restored
    if not restored:
        return []
    applies = "would apply" if clear.result.get("dry_run") else "applies now"
    expires_at = meta_of(restored).get("expires_at")
    until = (
        f", until {format_time(expires_at, now)}, then {describe(restored.get('replaced'))}"
        if expires_at is not None
        else " (no expiry)"
    )
    return [
        f"  the {layer} beneath it, {describe(restored)}, {applies}{until}",
        f'  to remove every layer: {command} --all-layers --reason "..."',
    ]
