"""The cache file: its encoding, and writing and reading it."""

from __future__ import annotations

import contextlib
import json
import random
from datetime import datetime
from typing import Any

import pytest

from agents import _cache, _state
from agents._state import (
    CorruptCacheError,
    Snapshot,
)
from controlplane.api.v1 import types_pb2
from tests.helpers.agent_records import (
    SERVICE,
    T0,
    T1,
    T2,
    chain,
    flag,
    meta,
    shedding,
    snap,
)

# ---------------------------------------------------------------- cache


def full_snapshot(now: datetime = T0) -> Snapshot:
    return snap(
        chain(),
        flag("new-ui", True, scope="global"),
        flag("cfg", {"limits": {"rps": 5}, "on": True}),
        flag("ratio", 0.5, scope="global"),
        shed=shedding(3, 25, expires_at=T1, replaced=shedding(4, 10)),
        pinned=types_pb2.Pin(
            service=SERVICE,
            version="v1.4.2",
            meta=meta(),
            previous=types_pb2.PinHistory(version="v1.5.0", actor="ci", reason="deploy"),
        ),
        revision=77,
        now=now,
    )


def test_the_cache_round_trips_records_layers_and_all() -> None:
    s = full_snapshot()
    data = _cache.snapshot_to_cache(s)
    doc = json.loads(data)
    assert (doc["format"], doc["service"], doc["revision"]) == (1, SERVICE, 77)
    # Protobuf's JSON form, with the layers.
    chained = next(f for f in doc["records"]["flags"] if f["name"] == "f")
    assert chained["value"] == {"string_value": "x"}
    assert chained["replaced"]["value"] == {"bool_value": False}
    assert chained["replaced"]["meta"]["expires_at"] == "2026-11-26T12:30:00Z"

    back = _cache.snapshot_from_cache(data, SERVICE, T0)
    assert back == s
    # Booted later, the agent is where it would have been had it kept running.
    assert _cache.snapshot_from_cache(data, SERVICE, T2) == _state.at(s, T2)
    assert _cache.snapshot_from_cache(data, SERVICE, T1).flags["f"] is True


def test_a_cache_with_fields_this_version_does_not_know_still_loads() -> None:
    doc = json.loads(_cache.snapshot_to_cache(full_snapshot()))
    doc["records"]["flags"][0]["future_field"] = 1
    doc["written_by"] = "a newer agent"
    back = _cache.snapshot_from_cache(json.dumps(doc).encode(), SERVICE, T0)
    assert back == full_snapshot()


def _cache_with(**changes: Any) -> bytes:
    doc = json.loads(_cache.snapshot_to_cache(full_snapshot()))
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not JSON"),
        (b'{"format": 1, "service": "checkout"', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_cache_with(format=2), "format 2"),
        (_cache_with(service="payments"), "for service 'payments', not 'checkout'"),
        (_cache_with(revision="77"), "revision '77'"),
        (_cache_with(revision=-1), "revision -1"),
        (_cache_with(revision=2**63), "revision 9223372036854775808 is not a revision"),
        (_cache_with(revision=10**400), "is not a revision"),
        (_cache_with(revision=True), "revision True"),
        (_cache_with(records=[]), "'records'"),
        (_cache_with(records={"flags": "nope"}), "do not parse"),
        (
            _cache_with(records={"shedding": {"service": SERVICE, "tier": 4, "percent": 250}}),
            "invalid record: shedding: percent 250",
        ),
        (
            _cache_with(records={"flags": [{"scope": "payments", "name": "a"}]}),
            "invalid record: flag 'a' in scope 'payments'",
        ),
    ],
)
def test_an_unusable_cache_says_why(data: bytes, reason: str) -> None:
    with pytest.raises(CorruptCacheError, match=reason):
        _cache.snapshot_from_cache(data, SERVICE, T0)


def _paths(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON document, the root included."""
    found = [path]
    if isinstance(node, dict):
        for key, child in node.items():
            found += _paths(child, (*path, key))
    elif isinstance(node, list):
        for index, child in enumerate(node):
            found += _paths(child, (*path, index))
    return found


def _replaced(doc: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = json.loads(json.dumps(doc))
    node = copy
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = new
    return copy


ODD_JSON: list[Any] = [
    2**63,
    -(2**63) - 1,
    10**400,
    -1,
    1e308,
    0.5,
    None,
    True,
    "",
    "x" * 3000,
    "10000-01-01T00:00:00Z",
    [],
    [None],
    {},
    {"seconds": 2**70},
]


def test_whatever_a_cache_file_holds_the_only_error_is_corrupt_cache() -> None:
    """Every place of a real cache file, given every odd JSON value: a snapshot or
    CorruptCacheError, never another exception (Agent.start() must not raise)."""
    doc = json.loads(_cache.snapshot_to_cache(full_snapshot()))
    outcomes = {"loaded": 0, "corrupt": 0}
    for path in _paths(doc):
        for new in ODD_JSON:
            data = json.dumps(_replaced(doc, path, new)).encode()
            try:
                _cache.snapshot_from_cache(data, SERVICE, T0)
            except CorruptCacheError:
                outcomes["corrupt"] += 1
            else:
                outcomes["loaded"] += 1
    assert outcomes["loaded"] > 0 and outcomes["corrupt"] > 0
    # Byte-level damage too (a fixed seed: the same cases each run).
    rng = random.Random(5)
    data = _cache.snapshot_to_cache(full_snapshot())
    for _ in range(2000):
        damaged = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        with contextlib.suppress(CorruptCacheError):
            _cache.snapshot_from_cache(bytes(damaged), SERVICE, T0)
