"""What the fuzz tests send: the API under test and the hypothesis strategies.

Generic strategies build any message of a request type from its descriptor; targeted
ones a valid request with at most one field replaced; wrong types, bytes that are not
a message of the request type (``test_fuzz``'s docstring says what each covers).
"""

from __future__ import annotations

import json
import math
import operator
import re
import time
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import descriptor as pbd
from google.protobuf import duration_pb2, message_factory, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from controlplane import model
from controlplane.api.v1 import agent_pb2 as a
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t

# ---------------------------------------------------------------- the API under test

SERVICE = m.DESCRIPTOR.services_by_name["MitigationService"]
METHODS: dict[str, pbd.MethodDescriptor] = {md.name: md for md in SERVICE.methods}

# Seconds a call may take before the server counts as hung.
CALL_TIMEOUT = 5.0

# What a refusal of a message that decodes may say (mitigation.proto's header, and the
# server's own limits: RESOURCE_EXHAUSTED for a message over --max-message-bytes).
DOCUMENTED_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)

# RPCs that never write (a success must leave etcd as it was).
READS = frozenset(
    {
        "GetFlag", "ListFlags", "GetShedding", "ListShedding", "GetPin", "ListPins",
        "ListKnownGood", "ListBundles", "GetBundle", "GetStatus", "ListServices",
        "ListHistory",
        "WatchChanges", "WaitApplied", "GetTimeline", "ListNotifications", "GetTrigger",
        "ListTriggers",
    }
)  # fmt: skip

# ---------------------------------------------------------------- generic strategies

T = TypeVar("T")

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_INT_EDGES = [0, 1, -1, 2**31 - 1, -(2**31), 2**31, 2**32, 2**53, 2**53 + 1, 2**63 - 1, -(2**63)]
_NANO_EDGES = [0, 1, -1, 999, 1000, 999_999_999, 1_000_000_000, -999_999_999, *INT32]
# Seconds at the limits of Timestamp (0001-01-01 .. 9999-12-31), timedelta (999999999
# days), Duration (10000 years) and the server's rules (90 days).
_SECOND_EDGES = [
    0, 1, -1, 3600, 90 * 86400, 90 * 86400 + 1, 253_402_300_799, 253_402_300_800,
    -62_135_596_800, -62_135_596_801, 315_576_000_000, 315_576_000_001,
    86_400 * 999_999_999, 86_400 * 999_999_999 + 1, 2**63 - 1, -(2**63),
]  # fmt: skip
_HOUR_US = 3600 * 10**6


def int32s() -> st.SearchStrategy[int]:
    return st.one_of(
        st.integers(*INT32), st.sampled_from([v for v in _INT_EDGES if INT32[0] <= v <= INT32[1]])
    )


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*INT64), st.sampled_from(_INT_EDGES))


def doubles() -> st.SearchStrategy[float]:
    edges = [0.0, -0.0, 100.0, 100.000001, -1e-300, 5e-324, 1e308, math.inf, -math.inf, math.nan]
    return st.one_of(st.floats(), st.sampled_from(edges))


_NAMEISH = [
    "", " ", "\t", "\n", "\x00", "global", "GLOBAL", "a", "-", "a-", "-a", "a.b", "a_b",
    "a" * 63, "a" * 64, "a" * 128, "a" * 129, "ǅ", "İ", "ß", "\u2028", "\u00a0a", "a\u200b",
    "a/b", "../x", "a\x00b", "\ufeff", "\U0010ffff", "😀", "%s", "INC-1", "v1.4.2+b",
]  # fmt: skip


def huge_strings() -> st.SearchStrategy[str]:
    """Strings of 1 000 to 100 000 characters (up to 400 KB of UTF-8), cheap to draw."""
    return st.builds(
        operator.mul,
        st.sampled_from(["a", "é", "😀", "\x00", " ", "-", "{"]),
        st.integers(1_000, 100_000),
    )


def strings() -> st.SearchStrategy[str]:
    """Any protobuf string: unicode without surrogates (protobuf refuses them), control
    characters, names the server may accept, and huge ones."""
    return st.one_of(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
        st.sampled_from(_NAMEISH),
        st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True),
        huge_strings(),
    )


def _deep_json(depth: int, shape: str) -> str:
    if shape == "object":
        return '{"k":' * depth + "1" + "}" * depth
    if shape == "array":
        return '{"k":' + "[" * (depth - 1) + "1" + "]" * (depth - 1) + "}"
    if shape == "unclosed":
        return "[" * depth
    return (
        '{"k":' * (depth // 2)
        + "[" * (depth - depth // 2)
        + "null"
        + "]" * (depth - depth // 2)
        + "}" * (depth // 2)
    )


_JSON_ODDITIES = [
    "", "{", "{}", "[]", "null", "1", '"s"', "true", "NaN", '{"a": NaN}', '{"a": Infinity}',
    '{"a": -Infinity}', '{"a": 1e400}', '{"a": -1e400}', '{"a": 1, "a": 2}', '{"\\u0000": 1}',
    '{"a": "\\ud800"}', '{"\\udfff": 1}', '{"a": "\\ud83d\\ude00"}', '{"a": 1}garbage',
    '{"a": 1', "{'a': 1}", '{"a": ' + "9" * 4300 + "}", '{"a": ' + "9" * 4301 + "}",
    '{"a": 1.0}', '{"a": -0.0}', '{"a": 0.1e-400}', '\ufeff{"a": 1}', ' {"a": [1, {"b": []}]} ',
]  # fmt: skip


def json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
        max_leaves=12,
    )


def json_texts() -> st.SearchStrategy[str]:
    """JSON text for the JSON-typed string fields: valid objects, deep, odd and broken."""
    depths = st.one_of(st.integers(1, 40), st.sampled_from([31, 32, 33, 200, 5_000, 100_000]))
    return st.one_of(
        st.builds(json.dumps, st.dictionaries(st.text(max_size=6), json_values(), max_size=4)),
        st.builds(json.dumps, json_values()),
        st.builds(_deep_json, depths, st.sampled_from(["object", "array", "unclosed", "mixed"])),
        st.sampled_from(_JSON_ODDITIES),
        # Lone surrogates can only come as escapes (protobuf strings are valid UTF-8).
        st.builds(
            lambda s: json.dumps({"k": s}),
            st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2),
        ),
    )


def _after_an_hour(seconds: int, micros: int) -> int:
    """``seconds`` moved an hour on when ``seconds`` + ``micros`` is less than an hour ahead
    of now (a record with that expiry would expire during the run)."""
    now_us = time.time_ns() // 1000
    instant = seconds * 10**6 + micros
    return seconds + 7200 if now_us <= instant < now_us + _HOUR_US else seconds


def _duration(seconds: int, nanos: int) -> duration_pb2.Duration:
    # Duration.ToTimedelta rounds nanoseconds toward zero to microseconds.
    micros = seconds * 10**6 + int(nanos / 1000)
    if 0 < micros < _HOUR_US:
        seconds += 3600
    return duration_pb2.Duration(seconds=seconds, nanos=nanos)


def _timestamp(seconds: int, nanos: int) -> timestamp_pb2.Timestamp:
    # The server floors nanoseconds to microseconds (model.timestamp_to_datetime).
    return timestamp_pb2.Timestamp(seconds=_after_an_hour(seconds, nanos // 1000), nanos=nanos)


def _timestamp_from_now(offset: int, nanos: int) -> timestamp_pb2.Timestamp:
    return _timestamp(int(time.time()) + offset, nanos)


def durations() -> st.SearchStrategy[duration_pb2.Duration]:
    """Durations, out-of-range and mismatched signs included; never 0 < d < 1 h."""
    seconds = st.one_of(
        st.sampled_from(_SECOND_EDGES), st.integers(*INT64), st.integers(-1000, 100 * 86400)
    )
    nanos = st.one_of(st.sampled_from(_NANO_EDGES), st.integers(*INT32))
    return st.builds(_duration, seconds, nanos)


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    """Absolute and relative (to now) times, out of range included; never in the next hour."""
    nanos = st.one_of(st.sampled_from(_NANO_EDGES), st.integers(*INT32))
    absolute = st.builds(
        _timestamp, st.one_of(st.sampled_from(_SECOND_EDGES), st.integers(*INT64)), nanos
    )
    offsets = st.one_of(
        st.integers(-100 * 86400, 100 * 86400),
        st.sampled_from([-1, 0, 2 * 3600, 89 * 86400, 90 * 86400, 91 * 86400]),
    )
    return st.one_of(absolute, st.builds(_timestamp_from_now, offsets, nanos))


_WELL_KNOWN: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "google.protobuf.Duration": durations,
    "google.protobuf.Timestamp": timestamps,
}
JSON_FIELDS = frozenset(
    {"controlplane.api.v1.FlagValue.json_value", "controlplane.api.v1.Override.content_json"}
)
MAX_DEPTH = 4


def _is_map(f: Any) -> bool:
    return f.message_type is not None and f.message_type.GetOptions().map_entry


def _scalar(f: Any, depth: int) -> st.SearchStrategy[Any]:
    """One value of field ``f`` (one element, for a repeated field)."""
    if f.full_name in JSON_FIELDS:
        return st.one_of(json_texts(), strings())
    kind = f.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return messages(f.message_type, depth + 1)
    if kind == FieldDescriptor.TYPE_STRING:
        return strings()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers go over the wire as they are.
        assert f.enum_type is not None
        return st.one_of(st.sampled_from([v.number for v in f.enum_type.values]), int32s())
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return doubles()
    if kind == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if kind in (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32):
        return int32s()
    if kind == FieldDescriptor.TYPE_SFIXED32:
        return int32s()
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    return int64s()  # int64, sint64, sfixed64


def field_values(f: Any, depth: int = 0) -> st.SearchStrategy[Any]:
    """Any value of field ``f``: a list for a repeated field, a dict for a map."""
    if _is_map(f):
        assert f.message_type is not None
        key_field = f.message_type.fields_by_name["key"]
        value_field = f.message_type.fields_by_name["value"]
        return st.dictionaries(_scalar(key_field, depth), _scalar(value_field, depth), max_size=3)
    if f.is_repeated:
        return st.lists(_scalar(f, depth), max_size=4)
    return _scalar(f, depth)


def assign(msg: Message, f: Any, value: Any) -> None:
    """Set field ``f`` of ``msg`` to ``value`` (None: clear it)."""
    if value is None:
        msg.ClearField(f.name)
        return
    target: Any = getattr(msg, f.name)
    if _is_map(f):
        target.clear()
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif f.is_repeated:
        del target[:]
        if f.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif f.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(msg, f.name, value)


def _build(desc: pbd.Descriptor, values: dict[str, Any]) -> Message:
    msg = message_factory.GetMessageClass(desc)()
    for name, value in values.items():
        assign(msg, desc.fields_by_name[name], value)
    return msg


@cache
def messages(desc: pbd.Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any message of type ``desc``: each field absent or any value of its type."""
    special = _WELL_KNOWN.get(desc.full_name)
    if special is not None:
        return special()
    optional = {
        f.name: field_values(f, depth)
        for f in desc.fields
        if f.message_type is None or depth < MAX_DEPTH
    }
    return st.fixed_dictionaries({}, optional=optional).map(lambda values: _build(desc, values))


# ---------------------------------------------------------------- targeted strategies

SERVICES = ["svc-a", "svc-b", "c0"]
FLAG_NAMES = ["new-ui", "kill.switch", "mode_x"]
VERSIONS = ["v1", "v2", "v1.4.2+build.7", "V-3"]
INCIDENTS = ["INC-1", "INC-2"]
SERVICE_RE = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_FLAG_RE = r"[a-z0-9][a-z0-9._-]{0,127}"
_VERSION_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_INCIDENT_RE = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}"
_BUNDLE_NAME_RE = r"[a-z0-9][a-z0-9._-]{0,63}"
# The rule the server states for Hello.instance_id ("1-128 characters A-Z, a-z, 0-9, '.',
# '_', ':', '@', '/' and '-'"), written out again so that the test can disagree with it.
INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")


def _pool_or(pool: Sequence[str], pattern: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(pool),
        st.sampled_from(pool),
        st.sampled_from(pool),
        st.from_regex(pattern, fullmatch=True),
    )


def services() -> st.SearchStrategy[str]:
    return _pool_or(SERVICES, SERVICE_RE).filter(lambda s: s != model.GLOBAL_SCOPE)


def scopes() -> st.SearchStrategy[str]:
    return st.one_of(st.just(model.GLOBAL_SCOPE), services())


def flag_names() -> st.SearchStrategy[str]:
    return _pool_or(FLAG_NAMES, _FLAG_RE)


def versions() -> st.SearchStrategy[str]:
    return _pool_or(VERSIONS, _VERSION_RE)


_SPACE = st.sampled_from(["", "", " ", "\t", "  \u3000", "\u2028", "\x1c"])


def reasons() -> st.SearchStrategy[str]:
    """Reasons the server accepts: no control characters but tab, non-blank, with
    whitespace around that it strips."""
    printable = st.characters(exclude_categories=["Cs", "Cc"]) | st.just("\t")
    core = st.one_of(
        st.text(printable, min_size=1, max_size=60),
        st.sampled_from(["why", "x" * 1024, "é" * 1024]),
    ).filter(lambda s: s.strip() != "" and len(s.strip()) <= model.MAX_REASON_CHARS)
    return st.builds(lambda a_, b, c: a_ + b + c, _SPACE, core, _SPACE)


def incidents() -> st.SearchStrategy[str]:
    core = st.one_of(st.sampled_from(INCIDENTS), st.from_regex(_INCIDENT_RE, fullmatch=True))
    return st.one_of(
        st.just(""), st.builds(lambda a_, b: a_ + b + a_, st.sampled_from(["", " "]), core)
    )


def actors() -> st.SearchStrategy[str]:
    printable = st.characters(exclude_categories=["Cs", "Cc"])
    return st.one_of(
        st.just(""),
        st.builds(lambda a_, b: a_ + b, _SPACE, st.text(printable, max_size=40)),
        st.just("é" * 256),
    )


@st.composite
def write_options(draw: st.DrawFn, *, expiry: bool) -> t.WriteOptions:
    """Valid options; with ``expiry``, sometimes a ttl or expires_at of 1 h to 89 days."""
    opts = t.WriteOptions(
        reason=draw(reasons()),
        incident=draw(incidents()),
        actor=draw(actors()),
        dry_run=draw(st.sampled_from([False, False, False, True])),
    )
    kind = draw(st.sampled_from(["none", "none", "ttl", "until"])) if expiry else "none"
    if kind == "ttl":
        opts.ttl.CopyFrom(
            duration_pb2.Duration(
                seconds=draw(st.integers(3600, 89 * 86400)),
                nanos=draw(st.integers(0, 999_999_999)),
            )
        )
    elif kind == "until":
        opts.expires_at.CopyFrom(
            timestamp_pb2.Timestamp(
                seconds=int(time.time()) + draw(st.integers(2 * 3600, 89 * 86400)),
                nanos=draw(st.integers(0, 999_999_999)),
            )
        )
    return opts


def flag_values() -> st.SearchStrategy[t.FlagValue]:
    objects = st.dictionaries(st.text(max_size=8), json_values(), max_size=4)
    return st.one_of(
        st.builds(t.FlagValue, bool_value=st.booleans()),
        st.builds(
            t.FlagValue,
            number_value=st.one_of(
                st.floats(allow_nan=False, allow_infinity=False),
                st.integers(-(2**53), 2**53).map(float),
            ),
        ),
        st.builds(t.FlagValue, string_value=st.text(max_size=200)),
        st.builds(
            t.FlagValue,
            json_value=st.builds(
                lambda o, indent: json.dumps(o, indent=indent, ensure_ascii=indent is None),
                objects,
                st.sampled_from([None, 2]),
            ),
        ),
    )


def _percent() -> st.SearchStrategy[float]:
    return st.one_of(st.floats(0, 100), st.sampled_from([0.0, 100.0, 50.0, 0.5]))


def _tier() -> st.SearchStrategy[int]:
    return st.integers(0, 4)


@st.composite
def bundle_changes(draw: st.DrawFn, *, expiry: bool) -> list[m.BundleChange]:
    """1-5 valid changes on distinct keys (only sets and pins with an expiry), or 32."""
    if draw(st.integers(0, 19)) == 0:
        return [
            m.BundleChange(
                set_flag=m.SetFlagRequest(
                    scope="global", name=f"bulk-{i}", value=t.FlagValue(bool_value=True)
                )
            )
            for i in range(model.MAX_BUNDLE_CHANGES + 1)
        ]
    kinds = ["set_flag", "set_shedding", "pin_version"]
    if not expiry:
        kinds += ["clear_flag", "clear_shedding", "unpin_version"]
    changes: list[m.BundleChange] = []
    keys: set[str] = set()
    for _ in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(kinds))
        if kind in ("set_flag", "clear_flag"):
            scope, name = draw(scopes()), draw(flag_names())
            key = f"flags/{scope}/{name}"
            change = (
                m.BundleChange(
                    set_flag=m.SetFlagRequest(scope=scope, name=name, value=draw(flag_values()))
                )
                if kind == "set_flag"
                else m.BundleChange(
                    clear_flag=m.ClearFlagRequest(
                        scope=scope, name=name, all_layers=draw(st.booleans())
                    )
                )
            )
        elif kind in ("set_shedding", "clear_shedding"):
            service = draw(services())
            key = f"shedding/{service}"
            change = (
                m.BundleChange(
                    set_shedding=m.SetSheddingRequest(
                        service=service, tier=cast(Any, draw(_tier())), percent=draw(_percent())
                    )
                )
                if kind == "set_shedding"
                else m.BundleChange(
                    clear_shedding=m.ClearSheddingRequest(
                        service=service, all_layers=draw(st.booleans())
                    )
                )
            )
        else:
            service = draw(services())
            key = f"pins/{service}"
            change = (
                m.BundleChange(
                    pin_version=m.PinVersionRequest(service=service, version=draw(versions()))
                )
                if kind == "pin_version"
                else m.BundleChange(
                    unpin_version=m.UnpinVersionRequest(
                        service=service, all_layers=draw(st.booleans())
                    )
                )
            )
        if key not in keys:
            keys.add(key)
            changes.append(change)
    return changes


@st.composite
def apply_bundle_requests(draw: st.DrawFn) -> m.ApplyBundleRequest:
    opts = draw(write_options(expiry=True))
    expiry = opts.HasField("ttl") or opts.HasField("expires_at")
    return m.ApplyBundleRequest(
        name=draw(_pool_or(["fuzz-bundle", "b.1"], _BUNDLE_NAME_RE)),
        changes=draw(bundle_changes(expiry=expiry)),
        options=opts,
    )


_TRIGGER_NAMES = ["fuzz-trigger", "t.1"]


def _trigger_names() -> st.SearchStrategy[str]:
    return _pool_or(_TRIGGER_NAMES, _BUNDLE_NAME_RE)


@st.composite
def set_trigger_requests(draw: st.DrawFn) -> m.SetTriggerRequest:
    """A valid trigger: 1-3 label matchers and a bundle (with a ttl, sometimes)."""
    ttl = draw(st.sampled_from([None, 60, 1800]))
    labels = draw(
        st.lists(st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,8}", fullmatch=True), min_size=1,
                 max_size=3, unique=True)
    )  # fmt: skip
    values = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=12)
    expressions = st.sampled_from(["crit.*", "a|b", "[0-9]+", "", ".*", r"\w{2,5}"])
    # The first matcher needs its label (equality); the others use any operator.
    matchers = [m.LabelMatcher(label=labels[0], value=draw(values))]
    for label in labels[1:]:
        kind = draw(
            st.sampled_from([m.MATCH_EQUAL, m.MATCH_NOT_EQUAL, m.MATCH_REGEX, m.MATCH_NOT_REGEX])
        )
        regex = kind in (m.MATCH_REGEX, m.MATCH_NOT_REGEX)
        value = draw(expressions if regex else values)
        matchers.append(m.LabelMatcher(label=label, value=value, type=kind))
    trigger = m.Trigger(
        name=draw(_trigger_names()),
        matchers=matchers,
        bundle_name=draw(_pool_or(["fuzz-bundle", "b.1"], _BUNDLE_NAME_RE)),
        changes=draw(bundle_changes(expiry=ttl is not None)),
        revert_on_resolve=draw(st.booleans()),
        dry_run=draw(st.booleans()),
    )
    if ttl is not None:
        trigger.ttl.FromSeconds(ttl)
    if draw(st.booleans()):
        trigger.cooldown.FromSeconds(draw(st.integers(0, 3600)))
    return m.SetTriggerRequest(trigger=trigger, options=draw(write_options(expiry=False)))


def _bundle_ids() -> st.SearchStrategy[str]:
    return st.from_regex(r"[0-9]{8}-[0-9]{6}-[a-z0-9][a-z0-9._-]{0,8}-[0-9a-f]{4}", fullmatch=True)


def _past_times() -> st.SearchStrategy[timestamp_pb2.Timestamp]:
    return st.builds(
        lambda ago: timestamp_pb2.Timestamp(seconds=int(time.time()) - ago),
        st.integers(0, 30 * 86400),
    )


def _short_timeouts() -> st.SearchStrategy[duration_pb2.Duration]:
    # WaitApplied waits up to its timeout; a mostly-valid request waits at most 0.3 s.
    return st.builds(
        lambda ms: duration_pb2.Duration(seconds=0, nanos=ms * 1_000_000), st.integers(1, 300)
    )


def _b(cls: Callable[..., T], **fields: st.SearchStrategy[Any]) -> st.SearchStrategy[T]:
    return st.builds(cls, **fields)


# A valid request of every MitigationService method. A method without an entry gets the
# generic strategy as its "valid" one (and test_every_rpc_has_an_oracle says so).
VALID_REQUESTS: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
    "SetFlag": lambda: _b(
        m.SetFlagRequest,
        scope=scopes(), name=flag_names(), value=flag_values(),
        options=write_options(expiry=True),
    ),
    "GetFlag": lambda: _b(
        m.GetFlagRequest, scope=scopes(), name=flag_names(), effective=st.booleans()
    ),
    "ListFlags": lambda: _b(
        m.ListFlagsRequest, scope=st.just("") | scopes(), effective=st.booleans()
    ),
    "ClearFlag": lambda: _b(
        m.ClearFlagRequest,
        scope=scopes(), name=flag_names(), options=write_options(expiry=False),
        all_layers=st.booleans(),
    ),
    "SetShedding": lambda: _b(
        m.SetSheddingRequest,
        service=services(), tier=_tier(), percent=_percent(), options=write_options(expiry=True),
    ),
    "GetShedding": lambda: _b(m.GetSheddingRequest, service=services()),
    "ListShedding": lambda: st.just(m.ListSheddingRequest()),
    "ClearShedding": lambda: _b(
        m.ClearSheddingRequest,
        service=services(), options=write_options(expiry=False), all_layers=st.booleans(),
    ),
    "PinVersion": lambda: _b(
        m.PinVersionRequest,
        service=services(), version=versions(), options=write_options(expiry=True),
    ),
    "GetPin": lambda: _b(m.GetPinRequest, service=services()),
    "ListPins": lambda: st.just(m.ListPinsRequest()),
    "UnpinVersion": lambda: _b(
        m.UnpinVersionRequest,
        service=services(), options=write_options(expiry=False), all_layers=st.booleans(),
    ),
    "MarkKnownGood": lambda: _b(
        m.MarkKnownGoodRequest,
        service=services(), version=versions(), options=write_options(expiry=False),
    ),
    "UnmarkKnownGood": lambda: _b(
        m.UnmarkKnownGoodRequest,
        service=services(), version=versions(), options=write_options(expiry=False),
    ),
    "ListKnownGood": lambda: _b(m.ListKnownGoodRequest, service=services()),
    "Rollback": lambda: _b(
        m.RollbackRequest,
        service=services(), current_version=st.just("") | versions(),
        options=write_options(expiry=True),
    ),
    "ApplyBundle": apply_bundle_requests,
    "RevertBundle": lambda: _b(
        m.RevertBundleRequest,
        bundle_id=_bundle_ids(), force=st.booleans(), options=write_options(expiry=False),
    ),
    "ListBundles": lambda: _b(m.ListBundlesRequest, limit=st.integers(0, 50)),
    "GetBundle": lambda: _b(m.GetBundleRequest, bundle_id=_bundle_ids()),
    "GetStatus": lambda: _b(m.GetStatusRequest, service=services()),
    "ListServices": lambda: _b(m.ListServicesRequest),
    "ListHistory": lambda: _b(
        m.ListHistoryRequest,
        service=st.just("") | services(), incident=incidents(), since=_past_times(),
        limit=st.integers(0, 1000),
    ),
    "WatchChanges": lambda: _b(m.WatchChangesRequest, service=st.just("") | services()),
    "WaitApplied": lambda: _b(
        m.WaitAppliedRequest,
        service=services(), revision=st.integers(1, 2**40), timeout=_short_timeouts(),
    ),
    "GetTimeline": lambda: _b(
        m.GetTimelineRequest, incident=incidents(), limit=st.integers(0, 10_000)
    ),
    "ListNotifications": lambda: _b(m.ListNotificationsRequest, limit=st.integers(0, 1000)),
    "SetTrigger": set_trigger_requests,
    "GetTrigger": lambda: _b(m.GetTriggerRequest, name=_trigger_names()),
    "ListTriggers": lambda: st.just(m.ListTriggersRequest()),
    "DeleteTrigger": lambda: _b(
        m.DeleteTriggerRequest, name=_trigger_names(), options=write_options(expiry=False)
    ),
    "SetTriggerEnabled": lambda: _b(
        m.SetTriggerEnabledRequest,
        name=_trigger_names(), enabled=st.booleans(), options=write_options(expiry=False),
    ),
    "FireTrigger": lambda: _b(
        m.FireTriggerRequest,
        name=_trigger_names(), group_key=st.text(max_size=20), incident=incidents(),
        summary=st.text(max_size=40), url=st.just("") | st.just("http://alerts.example/x"),
    ),
    "ResolveTrigger": lambda: _b(
        m.ResolveTriggerRequest, name=_trigger_names(), group_key=st.text(max_size=20)
    ),
}  # fmt: skip


FieldPath = tuple[str | int, ...]


def leaf_paths(msg: Message, prefix: FieldPath = (), depth: int = 0) -> list[tuple[FieldPath, Any]]:
    """Every field of ``msg`` a perturbation may replace, at any depth: each field of the
    message, and inside the set sub-messages (and the first elements of repeated ones)."""
    out: list[tuple[FieldPath, Any]] = []
    for f in msg.DESCRIPTOR.fields:
        path = (*prefix, f.name)
        out.append((path, f))
        nested = (
            f.message_type is not None
            and f.message_type.full_name not in _WELL_KNOWN
            and not _is_map(f)
            and depth < MAX_DEPTH
        )
        if not nested:
            continue
        if f.is_repeated:
            for i, item in enumerate(list(getattr(msg, f.name))[:2]):
                out += leaf_paths(item, (*path, i), depth + 1)
        else:
            # Also inside an unset sub-message: setting one of its fields makes it present.
            out += leaf_paths(getattr(msg, f.name), path, depth + 1)
    return out


def set_path(msg: Message, path: FieldPath, f: Any, value: Any) -> None:
    node: Any = msg
    for step in path[:-1]:
        node = node[step] if isinstance(step, int) else getattr(node, step)
    assign(node, f, value)


@st.composite
def targeted(draw: st.DrawFn, method: str) -> Message:
    """A valid request of ``method``; most of the time with one field (at any depth)
    replaced by any value of its type, or cleared."""
    desc = METHODS[method].input_type
    valid = VALID_REQUESTS.get(method)
    request: Message = draw(valid() if valid is not None else messages(desc))
    if draw(st.integers(0, 3)) == 0:
        return request
    paths = leaf_paths(request)
    if not paths:
        return request
    path, f = draw(st.sampled_from(paths))
    set_path(request, path, f, draw(st.none() | field_values(f)))
    return request


# ---------------------------------------------------------------- wrong types

_CORRUPTIONS = [
    b"\xff",  # a truncated varint tag
    b"\x0f",  # field 1, wire type 7: no such wire type
    b"\x0a\x05ab",  # a length past the end
    b"\x0a\x02\xff\xfe",  # field 1 is a string in most requests: not UTF-8
    b"\x0b",  # a group start that never ends
    b"\x08" + b"\xff" * 11,  # a varint of 11 bytes
]


@st.composite
def wrong_payloads(draw: st.DrawFn, method: str) -> bytes:
    """Bytes that are not a message of ``method``'s request type, or a message of another."""
    own = METHODS[method].input_type
    kind = draw(st.sampled_from(["binary", "corrupt", "truncated", "other", "other"]))
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "corrupt":
        valid = draw(targeted(method)).SerializeToString()
        return draw(st.sampled_from(_CORRUPTIONS)) + valid
    if kind == "truncated":
        raw = draw(targeted(method)).SerializeToString()
        return raw[: draw(st.integers(0, max(len(raw) - 1, 0)))]
    others: list[Any] = [md.input_type for md in SERVICE.methods if md.input_type is not own]
    others += [a.SyncRequest.DESCRIPTOR, t.Flag.DESCRIPTOR]
    other = draw(st.sampled_from(others))
    return draw(messages(other)).SerializeToString()
