"""``GET /openapi.json``: an OpenAPI 3.1 document made from the proto descriptors and
the route table, so that it cannot drift from either.

Schemas follow protobuf's JSON mapping: field names in lowerCamelCase (parsers accept
the proto names too), 64-bit integers as strings, enums as their names, Timestamp as
an RFC 3339 date-time string, Duration as seconds with an ``s`` suffix, maps as objects,
repeated fields as arrays, a message made of one oneof as exactly one of its fields.
"""

from __future__ import annotations

import re
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from controlplane import __version__
from controlplane.model._values import _FLAG_RE, _SERVICE_RE, _VERSION_RE, INCIDENT_RE
from controlplane.server._alertmanager import openapi_part as alertmanager_part
from controlplane.server._mitigation_service import (
    _BUNDLE_ID_RE,
    MAX_HISTORY_LIMIT,
    MAX_NOTIFICATIONS_LIMIT,
    MAX_TIMELINE_LIMIT,
)
from controlplane.server._ofrep import openapi_part
from controlplane.server._routes import (
    HTTP_STATUS,
    NDJSON,
    ROUTES,
    STRING_MESSAGES,
    Route,
    message_of,
    query_parameters,
)

_REF = "#/components/schemas/"

PATH_PATTERNS: dict[str, re.Pattern[str]] = {
    "scope": _SERVICE_RE,  # "global" is one too
    "service": _SERVICE_RE,
    "name": _FLAG_RE,
    "version": _VERSION_RE,
    "incident": INCIDENT_RE,
    "bundle_id": _BUNDLE_ID_RE,
}
"""What the server accepts in each path parameter (the model's own rules)."""

FILTER_PATTERNS: dict[str, re.Pattern[str]] = {
    "scope": _SERVICE_RE,
    "service": _SERVICE_RE,
    "incident": INCIDENT_RE,
}
"""Query parameters that filter by a name: that name's rule, or empty (no filter)."""

LIMITS: dict[str, dict[str, int]] = {
    "ListBundles": {"minimum": 0},
    "ListHistory": {"minimum": 0, "maximum": MAX_HISTORY_LIMIT},
    "GetTimeline": {"minimum": 0, "maximum": MAX_TIMELINE_LIMIT},
    "ListNotifications": {"minimum": 0, "maximum": MAX_NOTIFICATIONS_LIMIT},
}
"""The bounds of each RPC's ``limit`` (0: the default)."""

WRITE_OPTIONS = "controlplane.api.v1.WriteOptions"
"""Every write's options: the ``reason`` is required (it goes to the audit trail)."""

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}
_INT32 = {
    FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_SINT32,
    FieldDescriptor.TYPE_FIXED32,
    FieldDescriptor.TYPE_SFIXED32,
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {
        "type": "string",
        "format": "date-time",
        "description": "RFC 3339, e.g. 2026-01-02T15:04:05Z",
    },
    "google.protobuf.Duration": {
        "type": "string",
        "pattern": r"^-?[0-9]+(\.[0-9]{1,9})?s$",
        "description": "seconds with an s suffix, e.g. 1800s or 0.5s",
    },
}
assert set(_WELL_KNOWN) == STRING_MESSAGES

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "status"],
            "properties": {
                "code": {"type": "string", "description": "the gRPC status name"},
                "message": {"type": "string"},
                "status": {"type": "integer"},
                "current_mod_revision": {
                    "type": "string",
                    "description": "ABORTED by compare-and-set: the key's mod revision now",
                },
            },
        }
    },
}

_ERROR_STATUSES = {
    400: "Bad input (INVALID_ARGUMENT): the message names the field; nothing written",
    401: "No or unknown credentials (UNAUTHENTICATED)",
    403: "The identity's role does not allow this (PERMISSION_DENIED)",
    404: "Not found (NOT_FOUND)",
    409: "Compare-and-set mismatch (ABORTED): X-Current-Mod-Revision has the key's revision",
    412: "Failed precondition, e.g. nothing to roll back to",
    413: "The body is larger than the server's limit",
    415: "The body is not JSON",
    429: "A limit (RESOURCE_EXHAUSTED)",
    500: "Internal error (logged on the server)",
    501: "Not implemented by this server (UNIMPLEMENTED)",
    503: "etcd unreachable, or the server is stopping (UNAVAILABLE)",
    504: "The request's deadline ran out (DEADLINE_EXCEEDED)",
}
assert {s for s in HTTP_STATUS.values() if s not in (200, 499)} <= set(_ERROR_STATUSES)


class _Schemas:
    """The component schemas, made as messages and enums are reached."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {"Error": ERROR_SCHEMA}

    def ref(self, name: str) -> dict[str, Any]:
        return {"$ref": f"{_REF}{name}"}

    def message(self, descriptor: Descriptor, skip: tuple[str, ...] = (), name: str = "") -> Any:
        """A $ref to the message's schema (made once), or the schema of a well-known type."""
        if descriptor.full_name in _WELL_KNOWN:
            return dict(_WELL_KNOWN[descriptor.full_name])
        name = name or descriptor.name
        if name not in self.schemas:
            self.schemas[name] = {}  # recursive messages refer to it meanwhile
            self.schemas[name] = self._object(descriptor, skip)
        return self.ref(name)

    def _object(self, descriptor: Descriptor, skip: tuple[str, ...]) -> dict[str, Any]:
        fields = [f for f in descriptor.fields if f.name not in skip]
        properties = {f.json_name: self.field(f) for f in fields}
        schema: dict[str, Any] = {
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }
        if descriptor.full_name == WRITE_OPTIONS:
            schema["required"] = ["reason"]
            properties["reason"]["minLength"] = 1
        real = [o for o in descriptor.oneofs if not _synthetic(o)]
        if len(real) == 1 and len(real[0].fields) == len(fields):
            schema["oneOf"] = [{"required": [f.json_name]} for f in real[0].fields]
            schema["description"] = f"exactly one of {', '.join(properties)}"
        for oneof in real:
            names = ", ".join(f.json_name for f in oneof.fields)
            for field in oneof.fields:
                if field.json_name in properties:
                    properties[field.json_name].setdefault(
                        "description", f"one of {names} (oneof {oneof.name})"
                    )
        return schema

    def enum(self, descriptor: EnumDescriptor) -> dict[str, Any]:
        name = descriptor.name
        if name not in self.schemas:
            self.schemas[name] = {"type": "string", "enum": [v.name for v in descriptor.values]}
        return self.ref(name)

    def field(self, field: FieldDescriptor) -> Any:
        if field.type == FieldDescriptor.TYPE_MESSAGE and message_of(field).GetOptions().map_entry:
            value = message_of(field).fields_by_name["value"]
            return {"type": "object", "additionalProperties": self.single(value)}
        single = self.single(field)
        if field.is_repeated:
            return {"type": "array", "items": single}
        return single

    def single(self, field: FieldDescriptor) -> Any:
        kind = field.type
        if kind == FieldDescriptor.TYPE_MESSAGE:
            return self.message(message_of(field))
        if kind == FieldDescriptor.TYPE_ENUM:
            assert field.enum_type is not None
            return self.enum(field.enum_type)
        if kind in _INT64:
            return {"type": "string", "format": "int64", "pattern": "^-?[0-9]+$"}
        if kind in _INT32:
            return {"type": "integer", "format": "int32"}
        if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return {"type": "number"}
        if kind == FieldDescriptor.TYPE_BOOL:
            return {"type": "boolean"}
        if kind == FieldDescriptor.TYPE_BYTES:
            return {"type": "string", "contentEncoding": "base64"}
        return {"type": "string"}


def _synthetic(oneof: Any) -> bool:
    """The oneof protoc makes for a proto3 ``optional`` field."""
    return len(oneof.fields) == 1 and oneof.name == f"_{oneof.fields[0].name}"


def _error_responses() -> dict[str, Any]:
    content = {"application/json": {"schema": {"$ref": f"{_REF}Error"}}}
    return {
        str(status): {"description": text, "content": content}
        for status, text in sorted(_ERROR_STATUSES.items())
    }


def _operation(route: Route, schemas: _Schemas) -> dict[str, Any]:
    method = route.method
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "pattern": f"^{PATH_PATTERNS[name].pattern}$"},
        }
        for name in route.path_fields
    ]
    operation: dict[str, Any] = {
        "operationId": route.rpc,
        "summary": route.summary,
        "tags": [route.path.split("/")[2]],
        "description": f"MitigationService.{route.rpc} (gRPC) as JSON.",
    }
    if route.has_body:
        name = method.input_type.name
        if route.path_fields:
            name = f"{route.rpc}Body"
        schema = schemas.message(method.input_type, route.path_fields, name)
        # A write's own options are required (a change inside a bundle has none).
        if "options" in schemas.schemas[name]["properties"]:
            schemas.schemas[name]["required"] = ["options"]
        operation["requestBody"] = {
            "required": False,
            "content": {"application/json": {"schema": schema}},
        }
    else:
        for dotted, field in query_parameters(method.input_type, route.path_fields):
            schema = schemas.single(field)
            if dotted in FILTER_PATTERNS:
                schema = {**schema, "pattern": f"^(?:{FILTER_PATTERNS[dotted].pattern})?$"}
            if dotted == "limit":
                schema = {**schema, **LIMITS[route.rpc]}
            if field.is_repeated:
                schema = {"type": "array", "items": schema}
            required = dotted == "options.reason"
            if required:
                schema = {**schema, "minLength": 1}
            parameters.append(
                {"name": dotted, "in": "query", "required": required, "schema": schema}
            )
    if parameters:
        operation["parameters"] = parameters
    answer = schemas.message(method.output_type)
    if route.streaming:
        ok = {
            "description": "One JSON object per line as changes are written; a last line "
            '{"error": ...} when the stream is ended (the server stops: UNAVAILABLE).',
            "content": {NDJSON: {"schema": answer}},
        }
    else:
        ok = {
            "description": "The RPC's response",
            "content": {"application/json": {"schema": answer}},
        }
    operation["responses"] = {"200": ok, **_error_responses()}
    return operation


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP mirror."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.verb.lower()] = _operation(route, schemas)
    ofrep_paths, ofrep_schemas = openapi_part(_SERVICE_RE.pattern)
    paths.update(ofrep_paths)
    schemas.schemas.update(ofrep_schemas)
    alert_paths, alert_schemas = alertmanager_part()
    paths.update(alert_paths)
    schemas.schemas.update(alert_schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "controlplane MitigationService (HTTP/JSON)",
            "version": __version__,
            "description": "The JSON mirror of the gRPC MitigationService: protobuf's JSON "
            "mapping, bearer tokens (Authorization: Bearer <token>) as on the gRPC port; "
            "and OpenFeature's Remote Evaluation Protocol (OFREP) under /ofrep/v1.",
        },
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.schemas.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
