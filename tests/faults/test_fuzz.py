"""Fuzz every RPC of a real server process: it never crashes or hangs, rejects cleanly, round-trips.

What is sent (hypothesis strategies):

- **generic**: any message of each method's request type, built from its descriptor
  (:func:`messages`), so an RPC added to ``MitigationService`` is fuzzed without a change
  here: unicode, control characters, empty and huge (to 100 KB) strings, integers over the
  whole int32/int64 range, unknown enum values, doubles with NaN/inf/-0.0, nested and
  repeated messages, oneofs, Durations and Timestamps with out-of-range seconds and nanos,
  and for the JSON fields (``FlagValue.json_value``, ``Override.content_json``) deep,
  invalid and odd JSON;
- **targeted**: a valid request (valid names, reasons, values, expiries; a small pool of
  names so that writes meet each other) with at most one field, at any depth, replaced by
  a generic value: accepted input is frequent enough to check the round trip;
- **wrong types**: bytes that are not a message of the request type, and a valid message
  of another request type;
- **AgentService.Sync**: a first message (a mostly-valid Hello, or anything) and a few
  follow-up messages on a raw stream, which then half-closes as an agent that stops does.

What must hold for every call (:func:`check_call`):

- an answer within :data:`CALL_TIMEOUT` (DEADLINE_EXCEEDED means the server hung), and
  the server process is alive afterwards;
- a refusal carries a documented code (:data:`DOCUMENTED_CODES`) and details that are not
  empty and not a Python traceback; UNKNOWN or INTERNAL for a message that decodes is a
  bug. Bytes that do not decode as the request type never reach our code: grpc.aio answers
  them with UNKNOWN and ``Unexpected <class '...DecodeError'>: Error parsing message ...``
  (its own behaviour for a failing request deserializer; the servicers cannot see it);
- a refusal, a read, a dry run and an unchanged write leave etcd as it was: the etcd
  revision is compared before and after the call (when something else in the session
  moved it, the keys of the server's prefixes are compared between the two revisions);
- an accepted write is read back (GetFlag, GetShedding, GetPin, ListKnownGood,
  GetBundle): the record read equals the one the write answered, and both carry exactly
  what was sent, up to the normalisation the server does on purpose: ``reason``,
  ``incident`` and ``actor`` are stripped of surrounding whitespace and an empty actor
  becomes ``unknown``; times are kept to the microsecond (nanoseconds are floored, the
  way ``model.timestamp_to_datetime`` reads them); a ``ttl`` becomes ``expires_at`` (set
  time + ttl); a JSON value comes back canonical (keys sorted, no spaces, parsed and
  re-serialized); a number that is an integer is stored as one, so ``-0.0`` reads back
  as ``0.0``; an unspecified tier is SHEDDABLE.

What must hold for every Sync stream (:func:`sync_check`): a valid Hello gets a snapshot
(or resume) and any other first message INVALID_ARGUMENT with nothing written; no
follow-up message ends the stream; once the agent half-closes, the call ends with OK, the
instance is no longer connected, and the server logged no error.

Time-boxed records that would expire during the run are never generated (durations and
times less than an hour ahead are moved an hour further): the server's expiry loop would
delete them at a moment no call accounts for, and the revision oracle could not tell its
write from a bad one.

Budget: by default (``make test``) a few hundred examples in all, derandomized; with
``CONTROLPLANE_FAULTS=full`` (``make test-faults``) several thousand, with a random seed
(a failure prints a ``@reproduce_failure`` blob; ``--hypothesis-seed`` pins a run).
"""

from __future__ import annotations

import contextlib
import json
import math
import operator
import os
import queue
import re
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import cache
from typing import Any, TypeVar, cast

import grpc
import pytest
from aetcd import rpc
from google.protobuf import descriptor as pbd
from google.protobuf import duration_pb2, message_factory, text_format, timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from hypothesis import HealthCheck, currently_in_test_context, event, given, settings
from hypothesis import strategies as st

from controlplane import model
from controlplane.api.v1 import agent_pb2 as a
from controlplane.api.v1 import agent_pb2_grpc, mitigation_pb2_grpc
from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.api.v1 import types_pb2 as t
from controlplane.embedded_etcd import EmbeddedEtcd
from controlplane.errors import InvalidArgumentError
from tests.conftest import TEST_KEY_ROOT
from tests.helpers.raw_etcd import delete_prefix_blocking, prefix_range_end
from tests.helpers.server_process import ServerProcess

# ---------------------------------------------------------------- budget

FULL = os.environ.get("CONTROLPLANE_FAULTS") == "full"

settings.register_profile(
    "controlplane-fuzz",
    deadline=None,  # every example makes network calls
    database=None,  # CI runs the same examples every time
    derandomize=True,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,  # the servers live across examples on purpose
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
settings.register_profile(
    "controlplane-fuzz-full",
    parent=settings.get_profile("controlplane-fuzz"),
    derandomize=False,
)
_PROFILE = settings.get_profile("controlplane-fuzz-full" if FULL else "controlplane-fuzz")


def budget(quick: int, full: int) -> settings:
    """Hypothesis settings for ``quick`` examples in ``make test``, ``full`` in the fault run."""
    return settings(_PROFILE, max_examples=full if FULL else quick)


pytestmark = pytest.mark.timeout(900 if FULL else 120)

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
        "ListKnownGood", "ListBundles", "GetBundle", "GetStatus", "ListHistory",
        "WatchChanges", "WaitApplied", "GetTimeline",
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
_SERVICE_RE = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_FLAG_RE = r"[a-z0-9][a-z0-9._-]{0,127}"
_VERSION_RE = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_INCIDENT_RE = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}"
_BUNDLE_NAME_RE = r"[a-z0-9][a-z0-9._-]{0,63}"
# The rule the server states for Hello.instance_id ("1-128 characters A-Z, a-z, 0-9, '.',
# '_', ':', '@', '/' and '-'"), written out again so that the test can disagree with it.
_INSTANCE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")


def _pool_or(pool: Sequence[str], pattern: str) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(pool),
        st.sampled_from(pool),
        st.sampled_from(pool),
        st.from_regex(pattern, fullmatch=True),
    )


def services() -> st.SearchStrategy[str]:
    return _pool_or(SERVICES, _SERVICE_RE).filter(lambda s: s != model.GLOBAL_SCOPE)


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
def _apply_bundle(draw: st.DrawFn) -> m.ApplyBundleRequest:
    opts = draw(write_options(expiry=True))
    expiry = opts.HasField("ttl") or opts.HasField("expires_at")
    return m.ApplyBundleRequest(
        name=draw(_pool_or(["fuzz-bundle", "b.1"], _BUNDLE_NAME_RE)),
        changes=draw(bundle_changes(expiry=expiry)),
        options=opts,
    )


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
    "ApplyBundle": _apply_bundle,
    "RevertBundle": lambda: _b(
        m.RevertBundleRequest,
        bundle_id=_bundle_ids(), force=st.booleans(), options=write_options(expiry=False),
    ),
    "ListBundles": lambda: _b(m.ListBundlesRequest, limit=st.integers(0, 50)),
    "GetBundle": lambda: _b(m.GetBundleRequest, bundle_id=_bundle_ids()),
    "GetStatus": lambda: _b(m.GetStatusRequest, service=services()),
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
}  # fmt: skip


FieldPath = tuple[str | int, ...]


def _leaf_paths(
    msg: Message, prefix: FieldPath = (), depth: int = 0
) -> list[tuple[FieldPath, Any]]:
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
                out += _leaf_paths(item, (*path, i), depth + 1)
        else:
            # Also inside an unset sub-message: setting one of its fields makes it present.
            out += _leaf_paths(getattr(msg, f.name), path, depth + 1)
    return out


def _set_path(msg: Message, path: FieldPath, f: Any, value: Any) -> None:
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
    paths = _leaf_paths(request)
    if not paths:
        return request
    path, f = draw(st.sampled_from(paths))
    _set_path(request, path, f, draw(st.none() | field_values(f)))
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


# ---------------------------------------------------------------- etcd, servers, calls


class EtcdProbe:
    """Blocking reads of the session etcd, independent of the server under test."""

    def __init__(self, endpoint: str) -> None:
        self._channel = grpc.insecure_channel(endpoint)
        self._kv: Any = rpc.KVStub(self._channel)

    def revision(self) -> int:
        response = self._kv.Range(rpc.RangeRequest(key=b"\0", count_only=True), timeout=10)
        return int(response.header.revision)

    def keys(self, prefix: str, revision: int = 0) -> dict[bytes, int]:
        """The keys under ``prefix`` (at ``revision``; 0: now) with their mod revisions."""
        raw = prefix.encode()
        response = self._kv.Range(
            rpc.RangeRequest(
                key=raw, range_end=prefix_range_end(raw), keys_only=True, revision=revision
            ),
            timeout=10,
        )
        return {bytes(kv.key): int(kv.mod_revision) for kv in response.kvs}

    def close(self) -> None:
        self._channel.close()


def _identity(raw: bytes) -> bytes:
    return raw


@dataclass
class Reply:
    """What one call answered."""

    code: grpc.StatusCode
    details: str
    response: Any = None


@dataclass
class Target:
    """The server process under test, its channel and the etcd beside it."""

    server: ServerProcess
    channel: grpc.Channel
    etcd: EtcdProbe
    prefix: str
    stub: Any = None

    @property
    def prefixes(self) -> tuple[str, str]:
        return self.prefix, self.prefix.rstrip("/") + "-presence/"

    def alive(self) -> None:
        assert self.server.proc.poll() is None, (
            f"the server process died (exit {self.server.proc.returncode}):\n"
            + "".join(self.server.output[-40:])
        )

    def invoke(self, method: pbd.MethodDescriptor, payload: bytes) -> Reply:
        """Call ``method`` with ``payload`` as the request's bytes; a stream's first answer."""
        path = f"/{method.containing_service.full_name}/{method.name}"
        decode = message_factory.GetMessageClass(method.output_type).FromString
        try:
            if not method.server_streaming:
                call = self.channel.unary_unary(
                    path, request_serializer=_identity, response_deserializer=decode
                )
                return Reply(grpc.StatusCode.OK, "", call(payload, timeout=CALL_TIMEOUT))
            stream: Any = self.channel.unary_stream(
                path, request_serializer=_identity, response_deserializer=decode
            )(payload, timeout=CALL_TIMEOUT)
            try:
                first = next(stream)
            except StopIteration:
                return Reply(stream.code(), stream.details() or "", None)
            finally:
                stream.cancel()
            return Reply(grpc.StatusCode.OK, "", first)
        except grpc.RpcError as exc:
            call_exc = cast(grpc.Call, exc)
            return Reply(call_exc.code(), call_exc.details() or "")

    def unchanged(self, before: int, after: int, what: str) -> None:
        """etcd holds what it held at ``before``, as far as this server can write."""
        if after == before:
            return
        # Something moved the revision: another process of the session, or this server.
        # The keys of its prefixes tell which.
        moved = {
            key.decode(errors="replace"): (old.get(key), new.get(key))
            for prefix in self.prefixes
            for old, new in [(self.etcd.keys(prefix, before), self.etcd.keys(prefix, after))]
            for key in old.keys() | new.keys()
            if old.get(key) != new.get(key)
        }
        assert not moved, f"{what}: etcd changed (mod revision before, after): {moved}"

    def get(self, rpc_name: str, request: Message) -> Any:
        """A read-back call; None for NOT_FOUND."""
        try:
            return getattr(self.stub, rpc_name)(request, timeout=CALL_TIMEOUT)
        except grpc.RpcError as exc:
            if cast(grpc.Call, exc).code() is grpc.StatusCode.NOT_FOUND:
                return None
            raise


def _show(request: Message | bytes | None) -> str:
    if request is None:
        return "-"
    text = (
        repr(request[:120])
        if isinstance(request, bytes)
        else text_format.MessageToString(request, as_one_line=True)
    )
    return text if len(text) <= 400 else text[:400] + f"... ({len(text)} characters)"


def _parse(method: pbd.MethodDescriptor, payload: bytes) -> Message | None:
    """The request as the server's deserializer reads ``payload``; None if it cannot."""
    try:
        return message_factory.GetMessageClass(method.input_type).FromString(payload)
    except DecodeError:
        return None


@pytest.fixture(scope="module")
def module_prefix(etcd: EmbeddedEtcd) -> Iterator[str]:
    """A key prefix for the whole module (conftest's ``prefix`` is per test)."""
    key_prefix = f"{TEST_KEY_ROOT}{uuid.uuid4().hex}/"
    yield key_prefix
    delete_prefix_blocking(etcd.endpoint, key_prefix)
    delete_prefix_blocking(etcd.endpoint, key_prefix.rstrip("/") + "-presence/")


@pytest.fixture(scope="module")
def target(etcd: EmbeddedEtcd, module_prefix: str) -> Iterator[Target]:
    """One server process for the module's mitigation fuzzing (no agent ever connects)."""
    server = ServerProcess(etcd.endpoint, module_prefix)
    channel = grpc.insecure_channel(server.address)
    probe = EtcdProbe(etcd.endpoint)
    fuzzed = Target(server, channel, probe, module_prefix)
    fuzzed.stub = mitigation_pb2_grpc.MitigationServiceStub(channel)
    try:
        yield fuzzed
    finally:
        channel.close()
        probe.close()
        server.stop()


# ---------------------------------------------------------------- the oracle


def _note_outcome(method: str, reply: Reply) -> None:
    """Count outcomes in hypothesis' statistics (``--hypothesis-show-statistics``)."""
    if not currently_in_test_context():
        return
    outcome = reply.code.name
    result = getattr(reply.response, "result", None)
    if result is not None:
        outcome = "OK written" if result.changed else "OK dry run" if result.dry_run else "OK same"
    event(f"{method}: {outcome}")


def check_call(
    target: Target, method: pbd.MethodDescriptor, payload: bytes, request: Message | None
) -> Reply:
    """Call ``method`` with ``payload`` and check everything that must hold (module doc).

    ``request`` is ``payload`` as the server decodes it (None: it does not decode).
    """
    what = f"{method.name}({_show(request if request is not None else payload)})"
    target.alive()
    before = target.etcd.revision()
    reply = target.invoke(method, payload)
    after = target.etcd.revision()
    target.alive()
    assert reply.code is not grpc.StatusCode.DEADLINE_EXCEEDED, (
        f"{what}: no answer within {CALL_TIMEOUT}s: the server hung"
    )
    _note_outcome(method.name, reply)
    if reply.code is grpc.StatusCode.OK:
        assert request is not None, f"{what}: the server accepted bytes that do not decode"
        assert reply.response is not None, f"{what}: the stream ended without a response"
        _check_accepted(target, method.name, request, reply.response, before, after, what)
        return reply
    if request is None:
        # grpc.aio's answer to bytes its request deserializer cannot read (see module doc).
        assert reply.code is grpc.StatusCode.UNKNOWN, f"{what}: {reply.code} {reply.details!r}"
        assert "Error parsing message" in reply.details, f"{what}: {reply.details!r}"
    else:
        assert reply.code in DOCUMENTED_CODES, (
            f"{what}: refused with {reply.code.name}, not a documented code: {reply.details!r}"
        )
        assert reply.details.strip(), f"{what}: {reply.code.name} without details"
        assert "Traceback" not in reply.details, f"{what}: a traceback: {reply.details!r}"
        assert not reply.details.startswith("Unexpected <class"), f"{what}: {reply.details!r}"
    target.unchanged(before, after, f"{what} refused with {reply.code.name}")
    return reply


def _check_accepted(
    target: Target, method: str, request: Any, response: Any, before: int, after: int, what: str
) -> None:
    if method in READS:
        target.unchanged(before, after, f"{what} (a read)")
        if method == "WatchChanges":
            assert not response.changes, f"{what}: the first response carries changes"
            assert 0 < response.revision <= after, f"{what}: starts after {response.revision}"
        return
    if method not in READBACKS:
        return  # a new RPC: test_every_rpc_has_an_oracle fails until it has one
    # A message of another type decodes with unknown fields; the server ignores them.
    request = type(request).FromString(request.SerializeToString())
    request.DiscardUnknownFields()
    result = response.result
    if result.dry_run or not result.changed:
        assert not (result.dry_run and result.changed), f"{what}: a dry run says it changed"
        assert result.revision == 0, f"{what}: nothing written, yet revision {result.revision}"
        target.unchanged(before, after, f"{what} (dry run or unchanged)")
    else:
        assert before < result.revision <= after, (
            f"{what}: written at {result.revision}, outside ({before}, {after}]"
        )
    READBACKS[method](target, request, response, what)


# -- read-backs: what the server answered and what it reads back agree with what was sent


def _us(ts: timestamp_pb2.Timestamp) -> int:
    """A time in microseconds, floored as the server reads it."""
    return int(ts.seconds) * 10**6 + int(ts.nanos) // 1000


def _canonical_json(text: str) -> str:
    return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _same_value(sent: t.FlagValue, got: t.FlagValue, what: str) -> None:
    kind = sent.WhichOneof("kind")
    assert got.WhichOneof("kind") == kind, f"{what}: sent a {kind}, read {got}"
    if kind == "json_value":
        assert got.json_value == _canonical_json(sent.json_value), f"{what}: {got.json_value!r}"
    elif kind == "number_value":
        # == on purpose: -0.0 is stored as the integer 0 (module doc).
        assert got.number_value == sent.number_value, f"{what}: {got.number_value!r}"
    else:
        assert getattr(got, kind) == getattr(sent, kind), f"{what}: {got}"


def _without_negative_zero(record: Any) -> Any:
    """A copy of a Flag with a number value of -0.0 made 0.0 (stored as the integer 0)."""
    copy = type(record)()
    copy.CopyFrom(record)
    node = copy
    while node is not None:
        value = getattr(node, "value", None)
        if value is not None and value.WhichOneof("kind") == "number_value":
            value.number_value += 0.0
        node = node.replaced if node.HasField("replaced") else None
    return copy


def _same_record(answered: Any, read: Any, what: str) -> None:
    """The record a write answered is the one read back, field for field."""
    assert read is not None, f"{what}: answered {_show(answered)}, reads back nothing"
    if isinstance(answered, t.Flag):
        answered = _without_negative_zero(answered)
    assert read == answered, f"{what}: answered {_show(answered)}, reads {_show(read)}"


def _same_meta(opts: t.WriteOptions, meta: t.Meta, what: str, *, bundle_id: str = "") -> None:
    assert meta.reason == opts.reason.strip(), f"{what}: reason {meta.reason!r}"
    assert meta.incident == opts.incident.strip(), f"{what}: incident {meta.incident!r}"
    assert meta.actor == (opts.actor.strip() or "unknown"), f"{what}: actor {meta.actor!r}"
    assert not meta.actor_authenticated, f"{what}: authenticated without authentication"
    assert meta.bundle_id == bundle_id, f"{what}: bundle {meta.bundle_id!r}"
    if opts.HasField("expires_at"):
        assert _us(meta.expires_at) == _us(opts.expires_at), f"{what}: {meta.expires_at}"
    elif opts.HasField("ttl"):
        ttl_us = opts.ttl.ToTimedelta() // timedelta(microseconds=1)
        # expires_at = the time the options were read + ttl; set_at is a little later.
        lag = ttl_us - (_us(meta.expires_at) - _us(meta.set_at))
        assert 0 <= lag < 5 * 10**6, f"{what}: ttl {ttl_us} us, record {meta}"
    else:
        assert not meta.HasField("expires_at"), f"{what}: expires without an expiry sent"


def _new_record(result: t.WriteResult) -> bool:
    """Whether the answered record is the one the request made (else the one in force)."""
    return result.changed or (result.dry_run and result.would_change)


def _readback_set_flag(target: Target, req: Any, resp: Any, what: str) -> None:
    if _new_record(resp.result):
        _same_value(req.value, resp.flag.value, what)
        _same_meta(req.options, resp.flag.meta, what)
        assert (resp.flag.scope, resp.flag.name) == (req.scope, req.name), what
    if resp.result.dry_run:
        return
    read = target.get("GetFlag", m.GetFlagRequest(scope=req.scope, name=req.name))
    assert read is not None, f"{what}: the flag reads back as not set"
    # Unchanged: the value was in force already (the record is the earlier write's).
    _same_value(req.value, read.flag.value, what)
    if resp.result.changed:
        _same_record(resp.flag, read.flag, what)


def _readback_cleared(get: str, make: Callable[[Any], Message], field_name: str) -> Any:
    def readback(target: Target, req: Any, resp: Any, what: str) -> None:
        if not resp.result.changed:
            return
        read = target.get(get, make(req))
        if resp.HasField("restored"):
            _same_record(resp.restored, getattr(read, field_name, None), what)
        else:
            assert read is None, f"{what}: cleared, yet reads {_show(read)}"

    return readback


def _readback_set_shedding(target: Target, req: Any, resp: Any, what: str) -> None:
    tier = req.tier or t.SHEDDABLE
    if _new_record(resp.result):
        assert (resp.shedding.tier, resp.shedding.percent) == (tier, req.percent), what
        _same_meta(req.options, resp.shedding.meta, what)
    if resp.result.dry_run:
        return
    read = target.get("GetShedding", m.GetSheddingRequest(service=req.service))
    assert read is not None, f"{what}: the shedding level reads back as not set"
    assert (read.shedding.tier, read.shedding.percent) == (tier, req.percent), (
        f"{what}: reads {_show(read.shedding)}"
    )
    if resp.result.changed:
        _same_record(resp.shedding, read.shedding, what)


def _readback_pin(target: Target, req: Any, resp: Any, what: str) -> None:
    pinned = req.version if isinstance(req, m.PinVersionRequest) else resp.pin.version
    if isinstance(req, m.RollbackRequest):
        assert resp.from_version, f"{what}: a rollback from no version"
        assert pinned and pinned != resp.from_version, f"{what}: {_show(resp)}"
    if _new_record(resp.result):
        assert resp.pin.version == pinned, what
        _same_meta(req.options, resp.pin.meta, what)
    if resp.result.dry_run:
        return
    read = target.get("GetPin", m.GetPinRequest(service=req.service))
    assert read is not None, f"{what}: the pin reads back as not set"
    assert read.pin.version == pinned, f"{what}: reads {_show(read.pin)}"
    if resp.result.changed:
        _same_record(resp.pin, read.pin, what)


def _known_good(target: Target, service: str) -> dict[str, t.KnownGood]:
    read = target.get("ListKnownGood", m.ListKnownGoodRequest(service=service))
    return {k.version: k for k in read.known_good}


def _readback_mark(target: Target, req: Any, resp: Any, what: str) -> None:
    marks = _known_good(target, req.service)
    if resp.result.dry_run:
        return
    assert req.version in marks, f"{what}: not among {sorted(marks)}"
    if resp.result.changed:
        _same_meta(req.options, resp.known_good.meta, what)
        _same_record(resp.known_good, marks[req.version], what)


def _readback_unmark(target: Target, req: Any, resp: Any, what: str) -> None:
    if resp.result.dry_run:
        return
    assert req.version not in _known_good(target, req.service), f"{what}: still marked"


def _readback_apply_bundle(target: Target, req: Any, resp: Any, what: str) -> None:
    if not resp.result.changed:
        return  # unchanged: no bundle, or the applied twin (its own options)
    bundle = resp.bundle
    assert list(bundle.changes) == list(req.changes), (
        f"{what}: the bundle answers other changes: {_show(bundle)}"
    )
    assert bundle.name == req.name, what
    _same_meta(req.options, bundle.meta, what, bundle_id=bundle.id)
    if resp.result.dry_run:
        return
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=bundle.id))
    assert read is not None, f"{what}: bundle {bundle.id} reads back as absent"
    assert read.bundle.state == m.APPLIED, f"{what}: {_show(read.bundle)}"
    _same_record(bundle, read.bundle, what)
    for change in req.changes:
        if change.HasField("set_flag"):
            sf = change.set_flag
            if f"flags/{sf.scope}/{sf.name}" in bundle.keys:
                flag = target.get("GetFlag", m.GetFlagRequest(scope=sf.scope, name=sf.name))
                assert flag is not None, f"{what}: {sf.scope}/{sf.name} not set"
                _same_value(sf.value, flag.flag.value, what)
                _same_meta(req.options, flag.flag.meta, what, bundle_id=bundle.id)


def _readback_revert(target: Target, req: Any, resp: Any, what: str) -> None:
    if not resp.result.changed:
        return
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=req.bundle_id))
    assert read is not None, f"{what}: the bundle reads back as absent"
    assert read.bundle.state == m.REVERTED, f"{what}: {_show(read.bundle)}"
    assert read.bundle.reverted.reason == req.options.reason.strip(), what
    _same_record(resp.bundle, read.bundle, what)


READBACKS: dict[str, Callable[[Target, Any, Any, str], None]] = {
    "SetFlag": _readback_set_flag,
    "ClearFlag": _readback_cleared(
        "GetFlag", lambda r: m.GetFlagRequest(scope=r.scope, name=r.name), "flag"
    ),
    "SetShedding": _readback_set_shedding,
    "ClearShedding": _readback_cleared(
        "GetShedding", lambda r: m.GetSheddingRequest(service=r.service), "shedding"
    ),
    "PinVersion": _readback_pin,
    "UnpinVersion": _readback_cleared(
        "GetPin", lambda r: m.GetPinRequest(service=r.service), "pin"
    ),
    "MarkKnownGood": _readback_mark,
    "UnmarkKnownGood": _readback_unmark,
    "Rollback": _readback_pin,
    "ApplyBundle": _readback_apply_bundle,
    "RevertBundle": _readback_revert,
}


# ---------------------------------------------------------------- the tests: MitigationService

UNARY_AND_SERVER_STREAMING = sorted(name for name, md in METHODS.items() if not md.client_streaming)


def test_every_rpc_has_an_oracle() -> None:
    """A new RPC is fuzzed by the generic tests at once; say here whether it writes."""
    assert set(METHODS) == READS | set(READBACKS), (
        "classify the new RPCs as READS or give them a read-back in READBACKS: "
        f"{sorted(set(METHODS) ^ (READS | set(READBACKS)))}"
    )
    assert set(VALID_REQUESTS) == set(METHODS), (
        f"give the new RPCs a valid request: {sorted(set(METHODS) ^ set(VALID_REQUESTS))}"
    )


@pytest.mark.parametrize("method", UNARY_AND_SERVER_STREAMING)
@budget(quick=6, full=80)
@given(data=st.data())
def test_any_request(target: Target, method: str, data: st.DataObject) -> None:
    """Any message of the request type (generic strategy)."""
    md = METHODS[method]
    request = data.draw(messages(md.input_type), label="request")
    check_call(target, md, request.SerializeToString(), request)


@pytest.mark.parametrize("method", UNARY_AND_SERVER_STREAMING)
@budget(quick=7, full=90)
@given(data=st.data())
def test_mostly_valid_request(target: Target, method: str, data: st.DataObject) -> None:
    """A valid request with at most one field replaced (targeted strategy)."""
    md = METHODS[method]
    request = data.draw(targeted(method), label="request")
    check_call(target, md, request.SerializeToString(), request)


@budget(quick=40, full=600)
@given(method=st.sampled_from(UNARY_AND_SERVER_STREAMING), data=st.data())
def test_wrong_types(target: Target, method: str, data: st.DataObject) -> None:
    """Bytes that are not a request of the method, and requests of other methods."""
    md = METHODS[method]
    payload = data.draw(wrong_payloads(method), label="payload")
    check_call(target, md, payload, _parse(md, payload))


def test_a_message_over_the_size_limit_is_refused(target: Target) -> None:
    """5 MiB, over the server's 4 MiB --max-message-bytes: RESOURCE_EXHAUSTED, nothing written."""
    request = m.SetFlagRequest(
        scope="global",
        name="big",
        value=t.FlagValue(string_value="x" * (5 * 1024 * 1024)),
        options=t.WriteOptions(reason="too big"),
    )
    reply = check_call(target, METHODS["SetFlag"], request.SerializeToString(), request)
    assert reply.code is grpc.StatusCode.RESOURCE_EXHAUSTED, reply


@budget(quick=6, full=60)
@given(apply=_apply_bundle(), revert=targeted("RevertBundle"))
def test_revert_of_an_applied_bundle(
    target: Target, apply: m.ApplyBundleRequest, revert: m.RevertBundleRequest
) -> None:
    """RevertBundle, mostly valid, of a bundle just applied (the targeted strategy alone
    names bundles that do not exist). Everything is drawn before the first call: what the
    server answers must not change what is drawn, or hypothesis cannot replay a failure."""
    apply.options.dry_run = False
    applied = check_call(target, METHODS["ApplyBundle"], apply.SerializeToString(), apply)
    if applied.code is not grpc.StatusCode.OK or not applied.response.HasField("bundle"):
        return
    request: Any = m.RevertBundleRequest.FromString(revert.SerializeToString())
    if re.fullmatch(r"[0-9]{8}-[0-9]{6}-.*-[0-9a-f]{4}", request.bundle_id):
        request.bundle_id = applied.response.bundle.id
    check_call(target, METHODS["RevertBundle"], request.SerializeToString(), request)


@budget(quick=6, full=60)
@given(
    service=services(),
    marked=st.lists(versions(), min_size=1, max_size=3, unique=True),
    rollback=targeted("Rollback"),
)
def test_rollback_to_a_marked_version(
    target: Target, service: str, marked: list[str], rollback: m.RollbackRequest
) -> None:
    """Rollback, mostly valid, of a service with known-good versions."""
    for version in marked:
        mark = m.MarkKnownGoodRequest(
            service=service, version=version, options=t.WriteOptions(reason="fuzz: known good")
        )
        reply = check_call(target, METHODS["MarkKnownGood"], mark.SerializeToString(), mark)
        assert reply.code is grpc.StatusCode.OK, reply
    request: Any = m.RollbackRequest.FromString(rollback.SerializeToString())
    if request.service in SERVICES or re.fullmatch(_SERVICE_RE, request.service):
        request.service = service
    check_call(target, METHODS["Rollback"], request.SerializeToString(), request)


# ---------------------------------------------------------------- the tests: AgentService.Sync

SYNC_TIMEOUT = 10.0


@dataclass
class AgentTarget:
    """A server process of the Sync tests' own (agents connect to it; its presence writes
    would disturb the revision oracle of the module's server)."""

    server: ServerProcess
    channel: grpc.Channel
    etcd: EtcdProbe
    prefix: str
    known_revision: int
    agents: Any = None
    mitigation: Any = None

    def alive(self) -> None:
        assert self.server.proc.poll() is None, (
            f"the server process died (exit {self.server.proc.returncode}):\n"
            + "".join(self.server.output[-40:])
        )

    def connected(self, service: str) -> set[str]:
        status = self.mitigation.GetStatus(
            m.GetStatusRequest(service=service), timeout=CALL_TIMEOUT
        )
        return {i.instance_id for i in status.instances if i.connected}


@pytest.fixture
def agent_target(etcd: EmbeddedEtcd, prefix: str) -> Iterator[AgentTarget]:
    server = ServerProcess(etcd.endpoint, prefix)
    channel = grpc.insecure_channel(server.address)
    probe = EtcdProbe(etcd.endpoint)
    fuzzed = AgentTarget(server, channel, probe, prefix, 0)
    fuzzed.agents = agent_pb2_grpc.AgentServiceStub(channel)
    fuzzed.mitigation = mitigation_pb2_grpc.MitigationServiceStub(channel)
    try:
        # The revision a first agent gets: Hellos claim at most this much (see sync_check).
        hello = a.Hello(service="probe", instance_id="probe-0")
        call, outbox = open_sync(fuzzed, a.SyncRequest(hello=hello))
        fuzzed.known_revision = next(call).snapshot.revision
        half_close(call, outbox)
        yield fuzzed
    finally:
        channel.close()
        probe.close()
        server.stop()


def open_sync(
    agent: AgentTarget, first: a.SyncRequest, timeout: float = SYNC_TIMEOUT
) -> tuple[Any, queue.Queue[a.SyncRequest | None]]:
    """A Sync stream opened with ``first``; put more messages in the returned outbox, and
    ``None`` to half-close (:func:`half_close`)."""
    outbox: queue.Queue[a.SyncRequest | None] = queue.Queue()
    outbox.put(first)
    return agent.agents.Sync(iter(outbox.get, None), timeout=timeout), outbox


def half_close(call: Any, outbox: queue.Queue[a.SyncRequest | None]) -> grpc.StatusCode:
    """Close the agent's side, as an agent that stops does, and read the stream to its end:
    the status the server ends the call with."""
    outbox.put(None)
    with contextlib.suppress(grpc.RpcError):
        for _ in call:
            pass
    return cast(grpc.StatusCode, call.code())


def hello_is_valid(first: a.SyncRequest) -> bool:
    """Whether the server must accept ``first`` as the opening of a stream."""
    if first.WhichOneof("message") != "hello":
        return False
    hello = first.hello
    try:
        model.validate_service(hello.service)
    except InvalidArgumentError:
        return False
    return bool(_INSTANCE_RE.fullmatch(hello.instance_id)) and hello.last_applied_revision >= 0


@st.composite
def hellos(draw: st.DrawFn) -> a.SyncRequest:
    """A valid Hello (sometimes with a valid override), most of the time with one field
    replaced; or any SyncRequest."""
    if draw(st.integers(0, 3)) == 0:
        return cast(a.SyncRequest, draw(messages(a.SyncRequest.DESCRIPTOR)))
    hello = a.Hello(
        service=draw(services()),
        instance_id=draw(st.from_regex(_INSTANCE_RE, fullmatch=True)),
        running_version=draw(st.just("") | versions()),
        agent_version=draw(st.sampled_from(["", "0.1.0"])),
    )
    if draw(st.booleans()):
        hello.override.CopyFrom(
            a.Override(
                active=draw(st.booleans()),
                reason=draw(reasons()),
                actor=draw(actors()),
                content_json=draw(
                    st.builds(
                        json.dumps, st.dictionaries(st.text(max_size=5), json_values(), max_size=3)
                    )
                ),
            )
        )
    request = a.SyncRequest(hello=hello)
    if draw(st.integers(0, 3)) != 0:
        path, f = draw(st.sampled_from(_leaf_paths(request)))
        _set_path(request, path, f, draw(st.none() | field_values(f)))
    return request


def sync_check(agent: AgentTarget, first: a.SyncRequest, follow: list[a.SyncRequest]) -> str | None:
    """Open Sync with ``first``, send ``follow``, half-close, and check everything that must
    hold (module doc). The kind of the server's first message; None if it refused ``first``."""
    first = a.SyncRequest.FromString(first.SerializeToString())
    hello = first.hello
    # A Hello may claim a revision the server has not seen: it then waits CATCH_UP_TIMEOUT
    # (5 s) for it, by design. One test does that (test_sync_hello_ahead_of_the_server);
    # here positive revisions are folded to ones the server had when the test started.
    if first.WhichOneof("message") == "hello" and hello.last_applied_revision > 0:
        hello.last_applied_revision %= agent.known_revision + 1
    what = f"Sync({_show(first)}; then {[_show(f) for f in follow]})"
    valid = hello_is_valid(first)
    start = len(agent.server.output)
    agent.alive()
    before = agent.etcd.keys(agent.prefix)
    # The ack reader handles messages in order: once it audited this override it handled
    # the follow-ups.
    token = f"fuzz-sentinel-{uuid.uuid4().hex}"
    sentinel = a.SyncRequest(override=a.Override(active=True, reason=token, digest=token))
    call, outbox = open_sync(agent, first)
    try:
        try:
            kind: str | None = next(call).WhichOneof("message")
        except grpc.RpcError as exc:
            err = cast(grpc.Call, exc)
            code, details = err.code(), err.details() or ""
            agent.alive()
            assert code is not grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: no answer: hung"
            if currently_in_test_context():
                event(f"Sync: {code.name}")
            assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{what}: {code.name} {details!r}"
            assert not valid, f"{what}: a valid Hello refused: {details!r}"
            assert details.strip() and "Traceback" not in details, f"{what}: {details!r}"
            assert agent.etcd.keys(agent.prefix) == before, f"{what}: refused, yet wrote"
            return None
        if currently_in_test_context():
            event(f"Sync: {kind}")
        assert valid, f"{what}: an invalid first message accepted, answered with {kind}"
        assert kind in ("snapshot", "resume"), f"{what}: the stream opens with {kind}"
        for message in [*follow, sentinel]:
            outbox.put(message)
        code = half_close(call, outbox)
    finally:
        call.cancel()
        outbox.put(None)
    agent.alive()
    assert code is grpc.StatusCode.OK, f"{what}: half-closed, ends with {code.name}"
    instance = re.escape(json.dumps(hello.instance_id))
    gone = rf'"instance_id": {instance}, "applied": -?\d+, "event": "agent_disconnected"'
    agent.server.wait_output(gone, timeout=CALL_TIMEOUT, start=start)
    lines = agent.server.output[start:]
    assert any(token in line for line in lines), (
        f"{what}: the stream ended on a follow-up message:\n" + "".join(lines[-20:])
    )
    errors = [line for line in lines if '"level": "error"' in line or "Traceback" in line]
    assert not errors, f"{what}: the server logged errors:\n{''.join(errors)}"
    assert hello.instance_id not in agent.connected(hello.service), (
        f"{what}: still connected after the stream ended"
    )
    return kind


@budget(quick=30, full=400)
@given(first=hellos(), follow=st.lists(messages(a.SyncRequest.DESCRIPTOR), max_size=3))
def test_sync(agent_target: AgentTarget, first: a.SyncRequest, follow: list[a.SyncRequest]) -> None:
    """Sync's first message is a Hello or INVALID_ARGUMENT; nothing after it breaks the stream."""
    sync_check(agent_target, first, follow)


@pytest.mark.skipif(not FULL, reason="waits CATCH_UP_TIMEOUT (5 s): in the full fault run only")
def test_sync_hello_ahead_of_the_server(agent_target: AgentTarget) -> None:
    """A Hello claiming a revision etcd never had gets a snapshot after the catch-up wait."""
    hello = a.Hello(service="svc-a", instance_id="ahead", last_applied_revision=2**63 - 1)
    call, outbox = open_sync(agent_target, a.SyncRequest(hello=hello))
    try:
        assert next(call).WhichOneof("message") == "snapshot"
        assert half_close(call, outbox) is grpc.StatusCode.OK
    finally:
        call.cancel()
        outbox.put(None)


# ---------------------------------------------------------------- the tests: examples found


def test_an_agent_half_closing_gets_ok_at_once(agent_target: AgentTarget) -> None:
    """An agent that closes its side after the snapshot gets OK at once, not at its deadline."""
    # Found by this fuzzer: the call stayed open until the client's deadline.
    hello = a.Hello(service="svc-a", instance_id="half-closing")
    # The status is due at once: two seconds are plenty.
    call, outbox = open_sync(agent_target, a.SyncRequest(hello=hello), timeout=2.0)
    try:
        assert next(call).WhichOneof("message") == "snapshot"
        code = half_close(call, outbox)
    finally:
        call.cancel()
        outbox.put(None)
    assert code is grpc.StatusCode.OK, f"{code.name}: {call.details()!r}"
    assert hello.instance_id not in agent_target.connected("svc-a")


_BAD_OVERRIDES = {
    "expires_at": a.Override(active=True, expires_at=timestamp_pb2.Timestamp(seconds=10**15)),
    "deep_json": a.Override(active=True, content_json="[" * 100_000),
    "surrogate": a.Override(active=True, content_json='{"a": "\\ud800"}'),
}


@pytest.mark.parametrize("case", sorted(_BAD_OVERRIDES))
def test_a_bad_override_is_audited_and_the_stream_goes_on(
    agent_target: AgentTarget, case: str
) -> None:
    """An override with a time out of range, JSON nested too deep or a lone surrogate escape,
    in the Hello and after it: a snapshot, both audited, and a clean end at the half-close."""
    # Found by this fuzzer: the stream failed with UNKNOWN and the instance stayed connected.
    bad = _BAD_OVERRIDES[case]
    again = a.Override(digest="sent-again")
    again.MergeFrom(bad)
    hello = a.Hello(service="svc-a", instance_id=f"bad-override-{case}", override=bad)
    start = len(agent_target.server.output)
    kind = sync_check(agent_target, a.SyncRequest(hello=hello), [a.SyncRequest(override=again)])
    assert kind == "snapshot", kind
    audited = [
        line
        for line in agent_target.server.output[start:]
        if '"event": "override_reported"' in line and hello.instance_id in line
    ]
    # The Hello's override, the one after it, and sync_check's own.
    assert len(audited) == 3, "".join(agent_target.server.output[start:])


_FAR = timestamp_pb2.Timestamp(seconds=2**62)  # beyond datetime on any platform
_FOREVER = duration_pb2.Duration(seconds=10**15)  # beyond timedelta
_SURROGATE = t.FlagValue(json_value='{"a": "\\ud800"}')


def _set_flag(value: t.FlagValue, **options: Any) -> m.SetFlagRequest:
    return m.SetFlagRequest(
        scope="global", name="unheld", value=value, options=t.WriteOptions(reason="r", **options)
    )


# What no record can hold: (method, request, the field the refusal names).
_UNHELD: dict[str, tuple[str, Message, str]] = {
    "ttl": ("SetFlag", _set_flag(t.FlagValue(bool_value=True), ttl=_FOREVER), "options.ttl"),
    "expires_at": (
        "SetFlag",
        _set_flag(t.FlagValue(bool_value=True), expires_at=_FAR),
        "options.expires_at",
    ),
    "json": ("SetFlag", _set_flag(_SURROGATE), "value"),
    "bundle_json": (
        "ApplyBundle",
        m.ApplyBundleRequest(
            name="unheld",
            changes=[
                m.BundleChange(
                    set_flag=m.SetFlagRequest(scope="global", name="unheld", value=_SURROGATE)
                )
            ],
            options=t.WriteOptions(reason="r"),
        ),
        "changes[0].set_flag.value",
    ),
    "since": ("ListHistory", m.ListHistoryRequest(since=_FAR), "since"),
    "until": ("ListHistory", m.ListHistoryRequest(until=_FAR), "until"),
    "timeout": (
        "WaitApplied",
        m.WaitAppliedRequest(service="a", revision=1, timeout=_FOREVER),
        "timeout",
    ),
}


@pytest.mark.parametrize("case", sorted(_UNHELD))
def test_a_value_no_record_can_hold_is_invalid_argument(target: Target, case: str) -> None:
    """A duration or time beyond what datetime holds, JSON with a lone surrogate escape:
    INVALID_ARGUMENT naming the field, and nothing written (check_call reads etcd)."""
    # Found by this fuzzer: each failed with INTERNAL.
    method, request, field_name = _UNHELD[case]
    reply = check_call(target, METHODS[method], request.SerializeToString(), request)
    assert reply.code is grpc.StatusCode.INVALID_ARGUMENT, reply
    assert reply.details.startswith(f"{field_name}: "), reply.details


def test_a_bundle_clearing_a_time_boxed_layer_is_applied_and_reverts(target: Target) -> None:
    """A bundle whose clear brings back the record under a time-boxed layer reads back
    APPLIED, and reverting it puts the layer back."""
    # Found by this fuzzer: it read PARTIALLY_OVERRIDDEN at once and reverting was ABORTED.
    get = m.GetFlagRequest(scope="global", name="layered")
    for value, opts in (
        (True, t.WriteOptions(reason="base")),
        (False, t.WriteOptions(reason="layer", ttl=duration_pb2.Duration(seconds=7200))),
    ):
        target.stub.SetFlag(
            m.SetFlagRequest(
                scope=get.scope, name=get.name, value=t.FlagValue(bool_value=value), options=opts
            ),
            timeout=CALL_TIMEOUT,
        )
    clear = m.BundleChange(clear_flag=m.ClearFlagRequest(scope=get.scope, name=get.name))
    apply = m.ApplyBundleRequest(
        name="layered", changes=[clear], options=t.WriteOptions(reason="r")
    )
    applied = check_call(target, METHODS["ApplyBundle"], apply.SerializeToString(), apply)
    assert applied.code is grpc.StatusCode.OK, applied
    read = target.get("GetBundle", m.GetBundleRequest(bundle_id=applied.response.bundle.id))
    assert read.bundle.state == m.APPLIED, read.bundle
    assert target.get("GetFlag", get).flag.value.bool_value is True
    revert = m.RevertBundleRequest(
        bundle_id=applied.response.bundle.id, options=t.WriteOptions(reason="r")
    )
    reverted = check_call(target, METHODS["RevertBundle"], revert.SerializeToString(), revert)
    assert reverted.code is grpc.StatusCode.OK, reverted
    assert reverted.response.bundle.state == m.REVERTED, reverted
    layer = target.get("GetFlag", get).flag
    assert (layer.value.bool_value, layer.meta.reason) == (False, "layer"), layer
