"""Output of ``cpctl``: protobuf responses to plain data, JSON documents and human text.

The CLI converts every response to plain Python here (``to_plain``) right after the call;
everything past that point (JSON output, one-line confirmations, tables) works on plain
dicts and never on protobuf messages.

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

if TYPE_CHECKING:
    from google.protobuf.message import Message

_FLAG_VALUE = "controlplane.api.v1.FlagValue"
_TIMESTAMP = "google.protobuf.Timestamp"
_DURATION = "google.protobuf.Duration"
_JSON_TEXT_SUFFIX = "_json"
# Doubles that are whole numbers up to this size print as integers ("50", not "50.0").
_MAX_EXACT_INT = 2**53

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
    ),
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
    # Not proto messages: what a write with --wait adds under "wait" (null when nothing
    # was written, so there was nothing to wait for).
    "Wait": ("outcome", "revision", "seconds", "services"),
    "WaitService": (
        "service",
        "outcome",
        "seconds",
        "all_applied",
        "connected",
        "applied",
        "pending",
        "nacks",
        "applied_at",
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
    """A short rounded duration: ``45s``, ``12m``, ``2h5m``, ``3d4h``."""
    seconds = int(abs(delta.total_seconds()))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h" if hours else f"{days}d"
    if hours:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def format_time(moment: datetime | None, now: datetime) -> str:
    """``2026-11-26T18:00:00Z (in 29m)`` or ``... (12m ago)``; ``-`` when unset."""
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
    cells = [list(headers), *([_cell(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]


def _cell(text: str) -> str:
    return text.replace("\r", "\\r").replace("\n", "\\n").replace("\t", " ")


# ---- human output of each command ----


class Rendered(NamedTuple):
    """Human output: lines for stdout, warnings for stderr."""

    lines: Sequence[str]
    warnings: Sequence[str] = ()


Renderer = Callable[[Mapping[str, Any], datetime], Rendered]


def _meta(record: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not record:
        return {}
    meta = record.get("meta")
    return meta if meta else {}


def _write_line(
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


def _expiry(
    record: Mapping[str, Any] | None,
    now: datetime,
    describe: Callable[[Mapping[str, Any] | None], str],
) -> str:
    expires_at = _meta(record).get("expires_at")
    if record is None or expires_at is None:
        return ""
    return f" · expires {format_time(expires_at, now)}, then {describe(record.get('replaced'))}"


def _overridden_warning(result: Mapping[str, Any], what: str) -> list[str]:
    services = list(result.get("overridden_by") or [])
    if not services:
        return []
    return [
        f"warning: {len(services)} service(s) keep their own {what} and do not see this "
        f"global change: {', '.join(services)}"
    ]


def _details(
    record: Mapping[str, Any],
    now: datetime,
    describe_replaced: Callable[[Mapping[str, Any] | None], str],
) -> list[str]:
    """Indented who/why/when lines under a record."""
    meta = _meta(record)
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
    return [_cell(line) for line in lines]


def _expires_cell(record: Mapping[str, Any], now: datetime) -> str:
    expires_at = _meta(record).get("expires_at")
    return format_time(expires_at, now) if expires_at is not None else "-"


def _meta_cells(record: Mapping[str, Any]) -> list[str]:
    meta = _meta(record)
    return [
        str(meta.get("mod_revision", 0)),
        str(meta.get("actor") or ""),
        str(meta.get("incident") or ""),
        str(meta.get("reason") or ""),
    ]


# flags


def _flag_value(record: Mapping[str, Any] | None) -> str:
    return format_value(record.get("value")) if record else "unset"


def render_flag_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    flag, result = doc.get("flag") or {}, doc.get("result") or {}
    scope, name, value = flag.get("scope", "?"), flag.get("name", "?"), _flag_value(flag)
    was = _flag_value(doc.get("previous"))
    line = _write_line(
        result,
        done=f"{scope}: flag {name} = {value} (was {was})",
        would=f"set {scope}: flag {name} = {value} (was {was})",
        same=f"{scope}: flag {name} = {value}",
        expiry=_expiry(flag, now, _flag_value),
    )
    return Rendered([line], _overridden_warning(result, f"flag {name}"))


def _cleared(
    doc: Mapping[str, Any],
    now: datetime,
    describe: Callable[[Mapping[str, Any] | None], str],
    prefix: str = "",
) -> tuple[Mapping[str, Any], Mapping[str, Any] | None, str]:
    """A clear's result, what it removed, and "; X applies again" when a layer came back."""
    result, removed, restored = doc.get("result") or {}, doc.get("removed"), doc.get("restored")
    after = ""
    if restored:
        after = f"; {prefix}{describe(restored)} applies again" + _expiry(restored, now, describe)
    return result, removed, after


def render_flag_clear(doc: Mapping[str, Any], now: datetime, scope: str, name: str) -> Rendered:
    result, removed, after = _cleared(doc, now, _flag_value)
    if not after and scope != "global":
        after = "; the global value applies, if any"
    was = _flag_value(removed)
    line = _write_line(
        result,
        done=f"{scope}: flag {name} cleared (was {was}){after}",
        would=f"clear {scope}: flag {name} (was {was}){after}",
        same=f"{scope}: flag {name} not set",
    )
    return Rendered([line], _overridden_warning(result, f"flag {name}"))


def render_flag_get(doc: Mapping[str, Any], now: datetime, scope: str, name: str) -> Rendered:
    flag = doc.get("flag")
    if not flag:
        return Rendered([f"{scope}: flag {name} not set"])
    head = f"{scope}: flag {flag.get('name', name)} = {_flag_value(flag)}"
    if flag.get("scope") and flag["scope"] != scope:
        head += f" (from {flag['scope']}: {scope} has no value of its own)"
    lines = [head, *_details(flag, now, _flag_value)]
    overridden = list(doc.get("overridden_by") or [])
    if overridden:
        lines.append(f"  overridden by {len(overridden)} service(s): {', '.join(overridden)}")
    return Rendered(lines)


def render_flag_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    flags = doc.get("flags") or []
    if not flags:
        return Rendered(["no flags set"])
    rows = [
        [
            f.get("scope", ""),
            f.get("name", ""),
            _flag_value(f),
            _expires_cell(f, now),
            *_meta_cells(f),
        ]
        for f in flags
    ]
    headers = ["SCOPE", "NAME", "VALUE", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


# shedding


def _shedding(record: Mapping[str, Any] | None) -> str:
    if not record:
        return "off"
    return f"{record.get('tier', '?')} {format_percent(record.get('percent', 0))}"


def _shedding_meaning(record: Mapping[str, Any]) -> str:
    tier, percent = str(record.get("tier", "?")), format_percent(record.get("percent", 0))
    order = ["CRITICAL_PLUS", "CRITICAL", "SHEDDABLE_PLUS", "SHEDDABLE"]
    below = order[order.index(tier) + 1 :] if tier in order else []
    all_of = f"all of {', '.join(below)} and " if below else ""
    return f"sheds {all_of}{percent} of {tier}"


def render_shed_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    shedding, result = doc.get("shedding") or {}, doc.get("result") or {}
    service, level = shedding.get("service", "?"), _shedding(shedding)
    was = _shedding(doc.get("previous"))
    line = _write_line(
        result,
        done=f"{service}: shedding {level} (was {was})",
        would=f"set {service}: shedding {level} (was {was})",
        same=f"{service}: shedding {level}",
        expiry=_expiry(shedding, now, _shedding),
    )
    return Rendered([line])


def render_shed_clear(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    result, removed, after = _cleared(doc, now, _shedding)
    line = _write_line(
        result,
        done=f"{service}: shedding off (was {_shedding(removed)}){after}",
        would=f"clear {service}: shedding (was {_shedding(removed)}){after}",
        same=f"{service}: shedding off",
    )
    return Rendered([line])


def render_shed_get(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    shedding = doc.get("shedding")
    if not shedding:
        return Rendered([f"{service}: no shedding"])
    head = f"{service}: shedding {_shedding(shedding)} ({_shedding_meaning(shedding)})"
    return Rendered([head, *_details(shedding, now, _shedding)])


def render_shed_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    items = doc.get("shedding") or []
    if not items:
        return Rendered(["no shedding"])
    rows = [
        [
            s.get("service", ""),
            str(s.get("tier", "")),
            format_percent(s.get("percent", 0)),
            _expires_cell(s, now),
            *_meta_cells(s),
        ]
        for s in items
    ]
    headers = ["SERVICE", "TIER", "PERCENT", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


# pins, known-good versions, rollback


def _pin(record: Mapping[str, Any] | None) -> str:
    return str(record.get("version", "?")) if record else "unpinned"


def render_pin_set(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pin, result = doc.get("pin") or {}, doc.get("result") or {}
    service, version = pin.get("service", "?"), _pin(pin)
    history = pin.get("previous") or {}
    was = _pin(doc.get("previous")) if doc.get("previous") else history.get("version") or "unpinned"
    line = _write_line(
        result,
        done=f"{service}: pinned to {version} (was {was})",
        would=f"pin {service} to {version} (was {was})",
        same=f"{service}: pinned to {version}",
        expiry=_expiry(pin, now, _pin),
    )
    return Rendered([line])


def render_pin_clear(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    result, removed, after = _cleared(doc, now, _pin, prefix="pin ")
    line = _write_line(
        result,
        done=f"{service}: unpinned (was {_pin(removed)}){after}",
        would=f"unpin {service} (was {_pin(removed)}){after}",
        same=f"{service}: not pinned",
    )
    return Rendered([line])


def render_pin_get(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    pin = doc.get("pin")
    if not pin:
        return Rendered([f"{service}: not pinned"])
    head = f"{service}: pinned to {_pin(pin)}"
    previous = pin.get("previous")
    if previous:
        head += f" (was {previous.get('version', '?')})"
    return Rendered([head, *_details(pin, now, _pin)])


def render_pin_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pins = doc.get("pins") or []
    if not pins:
        return Rendered(["no pins"])
    rows = [
        [
            p.get("service", ""),
            _pin(p),
            str((p.get("previous") or {}).get("version") or "-"),
            _expires_cell(p, now),
            *_meta_cells(p),
        ]
        for p in pins
    ]
    headers = ["SERVICE", "VERSION", "PREVIOUS", "EXPIRES", "REV", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


def render_known_good_mark(doc: Mapping[str, Any], now: datetime) -> Rendered:
    record, result = doc.get("known_good") or {}, doc.get("result") or {}
    service, version = record.get("service", "?"), record.get("version", "?")
    line = _write_line(
        result,
        done=f"{service}: {version} marked known-good",
        would=f"mark {service}: {version} known-good",
        same=f"{service}: {version} already known-good",
    )
    return Rendered([line])


def render_known_good_unmark(
    doc: Mapping[str, Any], now: datetime, service: str, version: str
) -> Rendered:
    result = doc.get("result") or {}
    line = _write_line(
        result,
        done=f"{service}: {version} no longer known-good",
        would=f"unmark {service}: {version} as known-good",
        same=f"{service}: {version} not marked known-good",
    )
    return Rendered([line])


def render_known_good_list(doc: Mapping[str, Any], now: datetime, service: str) -> Rendered:
    items = doc.get("known_good") or []
    if not items:
        return Rendered([f"{service}: no known-good versions"])
    rows = [
        [
            k.get("version", ""),
            format_time(_meta(k).get("set_at"), now),
            str(_meta(k).get("actor") or ""),
            str(_meta(k).get("reason") or ""),
        ]
        for k in items
    ]
    return Rendered(table(["VERSION", "MARKED", "ACTOR", "REASON"], rows))


def render_rollback(doc: Mapping[str, Any], now: datetime) -> Rendered:
    pin, result = doc.get("pin") or {}, doc.get("result") or {}
    service, version = pin.get("service", "?"), _pin(pin)
    source = doc.get("from_version") or "?"
    line = _write_line(
        result,
        done=f"{service}: rolled back {source} -> {version} (pinned)",
        would=f"roll back {service}: {source} -> {version}",
        same=f"{service}: pinned to {version}",
        expiry=_expiry(pin, now, _pin),
    )
    return Rendered([line])


# history


def render_history(doc: Mapping[str, Any], now: datetime) -> Rendered:
    entries = doc.get("entries") or []
    if not entries:
        return Rendered(["no changes found"])
    rows = [
        [
            iso(e["time"], seconds=True) if e.get("time") else "-",
            str(e.get("revision", "")),
            str(e.get("action", "")),
            str(e.get("scope", "")),
            str(e.get("name", "")),
            str(e.get("actor", "")),
            str(e.get("incident", "")),
            str(e.get("reason", "")),
        ]
        for e in entries
    ]
    headers = ["TIME", "REV", "ACTION", "SCOPE", "NAME", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


# status


def _set_by(record: Mapping[str, Any], now: datetime) -> str:
    meta = _meta(record)
    text = f"  by {meta.get('actor') or '?'}"
    if meta.get("set_at") is not None:
        text += f", {format_time(meta['set_at'], now)}"
    if meta.get("reason"):
        text += f": {meta['reason']}"
    if meta.get("incident"):
        text += f" [{meta['incident']}]"
    if meta.get("bundle_id"):
        text += f" (bundle {meta['bundle_id']})"
    return _cell(text)


def _instance_notes(instance: Mapping[str, Any], pinned: str | None, now: datetime) -> str:
    notes = []
    running = str(instance.get("running_version") or "")
    if pinned is not None and running and running != pinned:
        notes.append(f"DRIFT: pinned {pinned}")
    if not instance.get("connected"):
        last_seen = instance.get("last_seen")
        seen = f", last seen {format_age(now - last_seen)} ago" if last_seen is not None else ""
        notes.append(f"stale (disconnected{seen})")
    lag = int(instance.get("lag", 0))
    if lag < 0:
        notes.append("lag unknown")
    elif lag > 0:
        notes.append(f"behind by {lag} change(s)")
    if instance.get("override_active"):
        notes.append("local override active")
    return "; ".join(notes)


NO_INSTANCES = (
    "no connected instances: nothing applies these mitigations right now "
    "(is the service name right? are its agents running?)"
)


def render_status(doc: Mapping[str, Any], now: datetime) -> Rendered:
    """``cpctl status``: what is in force for a service and which instances applied it."""
    service = str(doc.get("service", "?"))
    instances = list(doc.get("instances") or [])
    connected = sum(1 for i in instances if i.get("connected"))
    lines = [
        f"{service} · revision {doc.get('revision', 0)} · "
        f"{connected} of {len(instances)} instance(s) connected",
        "",
    ]
    flags = list(doc.get("flags") or [])
    if flags:
        lines.append("flags in effect (the service's own value wins over the global one):")
        rows = [
            [
                str(f.get("name", "")),
                _flag_value(f),
                f"{f.get('scope', '')} (own)" if f.get("scope") == service else "global",
                _expires_cell(f, now),
                str(_meta(f).get("actor") or ""),
                str(_meta(f).get("incident") or ""),
                str(_meta(f).get("reason") or ""),
            ]
            for f in flags
        ]
        headers = ["NAME", "VALUE", "FROM", "EXPIRES", "ACTOR", "INCIDENT", "REASON"]
        lines += ["  " + line for line in table(headers, rows)]
    else:
        lines.append("flags: none")
    shedding = doc.get("shedding")
    if shedding:
        lines.append(
            f"shedding: {_shedding(shedding)} ({_shedding_meaning(shedding)})"
            + _expiry(shedding, now, _shedding)
        )
        lines.append(_set_by(shedding, now))
    else:
        lines.append("shedding: off")
    pin = doc.get("pin")
    pinned = str(pin.get("version", "")) if pin else None
    if pin:
        lines.append(f"pin: {pinned}" + _expiry(pin, now, _pin))
        lines.append(_set_by(pin, now))
    else:
        lines.append("pin: none")
    lines.append("")
    if instances:
        rows = [
            [
                str(i.get("instance_id", "")),
                str(i.get("server_id", "")),
                "yes" if i.get("connected") else "no",
                str(i.get("applied_revision") or "-"),
                "?" if int(i.get("lag", 0)) < 0 else str(i.get("lag", 0)),
                str(i.get("running_version") or "?"),
                _instance_notes(i, pinned, now),
            ]
            for i in instances
        ]
        headers = ["INSTANCE", "SERVER", "CONNECTED", "APPLIED", "LAG", "VERSION", "NOTES"]
        lines += table(headers, rows)
    drift = dict(doc.get("drift") or {})
    for version in sorted(drift):
        lines.append(f"drift: {drift[version]} instance(s) run {version}, not the pinned {pinned}")
    if connected == 0:
        lines.append(NO_INSTANCES)
    return Rendered(lines)


# watch


_ABSENT = {"flag": "unset", "shedding": "off", "pin": "unpinned", "known_good": "not marked"}


def describe_record(kind: str, record: Any) -> str:
    """A record of an audit entry (``before`` / ``after``) in a few words."""
    if record is None:
        return _ABSENT.get(kind, "none")
    if not isinstance(record, Mapping):
        return str(record)
    if kind == "flag" or "value" in record:
        return format_value(record.get("value"))
    if kind == "shedding" or "percent" in record:
        return f"{record.get('tier', 'SHEDDABLE')} {format_percent(record.get('percent', 0))}"
    if kind == "known_good":
        return "known-good"
    if kind == "pin" or "version" in record:
        return str(record.get("version", "?"))
    return "set"


def render_change(entry: Mapping[str, Any]) -> str:
    """One line per change for ``cpctl watch``: time, revision, what, before -> after, who, why."""
    kind = str(entry.get("kind", ""))
    when = iso(entry["time"], seconds=True) if entry.get("time") else "-"
    target = str(entry.get("scope", ""))
    if entry.get("name"):
        target += f"/{entry['name']}"
    change = f"{describe_record(kind, entry.get('before'))} -> "
    change += describe_record(kind, entry.get("after"))
    if entry.get("expires_at") is not None:
        change += f" until {iso(entry['expires_at'], seconds=True)}"
    parts = [
        when,
        f"rev {entry.get('revision', 0)}",
        str(entry.get("action", "")),
        target,
        change,
        f"by {entry.get('actor') or '?'}",
    ]
    if entry.get("reason"):
        parts.append(json.dumps(str(entry["reason"]), ensure_ascii=False))
    if entry.get("incident"):
        parts.append(str(entry["incident"]))
    if entry.get("bundle_id"):
        parts.append(f"bundle {entry['bundle_id']}")
    return _cell("  ".join(parts))


def render_timeline_md(doc: Mapping[str, Any]) -> list[str]:
    """The post-mortem timeline of an incident as Markdown: one table row per change."""
    incident = str(doc.get("incident", ""))
    entries = list(doc.get("entries") or [])
    lines = [f"# Timeline of {incident}", ""]
    if not entries:
        return [*lines, f"No change was made for {incident}."]
    first = entries[0]["change"].get("time")
    last = entries[-1]["change"].get("time")
    if first and last:
        lines += [f"{len(entries)} changes from {iso(first)} to {iso(last)} (UTC).", ""]
    lines += [
        "| time (UTC) | rev | who | action | what | change | why | applied by all instances |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in entries:
        change = entry["change"]
        kind = str(change.get("kind", ""))
        when = change.get("time")
        target = str(change.get("scope", ""))
        if change.get("name"):
            target += f"/{change['name']}"
        what = f"{describe_record(kind, change.get('before'))} → "
        what += describe_record(kind, change.get("after"))
        if change.get("expires_at") is not None:
            what += f" until {iso(change['expires_at'], seconds=True)}"
        applied = []
        for item in entry.get("applied") or []:
            at = item.get("applied_at")
            delay = f" (+{(at - when).total_seconds():.2f} s)" if at and when else ""
            applied.append(
                f"{item.get('service')}: {item.get('instances', 0)} at "
                f"{iso(at, seconds=True) if at else '?'}{delay}"
            )
        who = str(change.get("actor") or "?")
        if change.get("bundle_id"):
            who += f" (bundle {change['bundle_id']})"
        row = [
            iso(when, seconds=True) if when else "-",
            str(change.get("revision", "")),
            who,
            str(change.get("action", "")),
            target,
            what,
            str(change.get("reason", "")),
            "; ".join(applied) or "-",
        ]
        lines.append("| " + " | ".join(_md_cell(cell) for cell in row) + " |")
    return lines


def _md_cell(text: str) -> str:
    return _cell(text).replace("|", "\\|")


# --wait

WAIT_OUTCOMES = ("applied", "no_instances", "timed_out", "rejected")
"""Outcomes of a wait, least to most serious; a wait over several services takes the worst."""


def wait_outcome(result: Mapping[str, Any]) -> str:
    """What a ``WaitAppliedResponse`` (plain) means for one service."""
    if result.get("nacks"):
        return "rejected"
    if int(result.get("connected", 0)) == 0:
        return "no_instances"
    if result.get("all_applied"):
        return "applied"
    return "timed_out"


def worst_outcome(outcomes: Iterable[str]) -> str:
    """The most serious of several outcomes (``applied`` when there are none)."""
    return max(outcomes, key=WAIT_OUTCOMES.index, default="applied")


_MAX_LISTED = 10


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    if len(items) > _MAX_LISTED:
        shown += f" and {len(items) - _MAX_LISTED} more"
    return shown


def describe_wait(result: Mapping[str, Any]) -> str:
    """One line about one service of a wait (a ``WaitService`` document)."""
    service = result.get("service", "?")
    applied, connected = result.get("applied", 0), result.get("connected", 0)
    seconds = float(result.get("seconds", 0.0))
    outcome = result.get("outcome") or wait_outcome(result)
    if outcome == "applied":
        return f"{service}: applied by {applied}/{connected} instances in {seconds:.2f} s"
    if outcome == "no_instances":
        return (
            f"{service}: no connected instance to apply it (is the service name right? "
            f"`cpctl status {service}` shows its instances)"
        )
    if outcome == "rejected":
        nacks = dict(result.get("nacks") or {})
        reasons = [f"{instance} ({nacks[instance]})" for instance in sorted(nacks)]
        return (
            f"{service}: rejected by {len(nacks)} of {connected} instance(s): "
            f"{_listed(reasons)}; applied by {applied}/{connected}"
        )
    pending = [
        f"{p.get('instance_id', '?')} (at rev {p.get('applied_revision', 0)})"
        for p in result.get("pending") or []
    ]
    text = f"{service}: applied by only {applied}/{connected} instances within {seconds:.1f} s"
    if pending:
        text += f"; pending: {_listed(pending)}"
    else:
        text += "; another server has not confirmed its instances yet"
    return text


class WaitReport(NamedTuple):
    """Human output of a wait: lines for the services that applied it, and the problems."""

    lines: Sequence[str]
    problems: Sequence[str]


def render_wait(report: Mapping[str, Any]) -> WaitReport:
    lines, problems = [], []
    for result in report.get("services") or []:
        text = _cell(describe_wait(result))
        if result.get("outcome") == "applied":
            lines.append(text)
        else:
            problems.append(text)
    return WaitReport(lines, problems)


# bundles

_STATES = {
    "APPLIED": "applied",
    "REVERTED": "reverted",
    "EXPIRED": "expired",
    "PARTIALLY_OVERRIDDEN": "partially overridden",
}


def format_change(change: Mapping[str, Any]) -> str:
    """One change of a bundle (a ``BundleChange`` document): ``checkout: flag new-ui = false``."""
    if change.get("set_flag"):
        c = change["set_flag"]
        return f"{c.get('scope', '?')}: flag {c.get('name', '?')} = {format_value(c.get('value'))}"
    if change.get("clear_flag"):
        c = change["clear_flag"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('scope', '?')}: clear flag {c.get('name', '?')}{layers}"
    if change.get("set_shedding"):
        c = change["set_shedding"]
        tier = c.get("tier")
        tier = "SHEDDABLE" if tier in (None, "TIER_UNSPECIFIED") else tier
        return f"{c.get('service', '?')}: shedding {tier} {format_percent(c.get('percent', 0))}"
    if change.get("clear_shedding"):
        c = change["clear_shedding"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('service', '?')}: shedding off{layers}"
    if change.get("pin_version"):
        c = change["pin_version"]
        return f"{c.get('service', '?')}: pin {c.get('version', '?')}"
    if change.get("unpin_version"):
        c = change["unpin_version"]
        layers = " (all layers)" if c.get("all_layers") else ""
        return f"{c.get('service', '?')}: unpin{layers}"
    return "(an empty change)"


def bundle_state(bundle: Mapping[str, Any]) -> str:
    """``applied``, ``reverted``, ``expired``, ``partially overridden (changed since: ...)``."""
    state = str(bundle.get("state", ""))
    text = _STATES.get(state, state.lower() or "unknown")
    overridden = list(bundle.get("overridden_keys") or [])
    if state == "PARTIALLY_OVERRIDDEN" and overridden:
        text += f" (changed since by others: {', '.join(overridden)})"
    return text


def _bundle_expiry(bundle: Mapping[str, Any], now: datetime) -> str:
    expires_at = _meta(bundle).get("expires_at")
    if expires_at is None:
        return ""
    return f" · expires {format_time(expires_at, now)}"


def _summary_items(summary: str, head: str) -> list[str]:
    """The per-change parts of a bundle's summary (``<head>a; b; c``)."""
    if not summary.startswith(head):
        return [summary] if summary else []
    return [part for part in summary[len(head) :].split("; ") if part]


def render_bundle_apply(doc: Mapping[str, Any], now: datetime) -> Rendered:
    result, bundle = doc.get("result") or {}, doc.get("bundle") or {}
    summary = str(result.get("summary") or "")
    name = str(bundle.get("name") or "")
    if result.get("dry_run") and not result.get("would_change"):
        return Rendered([f"dry run: unchanged (nothing would change) · {summary}"])
    if result.get("dry_run"):
        expiry = _bundle_expiry(bundle, now)
        lines = [f"dry run: would apply bundle {name}{expiry} · nothing written"]
        lines += ["  " + item for item in _summary_items(summary, f"bundle {name}: ")]
        return Rendered([_cell(line) for line in lines])
    if not result.get("changed"):
        return Rendered([_cell(f"{summary} · unchanged")])
    bundle_id = bundle.get("id", "?")
    lines = [
        f"bundle {name} applied as {bundle_id} · rev {result.get('revision', 0)}"
        + _bundle_expiry(bundle, now)
    ]
    lines += ["  " + item for item in _summary_items(summary, f"bundle {name}: ")]
    lines.append(f'revert with: cpctl bundle revert {bundle_id} --reason "..."')
    return Rendered([_cell(line) for line in lines])


def render_bundle_revert(doc: Mapping[str, Any], now: datetime) -> Rendered:
    result, bundle = doc.get("result") or {}, doc.get("bundle") or {}
    summary = str(result.get("summary") or "")
    name, bundle_id = str(bundle.get("name") or ""), bundle.get("id", "?")
    items = ["  " + item for item in _summary_items(summary, f"bundle {name} reverted: ")]
    overwritten = list(doc.get("overwritten_keys") or [])
    if result.get("dry_run"):
        if not result.get("would_change"):
            return Rendered([_cell(f"dry run: unchanged (nothing would change) · {summary}")])
        head = f"dry run: would revert bundle {bundle_id} ({name}) · nothing written"
        warnings = []
        if overwritten:
            keys = ", ".join(overwritten)
            warnings.append(f"warning: would overwrite changes made since: {keys}")
        return Rendered([_cell(line) for line in [head, *items]], warnings)
    if not result.get("changed"):
        return Rendered([_cell(f"{summary} · unchanged")])
    head = f"bundle {bundle_id} ({name}) reverted · rev {result.get('revision', 0)}"
    warnings = []
    if overwritten:
        warnings.append(
            f"warning: --force overwrote changes made after the bundle: {', '.join(overwritten)}"
        )
    return Rendered([_cell(line) for line in [head, *items]], warnings)


def render_bundle_list(doc: Mapping[str, Any], now: datetime) -> Rendered:
    bundles = doc.get("bundles") or []
    if not bundles:
        return Rendered(["no bundles"])
    rows = [
        [
            str(b.get("id", "")),
            _STATES.get(str(b.get("state", "")), str(b.get("state", "")).lower()),
            str(len(b.get("changes") or [])),
            format_time(_meta(b).get("set_at"), now),
            _expires_cell(b, now),
            str(_meta(b).get("actor") or ""),
            str(_meta(b).get("incident") or ""),
            str(_meta(b).get("reason") or ""),
        ]
        for b in bundles
    ]
    headers = ["ID", "STATE", "CHANGES", "APPLIED", "EXPIRES", "ACTOR", "INCIDENT", "REASON"]
    return Rendered(table(headers, rows))


def render_bundle_get(doc: Mapping[str, Any], now: datetime) -> Rendered:
    bundle = doc.get("bundle") or {}
    meta = _meta(bundle)
    lines = [f"bundle {bundle.get('id', '?')} ({bundle.get('name', '?')}): {bundle_state(bundle)}"]
    lines.append(
        f"  applied   by {meta.get('actor') or '?'}, {format_time(meta.get('set_at'), now)}"
        f" · rev {bundle.get('revision', 0)}"
    )
    if meta.get("reason"):
        lines.append(f"  reason    {meta['reason']}")
    if meta.get("incident"):
        lines.append(f"  incident  {meta['incident']}")
    if meta.get("expires_at") is not None:
        lines.append(
            f"  expires   {format_time(meta['expires_at'], now)}, then what each change "
            "replaced applies again"
        )
    reverted = bundle.get("reverted")
    if reverted:
        text = f"  reverted  by {reverted.get('actor') or '?'}, "
        text += format_time(reverted.get("set_at"), now)
        if reverted.get("reason"):
            text += f": {reverted['reason']}"
        lines.append(text)
    lines.append("  changes:")
    lines += [f"    {format_change(c)}" for c in bundle.get("changes") or []]
    keys = list(bundle.get("keys") or [])
    if keys:
        lines.append(f"  keys      {', '.join(keys)}")
    return Rendered([_cell(line) for line in lines])
