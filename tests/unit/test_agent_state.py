"""Pure tests of the agent's snapshot: expiry, flag reads, diff, packaging."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

import pytest

from agents import Criticality, SheddingLevel, _codec, _state
from controlplane.api.v1 import agent_pb2
from tests.helpers.agent_records import (
    SERVICE,
    T0,
    T1,
    T2,
    TICK,
    chain,
    change,
    flag,
    pin,
    shedding,
    snap,
)

# ---------------------------------------------------------------- expiry


def test_a_chain_of_layers_gives_way_one_by_one_at_each_expiry() -> None:
    s = snap(chain())
    assert s.flags["f"] == "x"
    assert s.next_expiry == T2

    assert _state.at(s, T2 - TICK) is s

    s2 = _state.at(s, T2)
    assert s2.flags["f"] is False
    assert s2.next_expiry == T1
    assert s2.revision == s.revision
    assert _state.at(s2, T1 - TICK) is s2

    s3 = _state.at(s2, T1)
    assert s3.flags["f"] is True
    assert s3.next_expiry is None
    assert s3.flag_records[(SERVICE, "f")].replaced is None

    # A timer that fires late skips straight to what applies then.
    late = _state.at(s, T1 + timedelta(hours=1))
    assert late.flags["f"] is True
    assert late.next_expiry is None

    # Built at a later time, the expired layers never apply.
    assert snap(chain(), now=T2 + TICK).flags["f"] is False


def test_a_layer_beneath_a_longer_one_does_not_set_the_next_expiry() -> None:
    # Top until T1, beneath it a layer until T2 < T1: nothing changes at T2.
    mid = flag("f", "mid", expires_at=T2, replaced=flag("f", "base"))
    s = snap(flag("f", "top", expires_at=T1, replaced=mid))
    assert s.next_expiry == T1
    assert _state.at(s, T2).flags["f"] == "top"
    assert _state.at(s, T1).flags["f"] == "base"


def test_an_expiring_service_entry_with_nothing_beneath_gives_way_to_the_global() -> None:
    s = snap(flag("new-ui", True, scope="global"), flag("new-ui", False, expires_at=T1))
    assert s.flags["new-ui"] is False
    after = _state.at(s, T1)
    assert after.flags["new-ui"] is True
    assert after.flag_scopes["new-ui"] == "global"
    assert (SERVICE, "new-ui") not in after.flag_records


def test_shedding_and_pin_expire_and_the_earliest_expiry_wins() -> None:
    s = snap(
        flag("a", True, expires_at=T1 + timedelta(hours=1)),
        shed=shedding(4, 100, expires_at=T1, replaced=shedding(4, 30)),
        pinned=pin("v1.4.2", expires_at=T2),
    )
    assert s.next_expiry == T2
    s = _state.at(s, T2)
    assert s.pin is None
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE, 100.0)
    assert s.next_expiry == T1
    s = _state.at(s, T1)
    assert s.shedding == SheddingLevel(Criticality.SHEDDABLE, 30.0)
    assert s.shed_fraction == pytest.approx(0.3)
    assert s.next_expiry == T1 + timedelta(hours=1)
    s = _state.at(s, T1 + timedelta(hours=1))
    assert s.flags == {}
    assert s.next_expiry is None


def test_a_change_applied_after_an_expiry_is_evaluated_at_its_time() -> None:
    s = snap(flag("a", False, expires_at=T1, replaced=flag("a", True)))
    after = _codec.apply_change(s, change(flags_set=[flag("b", 1.0)]), T1)
    assert after.flags == {"a": True, "b": 1.0}


# ---------------------------------------------------------------- reads


def test_enabled_reads_only_bools_and_value_reads_anything() -> None:
    s = snap(flag("on", True), flag("off", False), flag("mode", "lite"), flag("n", 1.0))
    assert _state.enabled(s, "on", False) is True
    assert _state.enabled(s, "off", True) is False
    # Not a kill switch: the default, not the value's truthiness.
    assert _state.enabled(s, "mode", False) is False
    assert _state.enabled(s, "n", False) is False
    assert _state.enabled(s, "missing", True) is True
    assert _state.value(s, "mode", "full") == "lite"
    assert _state.value(s, "on", None) is True
    assert _state.value(s, "missing", "full") == "full"


# ---------------------------------------------------------------- diff


def test_diff_reports_effective_changes_only() -> None:
    old = snap(
        flag("kill", True),
        flag("gone", "x"),
        flag("cfg", {"a": 1, "b": [1, 2]}),
        flag("same", "v", scope="global"),
        flag("same", "v"),
        flag("n", True),
        shed=shedding(4, 30),
        pinned=pin("v1"),
    )
    new = _codec.apply_change(
        old,
        change(
            flags_set=[
                flag("kill", False),
                flag("new", 2.0),
                flag("cfg", {"b": [1, 2], "a": 1}),
                flag("n", 1.0),
            ],
            flags_removed=[
                agent_pb2.FlagRef(scope=SERVICE, name="gone"),
                # The global one has the same value: nothing a service sees changes.
                agent_pb2.FlagRef(scope=SERVICE, name="same"),
            ],
            shedding=shedding(3, 30),
        ),
        T0,
    )
    d = _state.diff(old, new)
    assert d.revision == 11
    assert d.flags == {
        "kill": (True, False),
        "gone": ("x", None),
        "new": (None, 2.0),
        # True == 1.0 in Python; a kill switch becoming a number is still a change.
        "n": (True, 1.0),
    }
    assert d.shedding == (
        SheddingLevel(Criticality.SHEDDABLE, 30.0),
        SheddingLevel(Criticality.SHEDDABLE_PLUS, 30.0),
    )
    assert d.pin is None
    assert not d.empty

    unpinned = _codec.apply_change(new, change(12, pin_removed=True), T0)
    d2 = _state.diff(new, unpinned)
    assert d2.flags == {} and d2.shedding is None
    assert d2.pin is not None and d2.pin[1] is None and d2.pin[0] is not None
    assert d2.pin[0].version == "v1"

    same = _codec.apply_change(unpinned, change(13, flags_set=[flag("kill", False)]), T0)
    assert _state.diff(unpinned, same).empty


def test_an_expiry_shows_up_in_the_diff() -> None:
    s = snap(chain())
    d = _state.diff(s, _state.at(s, T2))
    assert d.flags == {"f": ("x", False)}
    assert d.revision == s.revision


# ---------------------------------------------------------------- packaging


def test_the_agent_imports_no_server_module() -> None:
    code = (
        "import sys, agents, agents.testing\n"
        "server = sorted(m for m in sys.modules if m.startswith('controlplane')\n"
        "                and not m.startswith('controlplane.api'))\n"
        "heavy = sorted(m for m in ('grpc', 'aetcd', 'structlog', 'prometheus_client', 'yaml')\n"
        "               if m in sys.modules)\n"
        "print(server, heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    # controlplane._files: the standard-library check of files that grant power, shared
    # with the server.
    assert out.stdout.strip() == "['controlplane', 'controlplane._files'] []"
