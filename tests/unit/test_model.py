"""Pure tests of validation, records and the protobuf bridge."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import duration_pb2

from controlplane import model
from controlplane._durations import parse_duration
from controlplane.api.v1 import types_pb2 as pb
from controlplane.errors import ConflictError, InvalidArgumentError
from controlplane.model import Flag, Meta, Pin, PinHistory, RecordError, Shedding, Tier
from controlplane.store import normalize_endpoints

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
META = Meta(actor="oncall", reason="errors", set_at=NOW, incident="INC-42")


@pytest.mark.parametrize("name", ["checkout", "payments-api", "a", "x" * 63, "9lives"])
def test_valid_service_names(name: str) -> None:
    assert model.validate_service(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "required"),
        ("Checkout", "not a service name"),
        ("-checkout", "not a service name"),
        ("checkout-", "not a service name"),
        ("x" * 64, "not a service name"),
        ("check_out", "not a service name"),
        ("global", "scope of every service"),
    ],
)
def test_invalid_service_names_name_the_rule(name: str, rule: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        model.validate_service(name)
    assert info.value.field == "service"
    assert rule in info.value.rule


@pytest.mark.parametrize("name", ["new-ui", "checkout.mode", "a_b", "0", "x" * 128])
def test_valid_flag_names(name: str) -> None:
    assert model.validate_flag_name(name) == name


@pytest.mark.parametrize("name", ["", "New", ".x", "x" * 129, "a b", "a/b", "é"])
def test_invalid_flag_names(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        model.validate_flag_name(name)


@pytest.mark.parametrize("value", [-0.1, 100.01, float("nan"), float("inf")])
def test_percent_out_of_range(value: float) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        model.validate_percent(value)
    assert "0 to 100" in info.value.rule


def test_write_options_validation() -> None:
    opts = model.write_options_from_proto(
        pb.WriteOptions(reason="  why  ", incident="INC-42", actor="me"), now=NOW
    )
    assert (opts.reason, opts.incident, opts.actor, opts.expires_at) == (
        "why",
        "INC-42",
        "me",
        None,
    )
    ttl = model.write_options_from_proto(
        pb.WriteOptions(reason="x", ttl=duration_pb2.Duration(seconds=1800)), now=NOW
    )
    assert ttl.expires_at == NOW + timedelta(minutes=30)
    assert model.write_options_from_proto(pb.WriteOptions(reason="x"), now=NOW).actor == "unknown"
    cas = model.write_options_from_proto(
        pb.WriteOptions(reason="x", expected_mod_revision=0), now=NOW
    )
    assert cas.expected_mod_revision == 0
    assert (
        model.write_options_from_proto(pb.WriteOptions(reason="x"), now=NOW).expected_mod_revision
        is None
    )
    with pytest.raises(InvalidArgumentError, match=r"options\.reason"):
        model.write_options_from_proto(pb.WriteOptions(), now=NOW)
    with pytest.raises(InvalidArgumentError, match="control characters"):
        model.write_options_from_proto(pb.WriteOptions(reason="a\nb"), now=NOW)
    with pytest.raises(InvalidArgumentError, match=r"options\.ttl"):
        model.write_options_from_proto(
            pb.WriteOptions(reason="x", ttl=duration_pb2.Duration(seconds=91 * 86400)), now=NOW
        )
    past = model.datetime_to_timestamp(NOW - timedelta(seconds=1))
    with pytest.raises(InvalidArgumentError, match=r"is in the past: it is now .* --ttl"):
        model.write_options_from_proto(pb.WriteOptions(reason="x", expires_at=past), now=NOW)
    with pytest.raises(InvalidArgumentError, match="cannot expire"):
        model.write_options_from_proto(
            pb.WriteOptions(reason="x", ttl=duration_pb2.Duration(seconds=5)),
            now=NOW,
            allow_expiry=False,
        )


def test_flag_value_kinds_and_canonical_keys() -> None:
    assert model.flag_value_from_proto(pb.FlagValue(bool_value=False)) is False
    assert model.flag_value_from_proto(pb.FlagValue(number_value=3)) == 3.0
    assert model.flag_value_from_proto(pb.FlagValue(json_value='{"a": [1]}')) == {"a": [1]}
    assert model.value_key(True) != model.value_key(1.0)
    assert model.value_key(3.0) == "3"
    assert model.value_key({"b": 1, "a": 2}) == model.value_key({"a": 2, "b": 1})
    with pytest.raises(InvalidArgumentError, match="object"):
        model.flag_value_from_proto(pb.FlagValue(json_value="[1]"))
    with pytest.raises(InvalidArgumentError, match="not valid JSON"):
        model.flag_value_from_proto(pb.FlagValue(json_value='{"a": NaN}'))
    deep = "{" + '"a":{' * 40 + "}" * 41
    with pytest.raises(InvalidArgumentError, match="nested deeper"):
        model.flag_value_from_proto(pb.FlagValue(json_value=deep))
    with pytest.raises(InvalidArgumentError, match="required"):
        model.flag_value_from_proto(pb.FlagValue())


def test_records_round_trip_through_json() -> None:
    base = Flag("global", "new-ui", True, META)
    flag = Flag("checkout", "new-ui", False, META, replaced=base)
    assert Flag.from_record(json.loads(json.dumps(flag.to_record()))) == flag
    shed = Shedding("checkout", Tier.SHEDDABLE_PLUS, 50.0, META)
    assert Shedding.from_record(shed.to_record()) == shed
    pin = Pin("checkout", "v1.4.2", META, previous=PinHistory("v1.5.0", "a", "r", NOW))
    assert Pin.from_record(pin.to_record()) == pin
    assert flag.to_proto(7).meta.mod_revision == 7
    assert flag.to_proto().replaced.value.bool_value is True


@pytest.mark.parametrize(
    "data",
    [
        {"kind": "pin"},
        {"kind": "flag", "scope": "checkout", "name": "x", "meta": {}},
        {
            "kind": "flag",
            "scope": "Bad",
            "name": "x",
            "value": True,
            "meta": {"actor": "a", "reason": "r", "set_at": "2026-01-01T00:00:00Z"},
        },
        {
            "kind": "shedding",
            "service": "c",
            "tier": "LOW",
            "percent": 1,
            "meta": {"actor": "a", "reason": "r", "set_at": "2026-01-01T00:00:00Z"},
        },
        {
            "kind": "shedding",
            "service": "c",
            "tier": "SHEDDABLE",
            "percent": "5",
            "meta": {"actor": "a", "reason": "r", "set_at": "2026-01-01T00:00:00Z"},
        },
    ],
)
def test_broken_records_raise_record_error(data: dict[str, object]) -> None:
    with pytest.raises(RecordError):
        (Shedding if data["kind"] == "shedding" else Flag).from_record(data)


def test_decode_record_rejects_non_objects() -> None:
    with pytest.raises(RecordError):
        model.decode_record(b"[1, 2]")
    with pytest.raises(RecordError):
        model.decode_record(b"{")


def test_record_size_limit_names_the_limit() -> None:
    with pytest.raises(InvalidArgumentError, match="64 KiB"):
        model.encode_record({"v": "x" * 70_000})


def test_conflict_error_message_carries_current_revision() -> None:
    assert "current mod revision 12" in ConflictError("/p/flags/g/x", 10, 12).message
    assert "does not exist" in ConflictError("/p/flags/g/x", 10, 0).message


def test_normalize_endpoints() -> None:
    assert normalize_endpoints(["127.0.0.1:2379"]) == ["127.0.0.1:2379"]
    assert normalize_endpoints(["http://10.0.0.1:2379/", " 10.0.0.2:2379 ", ""]) == [
        "10.0.0.1:2379",
        "10.0.0.2:2379",
    ]
    assert normalize_endpoints(["[::1]:2379"]) == ["[::1]:2379"]
    with pytest.raises(ValueError, match="host:port"):
        normalize_endpoints(["localhost"])
    with pytest.raises(ValueError, match="TLS"):
        normalize_endpoints(["https://10.0.0.1:2379"])
    with pytest.raises(ValueError, match="no etcd endpoint"):
        normalize_endpoints([" "])


def test_parse_duration() -> None:
    assert parse_duration("30d") == timedelta(days=30)
    assert parse_duration("1h30m") == timedelta(hours=1, minutes=30)
    for bad in ("", "5", "1x", "m", "-5s"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


@pytest.mark.parametrize(
    "value",
    [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 11, 26, 18, 0, 0, 5, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ],
)
def test_every_time_written_reads_back(value: datetime) -> None:
    # Found by fuzzing: year 1 was written "1-01-01T...", which no parser reads back,
    # and the audit record holding it was then unreadable.
    from controlplane.model import format_time, parse_time

    text = format_time(value)
    assert len(text) == 27
    assert parse_time(text) == value
