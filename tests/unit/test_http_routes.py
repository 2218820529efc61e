"""The HTTP mirror's route table, request building and OpenAPI document (no I/O)."""

from __future__ import annotations

import re
import time
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor
from openapi_spec_validator import validate

from controlplane.api.v1 import mitigation_pb2 as m
from controlplane.server._http_context import deadline_of, rfc4514
from controlplane.server._openapi import openapi_document
from controlplane.server._routes import (
    HTTP_STATUS,
    ROUTES,
    SERVICE,
    BadRequest,
    Route,
    build_request,
    render,
)
from controlplane.server.auth import METHOD_RULES

BY_RPC = {route.rpc: route for route in ROUTES}


def test_the_table_has_one_route_for_every_rpc_of_the_service() -> None:
    rpcs = [route.rpc for route in ROUTES]
    assert sorted(rpcs) == sorted(method.name for method in SERVICE.methods)
    assert len(set(rpcs)) == len(rpcs), "an RPC is in the table twice"
    pairs = [(route.verb, route.path) for route in ROUTES]
    assert len(set(pairs)) == len(pairs), "two RPCs on one verb and path"
    for route in ROUTES:
        assert route.full_method in METHOD_RULES, route.rpc  # auth rules know each one
        assert route.verb in ("GET", "PUT", "POST", "DELETE", "PATCH"), route
        assert route.path.startswith("/v1/"), route
        for name in route.path_fields:
            field = route.method.input_type.fields_by_name.get(name)
            assert field is not None, f"{route.rpc}: {{{name}}} is no field of the request"
            assert field.type == FieldDescriptor.TYPE_STRING, (route.rpc, name)
    assert [r.rpc for r in ROUTES if r.streaming] == ["WatchChanges"]


def test_a_route_without_its_rpc_would_be_caught() -> None:
    covered = {route.rpc for route in ROUTES if route.rpc != "GetTimeline"}
    assert covered != {method.name for method in SERVICE.methods}


def test_the_status_table_maps_the_codes_the_brief_names() -> None:
    expected = {
        "INVALID_ARGUMENT": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
        "NOT_FOUND": 404, "ABORTED": 409, "ALREADY_EXISTS": 409, "FAILED_PRECONDITION": 412,
        "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504,
        "UNIMPLEMENTED": 501, "INTERNAL": 500, "CANCELLED": 499,
    }  # fmt: skip
    assert {c.name: HTTP_STATUS[c] for c in grpc.StatusCode if c.name in expected} == expected


def test_path_and_body_make_the_request() -> None:
    body = {"value": {"boolValue": False}, "options": {"reason": "r", "expectedModRevision": "7"}}
    request = build_request(BY_RPC["SetFlag"], {"scope": "checkout", "name": "new-ui"}, [], body)
    assert isinstance(request, m.SetFlagRequest)
    assert (request.scope, request.name) == ("checkout", "new-ui")
    assert request.value.WhichOneof("kind") == "bool_value" and not request.value.bool_value
    assert request.options.expected_mod_revision == 7
    # Proto names are accepted too, and a path field repeated in the body with its value.
    same = build_request(
        BY_RPC["SetFlag"],
        {"scope": "checkout", "name": "new-ui"},
        [],
        {"scope": "checkout", "value": {"bool_value": False}, "options": {"reason": "r"}},
    )
    assert isinstance(same, m.SetFlagRequest)
    assert same.value.WhichOneof("kind") == "bool_value"


@pytest.mark.parametrize(
    ("route", "path", "query", "body", "says"),
    [
        ("SetFlag", {"scope": "a", "name": "b"}, [], {"valeu": {}}, "valeu"),
        ("SetFlag", {"scope": "a", "name": "b"}, [], {"options": {"reasn": "x"}}, "reasn"),
        ("SetFlag", {"scope": "a", "name": "b"}, [], ["not", "an", "object"], "JSON object"),
        ("SetFlag", {"scope": "a", "name": "b"}, [], {"scope": "other"}, "give it once"),
        ("SetFlag", {"scope": "a", "name": "b"}, [("dry_run", "true")], None, "JSON body"),
        ("SetShedding", {"service": "a"}, [], {"tier": "MOST"}, "tier"),
        ("ListFlags", {}, [("scop", "x")], None, "unknown query parameter 'scop'"),
        ("ListFlags", {}, [("effective", "yes")], None, "not true or false"),
        ("ListFlags", {}, [("scope", "a"), ("scope", "b")], None, "given twice"),
        ("GetFlag", {"scope": "a", "name": "b"}, [("scope", "c")], None, "in the path"),
        ("GetFlag", {"scope": "a", "name": "b"}, [], {"effective": True}, "takes no body"),
        ("ListBundles", {}, [("limit", "ten")], None, "limit"),
    ],
)
def test_bad_requests_name_the_problem(
    route: str, path: dict[str, str], query: list[tuple[str, str]], body: Any, says: str
) -> None:
    with pytest.raises(BadRequest) as refused:
        build_request(BY_RPC[route], path, query, body)
    assert says in refused.value.message
    assert refused.value.status == 400
    assert "\n" not in refused.value.message


def test_query_parameters_fill_nested_fields_by_proto_or_json_name() -> None:
    request = build_request(
        BY_RPC["ClearFlag"],
        {"scope": "global", "name": "x"},
        [
            ("options.reason", "done"),
            ("options.dryRun", "true"),
            ("options.expected_mod_revision", "0"),
            ("options.ttl", "30s"),
            ("all_layers", "true"),
        ],
        None,
    )
    assert isinstance(request, m.ClearFlagRequest)
    assert request.options.reason == "done" and request.options.dry_run
    assert request.options.HasField("expected_mod_revision")
    assert request.options.ttl.seconds == 30 and request.all_layers
    history = build_request(
        BY_RPC["ListHistory"], {}, [("since", "2030-01-02T03:04:05Z"), ("limit", "5")], None
    )
    assert isinstance(history, m.ListHistoryRequest)
    assert history.since.seconds > 0 and history.limit == 5


def test_answers_print_defaults_and_int64_as_strings() -> None:
    shown = render(m.ListFlagsResponse(revision=12))
    assert shown == {"flags": [], "revision": "12"}
    assert render(m.GetStatusResponse(service="a"))["drift"] == {}


def test_client_certificate_subjects_read_as_grpc_reports_them() -> None:
    subject = ((("organizationName", "Example"),), (("commonName", "deploy, pipeline"),))
    assert rfc4514(subject) == "CN=deploy\\, pipeline,O=Example"


def test_the_openapi_document_is_valid_and_has_every_route() -> None:
    document = openapi_document()
    validate(document)  # raises on an invalid document
    operations = {
        (verb.upper(), path): op["operationId"]
        for path, item in document["paths"].items()
        for verb, op in item.items()
    }
    assert operations == {
        **{(r.verb, r.path): r.rpc for r in ROUTES},
        ("POST", "/ofrep/v1/evaluate/flags/{key}"): "OfrepEvaluateFlag",
        ("POST", "/ofrep/v1/evaluate/flags"): "OfrepEvaluateFlags",
        ("GET", "/ofrep/v1/events"): "OfrepEventStream",
        ("POST", "/v1/alertmanager"): "AlertmanagerWebhook",
    }
    schemas = document["components"]["schemas"]
    meta = schemas["Meta"]["properties"]
    assert meta["modRevision"] == {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
    assert meta["setAt"]["format"] == "date-time"
    assert schemas["Tier"]["enum"][0] == "TIER_UNSPECIFIED"
    assert schemas["WriteOptions"]["properties"]["ttl"]["pattern"].endswith("s$")
    assert schemas["GetStatusResponse"]["properties"]["drift"] == {
        "type": "object",
        "additionalProperties": {"type": "integer", "format": "int32"},
    }
    assert {"required": ["boolValue"]} in schemas["FlagValue"]["oneOf"]
    set_flag = document["paths"]["/v1/flags/{scope}/{name}"]
    body = set_flag["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/SetFlagBody"}
    assert "scope" not in schemas["SetFlagBody"]["properties"]
    scope, name, _effective = set_flag["get"]["parameters"]
    assert scope["schema"]["pattern"].startswith("^[a-z0-9]")
    assert re.fullmatch(scope["schema"]["pattern"].strip("^$"), "global")
    assert not re.fullmatch(name["schema"]["pattern"].strip("^$"), "New UI")
    params = [p["name"] for p in set_flag["delete"]["parameters"]]
    assert params[:3] == ["scope", "name", "options.reason"]
    assert set(set_flag["get"]["responses"]) >= {"200", "400", "401", "403", "404", "503"}
    watch = document["paths"]["/v1/changes"]["get"]["responses"]["200"]["content"]
    assert list(watch) == ["application/x-ndjson"]


def test_the_openapi_document_states_the_rules_the_server_checks() -> None:
    """Rules that are simple and true go in the schema (the HTTP fuzz test holds the
    server to them): a write's reason, the names a filter takes, a limit's bounds."""
    document = openapi_document()
    schemas = document["components"]["schemas"]
    assert schemas["WriteOptions"]["required"] == ["reason"]
    assert schemas["WriteOptions"]["properties"]["reason"]["minLength"] == 1
    bodies = [
        name
        for name, schema in schemas.items()
        if (name.endswith("Body") or name in ("ApplyBundleRequest", "SetTriggerRequest"))
        and "options" in schema.get("properties", {})
    ]
    assert len(bodies) == 9, bodies  # the writes with a body
    assert all(schemas[name]["required"] == ["options"] for name in bodies)
    # Firing and resolving a trigger (tools, Alertmanager) carry no write options.
    assert "required" not in schemas["FireTriggerBody"]
    assert "required" not in schemas["SetFlagRequest"]  # in a bundle: no options of its own
    clear = document["paths"]["/v1/flags/{scope}/{name}"]["delete"]["parameters"]
    assert {p["name"]: p["required"] for p in clear}["options.reason"] is True
    history = {
        p["name"]: p["schema"] for p in document["paths"]["/v1/history"]["get"]["parameters"]
    }
    assert history["limit"]["minimum"] == 0 and history["limit"]["maximum"] == 1000
    incident = history["incident"]["pattern"]
    assert re.fullmatch(incident, "INC-7") and re.fullmatch(incident, "")
    assert not re.fullmatch(incident, "INC 7")
    flags = {p["name"]: p["schema"] for p in document["paths"]["/v1/flags"]["get"]["parameters"]}
    assert re.fullmatch(flags["scope"]["pattern"], "global")
    assert not re.fullmatch(flags["scope"]["pattern"], "Checkout")


def test_routes_are_frozen_records() -> None:
    route = Route("GetFlag", "GET", "/v1/flags/{scope}/{name}", "x")
    assert route.path_fields == ("scope", "name") and not route.has_body
    assert route.full_method == "/controlplane.api.v1.MitigationService/GetFlag"


def test_deadlines_from_x_timeout_or_grpc_timeout() -> None:
    assert deadline_of({}) is None
    for headers, seconds in ({"x-timeout": "2.5"}, 2.5), ({"grpc-timeout": "500m"}, 0.5):
        before = time.monotonic()
        deadline = deadline_of(headers)
        after = time.monotonic()
        assert deadline is not None and before + seconds <= deadline <= after + seconds, headers
    for headers in ({"x-timeout": "0"}, {"x-timeout": "soon"}, {"grpc-timeout": "5 S"}):
        with pytest.raises(BadRequest) as refused:
            deadline_of(headers)
        assert "timeout" in refused.value.message.lower()


def test_a_null_in_a_body_is_refused_naming_where() -> None:
    route = next(r for r in ROUTES if r.rpc == "MarkKnownGood")
    body = {"options": {"reason": "r", "expectedModRevision": None}}
    with pytest.raises(BadRequest) as refused:
        build_request(route, {"service": "m", "version": "v1"}, [], body)
    assert "options.expectedModRevision: null is not a value here" in refused.value.message
