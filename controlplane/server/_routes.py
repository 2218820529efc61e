"""The HTTP mirror of MitigationService: one route per RPC, and what the JSON means.

:data:`ROUTES` is the one table: RPC name -> HTTP verb and path template. Path
parameters name fields of the request message; a GET or DELETE takes the other fields
as query parameters (``options.reason=...``, nested fields dotted), a POST, PUT or PATCH
as a JSON body in protobuf's JSON mapping. The answer is the response message in the
same mapping, with fields at their default values printed (``false``, ``0``, ``[]``).
:func:`build_request` and :func:`render` do both directions; :data:`HTTP_STATUS` maps
gRPC status codes to HTTP ones. Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from controlplane.api.v1 import mitigation_pb2

SERVICE = mitigation_pb2.DESCRIPTOR.services_by_name["MitigationService"]

BODY_VERBS = frozenset({"POST", "PUT", "PATCH"})
NDJSON = "application/x-ndjson"

_PARAM = re.compile(r"\{([a-z_][a-z0-9_]*)\}")


@dataclass(frozen=True, slots=True)
class Route:
    """An RPC of MitigationService as HTTP: ``verb path``."""

    rpc: str
    verb: str
    path: str
    """A template: ``/v1/flags/{scope}/{name}``; each ``{field}`` a field of the request."""
    summary: str

    @property
    def method(self) -> MethodDescriptor:
        return SERVICE.methods_by_name[self.rpc]

    @property
    def full_method(self) -> str:
        """``/controlplane.api.v1.MitigationService/SetFlag``, as auth rules name it."""
        return f"/{SERVICE.full_name}/{self.rpc}"

    @property
    def path_fields(self) -> tuple[str, ...]:
        return tuple(_PARAM.findall(self.path))

    @property
    def streaming(self) -> bool:
        return bool(self.method.server_streaming)

    @property
    def has_body(self) -> bool:
        return self.verb in BODY_VERBS


ROUTES: tuple[Route, ...] = (
    Route("ListFlags", "GET", "/v1/flags", "List flags, of one scope or all"),
    Route("GetFlag", "GET", "/v1/flags/{scope}/{name}", "Get a flag"),
    Route("SetFlag", "PUT", "/v1/flags/{scope}/{name}", "Set a flag"),
    Route("ClearFlag", "DELETE", "/v1/flags/{scope}/{name}", "Clear a flag"),
    Route("ListShedding", "GET", "/v1/shedding", "List load-shedding levels"),
    Route("GetShedding", "GET", "/v1/shedding/{service}", "Get a service's shedding"),
    Route("SetShedding", "PUT", "/v1/shedding/{service}", "Shed a service's load"),
    Route("ClearShedding", "DELETE", "/v1/shedding/{service}", "Stop shedding"),
    Route("ListPins", "GET", "/v1/pins", "List pinned versions"),
    Route("GetPin", "GET", "/v1/pins/{service}", "Get a service's pin"),
    Route("PinVersion", "PUT", "/v1/pins/{service}", "Pin a service to a version"),
    Route("UnpinVersion", "DELETE", "/v1/pins/{service}", "Remove a service's pin"),
    Route("ListKnownGood", "GET", "/v1/known-good/{service}", "List known-good versions"),
    Route(
        "MarkKnownGood", "PUT", "/v1/known-good/{service}/{version}", "Mark a version known-good"
    ),
    Route("UnmarkKnownGood", "DELETE", "/v1/known-good/{service}/{version}", "Unmark a version"),
    Route("Rollback", "POST", "/v1/services/{service}/rollback", "Pin the last known-good version"),
    Route("ListBundles", "GET", "/v1/bundles", "List bundles, newest first"),
    Route("ApplyBundle", "POST", "/v1/bundles", "Apply several changes in one transaction"),
    Route("GetBundle", "GET", "/v1/bundles/{bundle_id}", "Get a bundle"),
    Route("RevertBundle", "POST", "/v1/bundles/{bundle_id}/revert", "Revert a bundle"),
    Route("ListServices", "GET", "/v1/services", "List the services known"),
    Route("GetStatus", "GET", "/v1/services/{service}/status", "A service's state and agents"),
    Route(
        "WaitApplied",
        "GET",
        "/v1/services/{service}/applied",
        "Wait until a service's instances applied a revision",
    ),
    Route("ListHistory", "GET", "/v1/history", "The audit trail, newest first"),
    Route("GetTimeline", "GET", "/v1/incidents/{incident}/timeline", "An incident's timeline"),
    Route("ListNotifications", "GET", "/v1/notifications", "Notifications: progress, failures"),
    Route("SetTrigger", "POST", "/v1/triggers", "Set a trigger (alerts to a bundle)"),
    Route("ListTriggers", "GET", "/v1/triggers", "List triggers"),
    Route("GetTrigger", "GET", "/v1/triggers/{name}", "Get a trigger"),
    Route("DeleteTrigger", "DELETE", "/v1/triggers/{name}", "Delete a trigger"),
    Route("SetTriggerEnabled", "POST", "/v1/triggers/{name}/enabled", "Enable or disable"),
    Route("FireTrigger", "POST", "/v1/triggers/{name}/fire", "Fire a trigger (an alert)"),
    Route("ResolveTrigger", "POST", "/v1/triggers/{name}/resolve", "Resolve a trigger's alert"),
    Route("WatchChanges", "GET", "/v1/changes", "Changes as they are written (NDJSON stream)"),
)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC status -> HTTP status of the error answer."""


class BadRequest(Exception):
    """A request the mirror cannot turn into the RPC's message: its HTTP status and a
    message naming the problem and the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def request_class(route: Route) -> type[Message]:
    return GetMessageClass(route.method.input_type)


def render(message: Message) -> dict[str, Any]:
    """A response message in protobuf's JSON mapping, default values printed."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


def _no_nulls(value: Any, where: str) -> None:
    """Refuse a JSON null anywhere in a body: protobuf's JSON mapping would read it as
    the field's default, but the document (/openapi.json) gives no field a null, and a
    null ``expectedModRevision`` silently meaning "no compare" is a trap."""
    if value is None:
        raise BadRequest(f"{where or 'the body'}: null is not a value here: leave the field out")
    if isinstance(value, dict):
        for key, item in value.items():
            _no_nulls(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _no_nulls(item, f"{where}[{index}]")


def build_request(
    route: Route,
    path: Mapping[str, str],
    query: Sequence[tuple[str, str]],
    body: Any,
) -> Message:
    """The request message of ``route`` from its path parameters, query parameters and
    parsed JSON body (None: no body).

    Raises:
        BadRequest: naming the field or parameter and what to do instead.
    """
    descriptor = route.method.input_type
    name = descriptor.name
    fields: dict[str, Any] = {}
    if route.has_body:
        if query:
            raise BadRequest(
                f"{route.verb} {route.path} takes its fields in the JSON body, not the query "
                f"string (got {', '.join(sorted({k for k, _ in query}))})"
            )
        if body is not None:
            if not isinstance(body, dict):
                raise BadRequest(
                    f"the body must be a JSON object: the fields of {name} (see /openapi.json)"
                )
            _no_nulls(body, "")
            fields = dict(body)
    else:
        if body is not None:
            raise BadRequest(
                f"{route.verb} takes no body: give the fields of {name} as query parameters "
                "(e.g. ?options.reason=...)"
            )
        fields = _query_fields(descriptor, route, query)
    for field_name, value in path.items():
        field = descriptor.fields_by_name[field_name]
        for key in {field.name, field.json_name}:
            if key in fields and fields.pop(key) != value:
                raise BadRequest(
                    f"{field_name} is {value!r} in the path and something else in the body: "
                    "give it once, in the path"
                )
        fields[field.name] = value
    message = request_class(route)()
    _check_enum_numbers(fields, descriptor, "")
    try:
        json_format.ParseDict(fields, message, ignore_unknown_fields=False)
    except (json_format.ParseError, ValueError, TypeError, OverflowError) as exc:
        # (1e400 for a number: protobuf's parser lets OverflowError out.)
        raise BadRequest(_parse_error(str(exc), name)) from None
    return message


_INT32 = range(-(2**31), 2**31)


def _enum_number_ok(item: Any, names: Any) -> bool:
    """Whether an enum's JSON is a name, or a whole number within int32 (as a number or
    as text, as a query string gives it)."""
    if isinstance(item, bool):
        return True  # the parser refuses it, naming it
    if isinstance(item, str):
        if item in names:
            return True
        try:
            item = int(item)
        except ValueError:
            return True  # not a number: the parser names the bad name
    if isinstance(item, float):
        if not math.isfinite(item) or not item.is_integer():
            return False
        item = int(item)
    return not isinstance(item, int) or item in _INT32


def _check_enum_numbers(fields: Any, descriptor: Any, where: str) -> None:
    """Refuse an enum given as a number outside int32 (or not whole): protobuf's JSON
    parser would wrap it around into another value (2**32 + 2, or "4294967298", read as
    2) instead of refusing it."""
    if not isinstance(fields, dict):
        return
    by_json = {f.json_name: f for f in descriptor.fields}
    for key, value in fields.items():
        field = descriptor.fields_by_name.get(key) or by_json.get(key)
        if field is None:
            continue  # the parser names it
        values = value if isinstance(value, list) else [value]
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            values = list(value.values()) if isinstance(value, dict) else []
            field = field.message_type.fields_by_name["value"]
        for item in values:
            if field.enum_type is not None:
                if not _enum_number_ok(item, field.enum_type.values_by_name):
                    names = ", ".join(v.name for v in field.enum_type.values)
                    raise BadRequest(
                        f"{where}{key}: {item} is not a value of {field.enum_type.name}: give "
                        f"one of {names}"
                    )
            elif field.message_type is not None:
                _check_enum_numbers(item, field.message_type, f"{where}{key}.")


def _parse_error(text: str, name: str) -> str:
    """protobuf's parse error in one line, pointing at the schema."""
    first = " ".join(text.split())
    first = first.split(" Available Fields(except extensions):")[0]
    return f"{name}: {first} (see /openapi.json for the fields)"


_QUERY_SCALARS = {
    FieldDescriptor.TYPE_STRING,
    FieldDescriptor.TYPE_BOOL,
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64,
    FieldDescriptor.TYPE_DOUBLE,
    FieldDescriptor.TYPE_FLOAT,
    FieldDescriptor.TYPE_ENUM,
}
STRING_MESSAGES = frozenset({"google.protobuf.Timestamp", "google.protobuf.Duration"})
"""Well-known messages whose JSON form is a string: query parameters like scalars."""


def query_parameters(
    descriptor: Descriptor, skip: Sequence[str] = ()
) -> list[tuple[str, FieldDescriptor]]:
    """The query parameters a message takes: dotted proto names of its scalar fields,
    nested messages flattened (``options.reason``); fields in ``skip`` left out."""
    found: list[tuple[str, FieldDescriptor]] = []

    def walk(message: Descriptor, prefix: str, seen: frozenset[str]) -> None:
        for field in message.fields:
            name = f"{prefix}{field.name}"
            if not prefix and field.name in skip:
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                nested = message_of(field)
                if nested.full_name in STRING_MESSAGES:
                    found.append((name, field))
                elif (
                    not nested.GetOptions().map_entry
                    and not _is_repeated(field)
                    and nested.full_name not in seen
                ):
                    walk(nested, f"{name}.", seen | {nested.full_name})
            elif field.type in _QUERY_SCALARS:
                found.append((name, field))

    walk(descriptor, "", frozenset({descriptor.full_name}))
    return found


def message_of(field: FieldDescriptor) -> Descriptor:
    """The message type of a message field."""
    assert field.message_type is not None, field.full_name
    return field.message_type


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _query_fields(
    descriptor: Descriptor, route: Route, query: Sequence[tuple[str, str]]
) -> dict[str, Any]:
    known = dict(query_parameters(descriptor, route.path_fields))
    aliases = {_json_path(descriptor, name): name for name in known}
    fields: dict[str, Any] = {}
    for raw_key, value in query:
        key = aliases.get(raw_key, raw_key)
        field = known.get(key)
        if field is None:
            if key in route.path_fields:
                raise BadRequest(f"{key} is in the path of {route.path}: not a query parameter")
            raise BadRequest(
                f"unknown query parameter {raw_key!r}: {route.verb} {route.path} takes "
                f"{', '.join(known) or 'none'}"
            )
        target = fields
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        converted = _query_value(key, field, value)
        if _is_repeated(field):
            target.setdefault(leaf, []).append(converted)
        elif leaf in target:
            raise BadRequest(f"query parameter {key!r} is given twice: give it once")
        else:
            target[leaf] = converted
    return fields


def _json_path(descriptor: Descriptor, dotted: str) -> str:
    """``options.dry_run`` as JSON names: ``options.dryRun``."""
    names = []
    message: Descriptor | None = descriptor
    for part in dotted.split("."):
        assert message is not None
        field = message.fields_by_name[part]
        names.append(field.json_name or part)
        message = field.message_type
    return ".".join(names)


def _query_value(key: str, field: FieldDescriptor, value: str) -> Any:
    if field.type == FieldDescriptor.TYPE_BOOL:
        if value not in ("true", "false"):
            raise BadRequest(f"query parameter {key}: {value!r} is not true or false")
        return value == "true"
    if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        try:
            return float(value)
        except ValueError:
            raise BadRequest(f"query parameter {key}: {value!r} is not a number") from None
    return value
