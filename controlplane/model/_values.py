"""Names, values and times: their validation, JSON form and protobuf bridge."""

from __future__ import annotations

import enum
import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeAlias

from google.protobuf import duration_pb2, timestamp_pb2

from controlplane._text import escaped, refused_char
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import InvalidArgumentError

GLOBAL_SCOPE = "global"
MAX_RECORD_BYTES = 64 * 1024
MAX_REASON_CHARS = 1024
MAX_ACTOR_CHARS = 256
MAX_JSON_DEPTH = 32
MAX_TTL = timedelta(days=90)

_SERVICE_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FLAG_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,127}")
_VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
INCIDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")

FlagValue: TypeAlias = bool | float | str | dict[str, Any]


class RecordError(ValueError):
    """A stored record that does not parse or breaks a rule (hand-edited in etcd)."""


class BundleState(enum.IntEnum):
    """A bundle's state (values match the protobuf enum)."""

    APPLIED = 1
    REVERTED = 2
    EXPIRED = 3
    PARTIALLY_OVERRIDDEN = 4


class Tier(enum.IntEnum):
    """Criticality tiers, most important first (values match the protobuf enum)."""

    CRITICAL_PLUS = 1
    CRITICAL = 2
    SHEDDABLE_PLUS = 3
    SHEDDABLE = 4


# ---------------------------------------------------------------- validation


def validate_incident(value: str, field_name: str = "incident") -> str:
    """Return ``value`` if it is an incident id or empty."""
    if value and not INCIDENT_RE.fullmatch(value):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} is not an incident id: 1-64 characters A-Z, a-z, 0-9, "
            "'.', '_', ':', '/' and '-'",
        )
    return value


def validate_service(value: str, field_name: str = "service") -> str:
    """Return ``value`` if it is a service name (a DNS label, not ``global``)."""
    if not value:
        raise InvalidArgumentError(field_name, "is required")
    if value == GLOBAL_SCOPE:
        raise InvalidArgumentError(
            field_name, f"{GLOBAL_SCOPE!r} is the scope of every service, not a service name"
        )
    if not _SERVICE_RE.fullmatch(value):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} is not a service name: a DNS label of 1-63 characters "
            "a-z, 0-9 and '-', starting and ending with a letter or digit",
        )
    return value


def validate_scope(value: str, field_name: str = "scope") -> str:
    """Return ``value`` if it is ``global`` or a service name."""
    if value == GLOBAL_SCOPE:
        return value
    if not value:
        raise InvalidArgumentError(field_name, f"is required ({GLOBAL_SCOPE!r} or a service name)")
    return validate_service(value, field_name)


def validate_flag_name(value: str, field_name: str = "name") -> str:
    """Return ``value`` if it matches ``[a-z0-9][a-z0-9._-]{0,127}``."""
    if not value:
        raise InvalidArgumentError(field_name, "is required")
    if not _FLAG_RE.fullmatch(value):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} is not a flag name: 1-128 characters a-z, 0-9, '.', '_' "
            "and '-', starting with a letter or digit",
        )
    return value


RESERVED_FLAG_PREFIX = "controlplane."
"""Flag names the control plane serves itself (``controlplane.shedding``, ``controlplane.pin``
to OpenFeature providers): not for writes."""


def validate_new_flag_name(value: str, field_name: str = "name") -> str:
    """:func:`validate_flag_name`, and not a reserved name (for writes that set a flag)."""
    validate_flag_name(value, field_name)
    if value.startswith(RESERVED_FLAG_PREFIX):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} starts with {RESERVED_FLAG_PREFIX!r}, which is reserved (OpenFeature "
            "clients read shedding and the pin as controlplane.shedding and controlplane.pin): "
            "pick another name",
        )
    return value


def validate_version(value: str, field_name: str = "version") -> str:
    """Return ``value`` if it is a version label such as ``v1.4.2``."""
    if not value:
        raise InvalidArgumentError(field_name, "is required")
    if not _VERSION_RE.fullmatch(value):
        raise InvalidArgumentError(
            field_name,
            f"{show(value)} is not a version: 1-128 characters A-Z, a-z, 0-9, '.', '_', "
            "'+' and '-', starting with a letter or digit",
        )
    return value


def validate_percent(value: float, field_name: str = "percent") -> float:
    """Return ``value`` if it is a finite percentage from 0 to 100."""
    if not math.isfinite(value) or not 0.0 <= value <= 100.0:
        raise InvalidArgumentError(field_name, f"{value!r} is out of range: must be 0 to 100")
    return float(value)


def show(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def check_text(value: str, field_name: str, limit: int) -> str:
    """``value`` if it is at most ``limit`` characters without control characters
    (a tab aside) or bidirectional controls."""
    if len(value) > limit:
        raise InvalidArgumentError(field_name, f"is {len(value)} characters, over {limit}")
    for c in value:
        why = refused_char(c)
        if why is not None:
            raise InvalidArgumentError(field_name, f"must not contain {why} (found U+{ord(c):04X})")
    return value


def clean_text(value: str, limit: int) -> str:
    """Text someone else wrote (an agent's report), made safe to show: cut to ``limit``
    characters, each refused character written as a ``\\u`` escape (``\\u001b``)."""
    return escaped(value[:limit])[:limit]


def validate_json_object(value: Any, field_name: str = "value") -> dict[str, Any]:
    """Return ``value`` if it is a JSON object of bounded depth with finite numbers."""
    if not isinstance(value, dict):
        raise InvalidArgumentError(field_name, "a JSON value must be an object ({...})")
    _check_json(value, field_name, 1)
    return value


def _check_json(value: Any, field_name: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InvalidArgumentError(field_name, f"JSON is nested deeper than {MAX_JSON_DEPTH}")
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidArgumentError(field_name, "JSON object keys must be strings")
            _check_unicode(k, field_name)
            _check_json(v, field_name, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_json(v, field_name, depth + 1)
    elif isinstance(value, str):
        _check_unicode(value, field_name)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgumentError(field_name, "JSON numbers must be finite")
    elif value is not None and not isinstance(value, bool | int | str):
        raise InvalidArgumentError(field_name, f"{type(value).__name__} is not a JSON value")


def _check_unicode(text: str, field_name: str) -> None:
    # "\ud800" parses to a lone surrogate, which no UTF-8 record can hold.
    try:
        text.encode()
    except UnicodeEncodeError:
        raise InvalidArgumentError(
            field_name, "JSON strings must be valid Unicode (a lone surrogate escape)"
        ) from None


def reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json_object(text: str, field_name: str = "value") -> dict[str, Any]:
    """Parse ``text`` as a JSON object (no NaN or Infinity) and validate it."""
    try:
        value = json.loads(text, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgumentError(field_name, f"is not valid JSON: {exc}") from None
    return validate_json_object(value, field_name)


def validate_flag_value(value: Any, field_name: str = "value") -> FlagValue:
    """Return ``value`` as a flag value: bool, finite number, string or JSON object."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise InvalidArgumentError(field_name, "a number value must be finite")
        return float(value)
    if isinstance(value, dict):
        return validate_json_object(value, field_name)
    raise InvalidArgumentError(
        field_name, "is required: a bool, a number, a string or a JSON object"
    )


def value_key(value: FlagValue) -> str:
    """A canonical text of a flag value: equal values, equal texts (true != 1)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return dump_json(int(value))
    return dump_json(value)


def describe_value(value: FlagValue | None) -> str:
    """The value as a person reads it: ``false``, ``30``, ``read-only``, ``{...}``."""
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _number_text(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def describe_shedding(tier: Tier, percent: float) -> str:
    """A shedding level as a person reads it: ``SHEDDABLE_PLUS 50%``."""
    return f"{tier.name} {_number_text(percent)}%"


def _number_text(value: float) -> str:
    return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)


# ---------------------------------------------------------------- time


def utcnow() -> datetime:
    """Now, timezone-aware in UTC."""
    return datetime.now(UTC)


def format_time(value: datetime) -> str:
    """ISO 8601 in UTC with microseconds and a ``Z``; the year always has four digits
    (``strftime("%Y")`` writes year 1 as ``1``, which no ISO parser reads back)."""
    v = value.astimezone(UTC)
    return (
        f"{v.year:04d}-{v.month:02d}-{v.day:02d}T"
        f"{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{v.microsecond:06d}Z"
    )


def parse_time(text: str) -> datetime:
    """Parse a stored time, as :func:`format_time` writes it (any ISO 8601 with a zone).

    A time without a zone is refused, not taken as UTC: see ``zone_required`` of
    ``controlplane._durations.parse_time``, the one parser of times.
    """
    from controlplane._durations import parse_time as parse

    return parse(text, zone_required=True)


def timestamp_to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    """A protobuf Timestamp as an aware UTC datetime.

    Raises:
        ValueError: a time datetime cannot hold (out of range on this platform).
    """
    try:
        return datetime.fromtimestamp(ts.seconds, UTC) + timedelta(microseconds=ts.nanos // 1000)
    except (OverflowError, OSError) as exc:
        raise ValueError(f"time {ts.seconds}s is out of range") from exc


def duration_to_timedelta(msg: duration_pb2.Duration, field_name: str) -> timedelta:
    """A request's Duration as a timedelta; INVALID_ARGUMENT when timedelta cannot hold it."""
    try:
        return msg.ToTimedelta()
    except (OverflowError, ValueError):
        raise InvalidArgumentError(field_name, "is not a valid duration") from None


def datetime_to_timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    """An aware datetime as a protobuf Timestamp."""
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value.astimezone(UTC))
    return ts


# ---------------------------------------------------------------- JSON records


def dump_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def encode_record(
    data: dict[str, Any], field_name: str = "value", limit: int = MAX_RECORD_BYTES
) -> bytes:
    """Serialize a record for etcd, enforcing the 64 KiB limit (or ``limit``)."""
    raw = dump_json(data).encode()
    if len(raw) > limit:
        raise InvalidArgumentError(
            field_name,
            f"the record is {len(raw)} bytes, over the {limit // 1024} KiB ({limit} bytes) limit",
        )
    return raw


def decode_record(raw: bytes) -> dict[str, Any]:
    """Parse a stored record's JSON (structure only; the type's from_record validates)."""
    try:
        data = json.loads(raw, parse_constant=reject_constant)
    except (ValueError, RecursionError) as exc:
        raise RecordError(f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RecordError("record must be a JSON object")
    return data


# ---------------------------------------------------------------- protobuf bridges


def flag_value_from_proto(msg: pb.FlagValue, field_name: str = "value") -> FlagValue:
    """Validate a request's flag value."""
    kind = msg.WhichOneof("kind")
    if kind == "bool_value":
        return msg.bool_value
    if kind == "number_value":
        return validate_flag_value(msg.number_value, field_name)
    if kind == "string_value":
        return msg.string_value
    if kind == "json_value":
        return parse_json_object(msg.json_value, field_name)
    raise InvalidArgumentError(
        field_name, "is required: a bool, a number, a string or a JSON object"
    )


def flag_value_to_proto(value: FlagValue) -> pb.FlagValue:
    """A flag value as the API's oneof."""
    if isinstance(value, bool):
        return pb.FlagValue(bool_value=value)
    if isinstance(value, float | int):
        return pb.FlagValue(number_value=float(value))
    if isinstance(value, str):
        return pb.FlagValue(string_value=value)
    return pb.FlagValue(json_value=dump_json(value))


def tier_from_proto(value: int, field_name: str = "tier") -> Tier:
    """A request's tier; unspecified means SHEDDABLE."""
    if value == pb.TIER_UNSPECIFIED:
        return Tier.SHEDDABLE
    try:
        return Tier(value)
    except ValueError:
        names = ", ".join(Tier.__members__)
        raise InvalidArgumentError(field_name, f"unknown tier {value}: one of {names}") from None
