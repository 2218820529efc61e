import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tier(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIER_UNSPECIFIED: _ClassVar[Tier]
    CRITICAL_PLUS: _ClassVar[Tier]
    CRITICAL: _ClassVar[Tier]
    SHEDDABLE_PLUS: _ClassVar[Tier]
    SHEDDABLE: _ClassVar[Tier]
TIER_UNSPECIFIED: Tier
CRITICAL_PLUS: Tier
CRITICAL: Tier
SHEDDABLE_PLUS: Tier
SHEDDABLE: Tier

class FlagValue(_message.Message):
    __slots__ = ("bool_value", "number_value", "string_value", "json_value")
    BOOL_VALUE_FIELD_NUMBER: _ClassVar[int]
    NUMBER_VALUE_FIELD_NUMBER: _ClassVar[int]
    STRING_VALUE_FIELD_NUMBER: _ClassVar[int]
    JSON_VALUE_FIELD_NUMBER: _ClassVar[int]
    bool_value: bool
    number_value: float
    string_value: str
    json_value: str
    def __init__(self, bool_value: _Optional[bool] = ..., number_value: _Optional[float] = ..., string_value: _Optional[str] = ..., json_value: _Optional[str] = ...) -> None: ...

class WriteOptions(_message.Message):
    __slots__ = ("reason", "incident", "ttl", "expires_at", "expected_mod_revision", "dry_run", "actor")
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    reason: str
    incident: str
    ttl: _duration_pb2.Duration
    expires_at: _timestamp_pb2.Timestamp
    expected_mod_revision: int
    dry_run: bool
    actor: str
    def __init__(self, reason: _Optional[str] = ..., incident: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expected_mod_revision: _Optional[int] = ..., dry_run: _Optional[bool] = ..., actor: _Optional[str] = ...) -> None: ...

class Meta(_message.Message):
    __slots__ = ("actor", "actor_authenticated", "reason", "incident", "set_at", "expires_at", "mod_revision", "bundle_id")
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    SET_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    actor: str
    actor_authenticated: bool
    reason: str
    incident: str
    set_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    mod_revision: int
    bundle_id: str
    def __init__(self, actor: _Optional[str] = ..., actor_authenticated: _Optional[bool] = ..., reason: _Optional[str] = ..., incident: _Optional[str] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., mod_revision: _Optional[int] = ..., bundle_id: _Optional[str] = ...) -> None: ...

class Flag(_message.Message):
    __slots__ = ("scope", "name", "value", "meta", "replaced")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    value: FlagValue
    meta: Meta
    replaced: Flag
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[_Union[FlagValue, _Mapping]] = ..., meta: _Optional[_Union[Meta, _Mapping]] = ..., replaced: _Optional[_Union[Flag, _Mapping]] = ...) -> None: ...

class Shedding(_message.Message):
    __slots__ = ("service", "tier", "percent", "meta", "replaced")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    service: str
    tier: Tier
    percent: float
    meta: Meta
    replaced: Shedding
    def __init__(self, service: _Optional[str] = ..., tier: _Optional[_Union[Tier, str]] = ..., percent: _Optional[float] = ..., meta: _Optional[_Union[Meta, _Mapping]] = ..., replaced: _Optional[_Union[Shedding, _Mapping]] = ...) -> None: ...

class PinHistory(_message.Message):
    __slots__ = ("version", "actor", "reason", "set_at")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SET_AT_FIELD_NUMBER: _ClassVar[int]
    version: str
    actor: str
    reason: str
    set_at: _timestamp_pb2.Timestamp
    def __init__(self, version: _Optional[str] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Pin(_message.Message):
    __slots__ = ("service", "version", "meta", "previous", "replaced")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    meta: Meta
    previous: PinHistory
    replaced: Pin
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., meta: _Optional[_Union[Meta, _Mapping]] = ..., previous: _Optional[_Union[PinHistory, _Mapping]] = ..., replaced: _Optional[_Union[Pin, _Mapping]] = ...) -> None: ...

class KnownGood(_message.Message):
    __slots__ = ("service", "version", "meta")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    meta: Meta
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., meta: _Optional[_Union[Meta, _Mapping]] = ...) -> None: ...

class WriteResult(_message.Message):
    __slots__ = ("changed", "dry_run", "revision", "mod_revision", "overridden_by", "audit_id", "summary", "would_change", "unknown_services", "in_force_since")
    class InForceSinceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    MOD_REVISION_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_BY_FIELD_NUMBER: _ClassVar[int]
    AUDIT_ID_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WOULD_CHANGE_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_SERVICES_FIELD_NUMBER: _ClassVar[int]
    IN_FORCE_SINCE_FIELD_NUMBER: _ClassVar[int]
    changed: bool
    dry_run: bool
    revision: int
    mod_revision: int
    overridden_by: _containers.RepeatedScalarFieldContainer[str]
    audit_id: str
    summary: str
    would_change: bool
    unknown_services: _containers.RepeatedCompositeFieldContainer[UnknownService]
    in_force_since: _containers.ScalarMap[str, int]
    def __init__(self, changed: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., revision: _Optional[int] = ..., mod_revision: _Optional[int] = ..., overridden_by: _Optional[_Iterable[str]] = ..., audit_id: _Optional[str] = ..., summary: _Optional[str] = ..., would_change: _Optional[bool] = ..., unknown_services: _Optional[_Iterable[_Union[UnknownService, _Mapping]]] = ..., in_force_since: _Optional[_Mapping[str, int]] = ...) -> None: ...

class UnknownService(_message.Message):
    __slots__ = ("service", "did_you_mean", "memory")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    DID_YOU_MEAN_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    service: str
    did_you_mean: _containers.RepeatedScalarFieldContainer[str]
    memory: _duration_pb2.Duration
    def __init__(self, service: _Optional[str] = ..., did_you_mean: _Optional[_Iterable[str]] = ..., memory: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("id", "revision", "time", "actor", "actor_authenticated", "action", "kind", "scope", "name", "reason", "incident", "before_json", "after_json", "bundle_id", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTOR_AUTHENTICATED_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    BEFORE_JSON_FIELD_NUMBER: _ClassVar[int]
    AFTER_JSON_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    revision: int
    time: _timestamp_pb2.Timestamp
    actor: str
    actor_authenticated: bool
    action: str
    kind: str
    scope: str
    name: str
    reason: str
    incident: str
    before_json: str
    after_json: str
    bundle_id: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, id: _Optional[str] = ..., revision: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., actor_authenticated: _Optional[bool] = ..., action: _Optional[str] = ..., kind: _Optional[str] = ..., scope: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ..., incident: _Optional[str] = ..., before_json: _Optional[str] = ..., after_json: _Optional[str] = ..., bundle_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Instance(_message.Message):
    __slots__ = ("service", "instance_id", "running_version", "applied_revision", "connected", "last_seen", "lag", "server_id", "override_active")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VERSION_FIELD_NUMBER: _ClassVar[int]
    APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAG_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_ACTIVE_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    running_version: str
    applied_revision: int
    connected: bool
    last_seen: _timestamp_pb2.Timestamp
    lag: int
    server_id: str
    override_active: bool
    def __init__(self, service: _Optional[str] = ..., instance_id: _Optional[str] = ..., running_version: _Optional[str] = ..., applied_revision: _Optional[int] = ..., connected: _Optional[bool] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lag: _Optional[int] = ..., server_id: _Optional[str] = ..., override_active: _Optional[bool] = ...) -> None: ...
