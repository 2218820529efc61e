import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from controlplane.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BundleState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUNDLE_STATE_UNSPECIFIED: _ClassVar[BundleState]
    APPLIED: _ClassVar[BundleState]
    REVERTED: _ClassVar[BundleState]
    EXPIRED: _ClassVar[BundleState]
    PARTIALLY_OVERRIDDEN: _ClassVar[BundleState]

class MatchType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MATCH_EQUAL: _ClassVar[MatchType]
    MATCH_NOT_EQUAL: _ClassVar[MatchType]
    MATCH_REGEX: _ClassVar[MatchType]
    MATCH_NOT_REGEX: _ClassVar[MatchType]

class TriggerOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRIGGER_OUTCOME_UNSPECIFIED: _ClassVar[TriggerOutcome]
    TRIGGER_FIRED: _ClassVar[TriggerOutcome]
    TRIGGER_ALREADY_FIRED: _ClassVar[TriggerOutcome]
    TRIGGER_DISABLED: _ClassVar[TriggerOutcome]
    TRIGGER_COOLDOWN: _ClassVar[TriggerOutcome]
    TRIGGER_WOULD_APPLY: _ClassVar[TriggerOutcome]
    TRIGGER_REVERTED: _ClassVar[TriggerOutcome]
    TRIGGER_NOT_REVERTED: _ClassVar[TriggerOutcome]
BUNDLE_STATE_UNSPECIFIED: BundleState
APPLIED: BundleState
REVERTED: BundleState
EXPIRED: BundleState
PARTIALLY_OVERRIDDEN: BundleState
MATCH_EQUAL: MatchType
MATCH_NOT_EQUAL: MatchType
MATCH_REGEX: MatchType
MATCH_NOT_REGEX: MatchType
TRIGGER_OUTCOME_UNSPECIFIED: TriggerOutcome
TRIGGER_FIRED: TriggerOutcome
TRIGGER_ALREADY_FIRED: TriggerOutcome
TRIGGER_DISABLED: TriggerOutcome
TRIGGER_COOLDOWN: TriggerOutcome
TRIGGER_WOULD_APPLY: TriggerOutcome
TRIGGER_REVERTED: TriggerOutcome
TRIGGER_NOT_REVERTED: TriggerOutcome

class SetFlagRequest(_message.Message):
    __slots__ = ("scope", "name", "value", "options", "change_type")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHANGE_TYPE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    value: _types_pb2.FlagValue
    options: _types_pb2.WriteOptions
    change_type: bool
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., value: _Optional[_Union[_types_pb2.FlagValue, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ..., change_type: _Optional[bool] = ...) -> None: ...

class SetFlagResponse(_message.Message):
    __slots__ = ("result", "flag", "previous")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    flag: _types_pb2.Flag
    previous: _types_pb2.Flag
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., flag: _Optional[_Union[_types_pb2.Flag, _Mapping]] = ..., previous: _Optional[_Union[_types_pb2.Flag, _Mapping]] = ...) -> None: ...

class GetFlagRequest(_message.Message):
    __slots__ = ("scope", "name", "effective")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    effective: bool
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., effective: _Optional[bool] = ...) -> None: ...

class GetFlagResponse(_message.Message):
    __slots__ = ("flag", "overridden_by")
    FLAG_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_BY_FIELD_NUMBER: _ClassVar[int]
    flag: _types_pb2.Flag
    overridden_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, flag: _Optional[_Union[_types_pb2.Flag, _Mapping]] = ..., overridden_by: _Optional[_Iterable[str]] = ...) -> None: ...

class ListFlagsRequest(_message.Message):
    __slots__ = ("scope", "effective")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    effective: bool
    def __init__(self, scope: _Optional[str] = ..., effective: _Optional[bool] = ...) -> None: ...

class ListFlagsResponse(_message.Message):
    __slots__ = ("flags", "revision")
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    flags: _containers.RepeatedCompositeFieldContainer[_types_pb2.Flag]
    revision: int
    def __init__(self, flags: _Optional[_Iterable[_Union[_types_pb2.Flag, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ClearFlagRequest(_message.Message):
    __slots__ = ("scope", "name", "options", "all_layers")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    options: _types_pb2.WriteOptions
    all_layers: bool
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ..., all_layers: _Optional[bool] = ...) -> None: ...

class ClearFlagResponse(_message.Message):
    __slots__ = ("result", "removed", "restored")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    removed: _types_pb2.Flag
    restored: _types_pb2.Flag
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., removed: _Optional[_Union[_types_pb2.Flag, _Mapping]] = ..., restored: _Optional[_Union[_types_pb2.Flag, _Mapping]] = ...) -> None: ...

class SetSheddingRequest(_message.Message):
    __slots__ = ("service", "tier", "percent", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    tier: _types_pb2.Tier
    percent: float
    options: _types_pb2.WriteOptions
    def __init__(self, service: _Optional[str] = ..., tier: _Optional[_Union[_types_pb2.Tier, str]] = ..., percent: _Optional[float] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class SetSheddingResponse(_message.Message):
    __slots__ = ("result", "shedding", "previous")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    shedding: _types_pb2.Shedding
    previous: _types_pb2.Shedding
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., shedding: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ..., previous: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ...) -> None: ...

class GetSheddingRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class GetSheddingResponse(_message.Message):
    __slots__ = ("shedding",)
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    shedding: _types_pb2.Shedding
    def __init__(self, shedding: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ...) -> None: ...

class ListSheddingRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSheddingResponse(_message.Message):
    __slots__ = ("shedding", "revision")
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    shedding: _containers.RepeatedCompositeFieldContainer[_types_pb2.Shedding]
    revision: int
    def __init__(self, shedding: _Optional[_Iterable[_Union[_types_pb2.Shedding, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class ClearSheddingRequest(_message.Message):
    __slots__ = ("service", "options", "all_layers")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    service: str
    options: _types_pb2.WriteOptions
    all_layers: bool
    def __init__(self, service: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ..., all_layers: _Optional[bool] = ...) -> None: ...

class ClearSheddingResponse(_message.Message):
    __slots__ = ("result", "removed", "restored")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    removed: _types_pb2.Shedding
    restored: _types_pb2.Shedding
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., removed: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ..., restored: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ...) -> None: ...

class PinVersionRequest(_message.Message):
    __slots__ = ("service", "version", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    options: _types_pb2.WriteOptions
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class PinVersionResponse(_message.Message):
    __slots__ = ("result", "pin", "previous")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    pin: _types_pb2.Pin
    previous: _types_pb2.Pin
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ..., previous: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ...) -> None: ...

class GetPinRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class GetPinResponse(_message.Message):
    __slots__ = ("pin",)
    PIN_FIELD_NUMBER: _ClassVar[int]
    pin: _types_pb2.Pin
    def __init__(self, pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ...) -> None: ...

class ListPinsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListPinsResponse(_message.Message):
    __slots__ = ("pins", "revision")
    PINS_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    pins: _containers.RepeatedCompositeFieldContainer[_types_pb2.Pin]
    revision: int
    def __init__(self, pins: _Optional[_Iterable[_Union[_types_pb2.Pin, _Mapping]]] = ..., revision: _Optional[int] = ...) -> None: ...

class UnpinVersionRequest(_message.Message):
    __slots__ = ("service", "options", "all_layers")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    ALL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    service: str
    options: _types_pb2.WriteOptions
    all_layers: bool
    def __init__(self, service: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ..., all_layers: _Optional[bool] = ...) -> None: ...

class UnpinVersionResponse(_message.Message):
    __slots__ = ("result", "removed", "restored")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    RESTORED_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    removed: _types_pb2.Pin
    restored: _types_pb2.Pin
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., removed: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ..., restored: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ...) -> None: ...

class MarkKnownGoodRequest(_message.Message):
    __slots__ = ("service", "version", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    options: _types_pb2.WriteOptions
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class MarkKnownGoodResponse(_message.Message):
    __slots__ = ("result", "known_good")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    KNOWN_GOOD_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    known_good: _types_pb2.KnownGood
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., known_good: _Optional[_Union[_types_pb2.KnownGood, _Mapping]] = ...) -> None: ...

class UnmarkKnownGoodRequest(_message.Message):
    __slots__ = ("service", "version", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    version: str
    options: _types_pb2.WriteOptions
    def __init__(self, service: _Optional[str] = ..., version: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class UnmarkKnownGoodResponse(_message.Message):
    __slots__ = ("result", "removed")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    removed: _types_pb2.KnownGood
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., removed: _Optional[_Union[_types_pb2.KnownGood, _Mapping]] = ...) -> None: ...

class ListKnownGoodRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class ListKnownGoodResponse(_message.Message):
    __slots__ = ("known_good",)
    KNOWN_GOOD_FIELD_NUMBER: _ClassVar[int]
    known_good: _containers.RepeatedCompositeFieldContainer[_types_pb2.KnownGood]
    def __init__(self, known_good: _Optional[_Iterable[_Union[_types_pb2.KnownGood, _Mapping]]] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("service", "current_version", "options")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    service: str
    current_version: str
    options: _types_pb2.WriteOptions
    def __init__(self, service: _Optional[str] = ..., current_version: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class RollbackResponse(_message.Message):
    __slots__ = ("result", "pin", "from_version")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    pin: _types_pb2.Pin
    from_version: str
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ..., from_version: _Optional[str] = ...) -> None: ...

class BundleChange(_message.Message):
    __slots__ = ("set_flag", "clear_flag", "set_shedding", "clear_shedding", "pin_version", "unpin_version")
    SET_FLAG_FIELD_NUMBER: _ClassVar[int]
    CLEAR_FLAG_FIELD_NUMBER: _ClassVar[int]
    SET_SHEDDING_FIELD_NUMBER: _ClassVar[int]
    CLEAR_SHEDDING_FIELD_NUMBER: _ClassVar[int]
    PIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    UNPIN_VERSION_FIELD_NUMBER: _ClassVar[int]
    set_flag: SetFlagRequest
    clear_flag: ClearFlagRequest
    set_shedding: SetSheddingRequest
    clear_shedding: ClearSheddingRequest
    pin_version: PinVersionRequest
    unpin_version: UnpinVersionRequest
    def __init__(self, set_flag: _Optional[_Union[SetFlagRequest, _Mapping]] = ..., clear_flag: _Optional[_Union[ClearFlagRequest, _Mapping]] = ..., set_shedding: _Optional[_Union[SetSheddingRequest, _Mapping]] = ..., clear_shedding: _Optional[_Union[ClearSheddingRequest, _Mapping]] = ..., pin_version: _Optional[_Union[PinVersionRequest, _Mapping]] = ..., unpin_version: _Optional[_Union[UnpinVersionRequest, _Mapping]] = ...) -> None: ...

class Bundle(_message.Message):
    __slots__ = ("id", "name", "changes", "meta", "state", "revision", "reverted", "keys", "overridden_keys")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REVERTED_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    OVERRIDDEN_KEYS_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    changes: _containers.RepeatedCompositeFieldContainer[BundleChange]
    meta: _types_pb2.Meta
    state: BundleState
    revision: int
    reverted: _types_pb2.Meta
    keys: _containers.RepeatedScalarFieldContainer[str]
    overridden_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[BundleChange, _Mapping]]] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., state: _Optional[_Union[BundleState, str]] = ..., revision: _Optional[int] = ..., reverted: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., keys: _Optional[_Iterable[str]] = ..., overridden_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ApplyBundleRequest(_message.Message):
    __slots__ = ("name", "changes", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    changes: _containers.RepeatedCompositeFieldContainer[BundleChange]
    options: _types_pb2.WriteOptions
    def __init__(self, name: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[BundleChange, _Mapping]]] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class ApplyBundleResponse(_message.Message):
    __slots__ = ("result", "bundle")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    bundle: Bundle
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ...) -> None: ...

class RevertBundleRequest(_message.Message):
    __slots__ = ("bundle_id", "force", "options")
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    force: bool
    options: _types_pb2.WriteOptions
    def __init__(self, bundle_id: _Optional[str] = ..., force: _Optional[bool] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class RevertBundleResponse(_message.Message):
    __slots__ = ("result", "bundle", "overwritten_keys")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITTEN_KEYS_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    bundle: Bundle
    overwritten_keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., bundle: _Optional[_Union[Bundle, _Mapping]] = ..., overwritten_keys: _Optional[_Iterable[str]] = ...) -> None: ...

class ListBundlesRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class ListBundlesResponse(_message.Message):
    __slots__ = ("bundles",)
    BUNDLES_FIELD_NUMBER: _ClassVar[int]
    bundles: _containers.RepeatedCompositeFieldContainer[Bundle]
    def __init__(self, bundles: _Optional[_Iterable[_Union[Bundle, _Mapping]]] = ...) -> None: ...

class GetBundleRequest(_message.Message):
    __slots__ = ("bundle_id",)
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    bundle_id: str
    def __init__(self, bundle_id: _Optional[str] = ...) -> None: ...

class GetBundleResponse(_message.Message):
    __slots__ = ("bundle",)
    BUNDLE_FIELD_NUMBER: _ClassVar[int]
    bundle: Bundle
    def __init__(self, bundle: _Optional[_Union[Bundle, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("service", "revision", "flags", "shedding", "pin", "instances", "drift", "last_contact", "unknown", "sync_clients", "stale", "stale_after")
    class DriftEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    DRIFT_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    SYNC_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    STALE_FIELD_NUMBER: _ClassVar[int]
    STALE_AFTER_FIELD_NUMBER: _ClassVar[int]
    service: str
    revision: int
    flags: _containers.RepeatedCompositeFieldContainer[_types_pb2.Flag]
    shedding: _types_pb2.Shedding
    pin: _types_pb2.Pin
    instances: _containers.RepeatedCompositeFieldContainer[_types_pb2.Instance]
    drift: _containers.ScalarMap[str, int]
    last_contact: _timestamp_pb2.Timestamp
    unknown: _types_pb2.UnknownService
    sync_clients: int
    stale: _containers.RepeatedCompositeFieldContainer[StaleMitigation]
    stale_after: _duration_pb2.Duration
    def __init__(self, service: _Optional[str] = ..., revision: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[_types_pb2.Flag, _Mapping]]] = ..., shedding: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ..., pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ..., instances: _Optional[_Iterable[_Union[_types_pb2.Instance, _Mapping]]] = ..., drift: _Optional[_Mapping[str, int]] = ..., last_contact: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., unknown: _Optional[_Union[_types_pb2.UnknownService, _Mapping]] = ..., sync_clients: _Optional[int] = ..., stale: _Optional[_Iterable[_Union[StaleMitigation, _Mapping]]] = ..., stale_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class StaleMitigation(_message.Message):
    __slots__ = ("kind", "scope", "name", "set_at", "age")
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    SET_AT_FIELD_NUMBER: _ClassVar[int]
    AGE_FIELD_NUMBER: _ClassVar[int]
    kind: str
    scope: str
    name: str
    set_at: _timestamp_pb2.Timestamp
    age: _duration_pb2.Duration
    def __init__(self, kind: _Optional[str] = ..., scope: _Optional[str] = ..., name: _Optional[str] = ..., set_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListServicesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServiceSummary(_message.Message):
    __slots__ = ("service", "connected", "last_contact", "flags", "shedding", "pinned_version", "known_good")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    LAST_CONTACT_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    PINNED_VERSION_FIELD_NUMBER: _ClassVar[int]
    KNOWN_GOOD_FIELD_NUMBER: _ClassVar[int]
    service: str
    connected: int
    last_contact: _timestamp_pb2.Timestamp
    flags: int
    shedding: bool
    pinned_version: str
    known_good: int
    def __init__(self, service: _Optional[str] = ..., connected: _Optional[int] = ..., last_contact: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., flags: _Optional[int] = ..., shedding: _Optional[bool] = ..., pinned_version: _Optional[str] = ..., known_good: _Optional[int] = ...) -> None: ...

class ListServicesResponse(_message.Message):
    __slots__ = ("services", "memory")
    SERVICES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    services: _containers.RepeatedCompositeFieldContainer[ServiceSummary]
    memory: _duration_pb2.Duration
    def __init__(self, services: _Optional[_Iterable[_Union[ServiceSummary, _Mapping]]] = ..., memory: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ListHistoryRequest(_message.Message):
    __slots__ = ("service", "incident", "since", "until", "limit")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    service: str
    incident: str
    since: _timestamp_pb2.Timestamp
    until: _timestamp_pb2.Timestamp
    limit: int
    def __init__(self, service: _Optional[str] = ..., incident: _Optional[str] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListHistoryResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[_types_pb2.AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[_types_pb2.AuditEntry, _Mapping]]] = ...) -> None: ...

class WatchChangesRequest(_message.Message):
    __slots__ = ("service",)
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    service: str
    def __init__(self, service: _Optional[str] = ...) -> None: ...

class WatchChangesResponse(_message.Message):
    __slots__ = ("revision", "changes")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    revision: int
    changes: _containers.RepeatedCompositeFieldContainer[_types_pb2.AuditEntry]
    def __init__(self, revision: _Optional[int] = ..., changes: _Optional[_Iterable[_Union[_types_pb2.AuditEntry, _Mapping]]] = ...) -> None: ...

class WaitAppliedRequest(_message.Message):
    __slots__ = ("service", "revision", "timeout")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    service: str
    revision: int
    timeout: _duration_pb2.Duration
    def __init__(self, service: _Optional[str] = ..., revision: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class WaitAppliedResponse(_message.Message):
    __slots__ = ("all_applied", "connected", "applied", "pending", "nacks", "applied_at", "sync_clients", "unknown")
    class NacksEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ALL_APPLIED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    NACKS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    SYNC_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    all_applied: bool
    connected: int
    applied: int
    pending: _containers.RepeatedCompositeFieldContainer[_types_pb2.Instance]
    nacks: _containers.ScalarMap[str, str]
    applied_at: _timestamp_pb2.Timestamp
    sync_clients: int
    unknown: _types_pb2.UnknownService
    def __init__(self, all_applied: _Optional[bool] = ..., connected: _Optional[int] = ..., applied: _Optional[int] = ..., pending: _Optional[_Iterable[_Union[_types_pb2.Instance, _Mapping]]] = ..., nacks: _Optional[_Mapping[str, str]] = ..., applied_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sync_clients: _Optional[int] = ..., unknown: _Optional[_Union[_types_pb2.UnknownService, _Mapping]] = ...) -> None: ...

class GetTimelineRequest(_message.Message):
    __slots__ = ("incident", "limit")
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    incident: str
    limit: int
    def __init__(self, incident: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ServiceApplied(_message.Message):
    __slots__ = ("service", "applied_at", "instances")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_AT_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    service: str
    applied_at: _timestamp_pb2.Timestamp
    instances: int
    def __init__(self, service: _Optional[str] = ..., applied_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., instances: _Optional[int] = ...) -> None: ...

class TimelineEntry(_message.Message):
    __slots__ = ("change", "applied")
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    APPLIED_FIELD_NUMBER: _ClassVar[int]
    change: _types_pb2.AuditEntry
    applied: _containers.RepeatedCompositeFieldContainer[ServiceApplied]
    def __init__(self, change: _Optional[_Union[_types_pb2.AuditEntry, _Mapping]] = ..., applied: _Optional[_Iterable[_Union[ServiceApplied, _Mapping]]] = ...) -> None: ...

class GetTimelineResponse(_message.Message):
    __slots__ = ("incident", "entries")
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    incident: str
    entries: _containers.RepeatedCompositeFieldContainer[TimelineEntry]
    def __init__(self, incident: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[TimelineEntry, _Mapping]]] = ...) -> None: ...

class ListNotificationsRequest(_message.Message):
    __slots__ = ("limit",)
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    limit: int
    def __init__(self, limit: _Optional[int] = ...) -> None: ...

class NotificationDestination(_message.Message):
    __slots__ = ("name", "cursor", "pending_id", "pending_since", "attempts")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    PENDING_ID_FIELD_NUMBER: _ClassVar[int]
    PENDING_SINCE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    cursor: int
    pending_id: str
    pending_since: _timestamp_pb2.Timestamp
    attempts: int
    def __init__(self, name: _Optional[str] = ..., cursor: _Optional[int] = ..., pending_id: _Optional[str] = ..., pending_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ...) -> None: ...

class FailedNotification(_message.Message):
    __slots__ = ("id", "destination", "kind", "title", "lines", "first_attempt", "given_up_at", "attempts", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    DESTINATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TITLE_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    FIRST_ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    GIVEN_UP_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: str
    destination: str
    kind: str
    title: str
    lines: _containers.RepeatedScalarFieldContainer[str]
    first_attempt: _timestamp_pb2.Timestamp
    given_up_at: _timestamp_pb2.Timestamp
    attempts: int
    error: str
    def __init__(self, id: _Optional[str] = ..., destination: _Optional[str] = ..., kind: _Optional[str] = ..., title: _Optional[str] = ..., lines: _Optional[_Iterable[str]] = ..., first_attempt: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., given_up_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ListNotificationsResponse(_message.Message):
    __slots__ = ("sender", "destinations", "failed")
    SENDER_FIELD_NUMBER: _ClassVar[int]
    DESTINATIONS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    sender: str
    destinations: _containers.RepeatedCompositeFieldContainer[NotificationDestination]
    failed: _containers.RepeatedCompositeFieldContainer[FailedNotification]
    def __init__(self, sender: _Optional[str] = ..., destinations: _Optional[_Iterable[_Union[NotificationDestination, _Mapping]]] = ..., failed: _Optional[_Iterable[_Union[FailedNotification, _Mapping]]] = ...) -> None: ...

class LabelMatcher(_message.Message):
    __slots__ = ("label", "value", "type")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    label: str
    value: str
    type: MatchType
    def __init__(self, label: _Optional[str] = ..., value: _Optional[str] = ..., type: _Optional[_Union[MatchType, str]] = ...) -> None: ...

class Trigger(_message.Message):
    __slots__ = ("name", "matchers", "bundle_name", "changes", "ttl", "revert_on_resolve", "cooldown", "dry_run", "enabled", "meta", "last_fired")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MATCHERS_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_NAME_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    REVERT_ON_RESOLVE_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    META_FIELD_NUMBER: _ClassVar[int]
    LAST_FIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    matchers: _containers.RepeatedCompositeFieldContainer[LabelMatcher]
    bundle_name: str
    changes: _containers.RepeatedCompositeFieldContainer[BundleChange]
    ttl: _duration_pb2.Duration
    revert_on_resolve: bool
    cooldown: _duration_pb2.Duration
    dry_run: bool
    enabled: bool
    meta: _types_pb2.Meta
    last_fired: _timestamp_pb2.Timestamp
    def __init__(self, name: _Optional[str] = ..., matchers: _Optional[_Iterable[_Union[LabelMatcher, _Mapping]]] = ..., bundle_name: _Optional[str] = ..., changes: _Optional[_Iterable[_Union[BundleChange, _Mapping]]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., revert_on_resolve: _Optional[bool] = ..., cooldown: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dry_run: _Optional[bool] = ..., enabled: _Optional[bool] = ..., meta: _Optional[_Union[_types_pb2.Meta, _Mapping]] = ..., last_fired: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SetTriggerRequest(_message.Message):
    __slots__ = ("trigger", "options")
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    trigger: Trigger
    options: _types_pb2.WriteOptions
    def __init__(self, trigger: _Optional[_Union[Trigger, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class SetTriggerResponse(_message.Message):
    __slots__ = ("result", "trigger")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    trigger: Trigger
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., trigger: _Optional[_Union[Trigger, _Mapping]] = ...) -> None: ...

class GetTriggerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class GetTriggerResponse(_message.Message):
    __slots__ = ("trigger",)
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    trigger: Trigger
    def __init__(self, trigger: _Optional[_Union[Trigger, _Mapping]] = ...) -> None: ...

class ListTriggersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListTriggersResponse(_message.Message):
    __slots__ = ("triggers",)
    TRIGGERS_FIELD_NUMBER: _ClassVar[int]
    triggers: _containers.RepeatedCompositeFieldContainer[Trigger]
    def __init__(self, triggers: _Optional[_Iterable[_Union[Trigger, _Mapping]]] = ...) -> None: ...

class DeleteTriggerRequest(_message.Message):
    __slots__ = ("name", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    options: _types_pb2.WriteOptions
    def __init__(self, name: _Optional[str] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class DeleteTriggerResponse(_message.Message):
    __slots__ = ("result",)
    RESULT_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ...) -> None: ...

class SetTriggerEnabledRequest(_message.Message):
    __slots__ = ("name", "enabled", "options")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    name: str
    enabled: bool
    options: _types_pb2.WriteOptions
    def __init__(self, name: _Optional[str] = ..., enabled: _Optional[bool] = ..., options: _Optional[_Union[_types_pb2.WriteOptions, _Mapping]] = ...) -> None: ...

class SetTriggerEnabledResponse(_message.Message):
    __slots__ = ("result", "trigger")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    result: _types_pb2.WriteResult
    trigger: Trigger
    def __init__(self, result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ..., trigger: _Optional[_Union[Trigger, _Mapping]] = ...) -> None: ...

class FireTriggerRequest(_message.Message):
    __slots__ = ("name", "group_key", "incident", "summary", "url")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_KEY_FIELD_NUMBER: _ClassVar[int]
    INCIDENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    URL_FIELD_NUMBER: _ClassVar[int]
    name: str
    group_key: str
    incident: str
    summary: str
    url: str
    def __init__(self, name: _Optional[str] = ..., group_key: _Optional[str] = ..., incident: _Optional[str] = ..., summary: _Optional[str] = ..., url: _Optional[str] = ...) -> None: ...

class FireTriggerResponse(_message.Message):
    __slots__ = ("outcome", "bundle_id", "message", "result")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    outcome: TriggerOutcome
    bundle_id: str
    message: str
    result: _types_pb2.WriteResult
    def __init__(self, outcome: _Optional[_Union[TriggerOutcome, str]] = ..., bundle_id: _Optional[str] = ..., message: _Optional[str] = ..., result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ...) -> None: ...

class ResolveTriggerRequest(_message.Message):
    __slots__ = ("name", "group_key")
    NAME_FIELD_NUMBER: _ClassVar[int]
    GROUP_KEY_FIELD_NUMBER: _ClassVar[int]
    name: str
    group_key: str
    def __init__(self, name: _Optional[str] = ..., group_key: _Optional[str] = ...) -> None: ...

class ResolveTriggerResponse(_message.Message):
    __slots__ = ("outcome", "bundle_id", "message", "result")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    outcome: TriggerOutcome
    bundle_id: str
    message: str
    result: _types_pb2.WriteResult
    def __init__(self, outcome: _Optional[_Union[TriggerOutcome, str]] = ..., bundle_id: _Optional[str] = ..., message: _Optional[str] = ..., result: _Optional[_Union[_types_pb2.WriteResult, _Mapping]] = ...) -> None: ...
