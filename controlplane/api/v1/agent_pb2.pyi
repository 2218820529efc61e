import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from controlplane.api.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Hello(_message.Message):
    __slots__ = ("service", "instance_id", "running_version", "last_applied_revision", "agent_version", "override")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_APPLIED_REVISION_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    service: str
    instance_id: str
    running_version: str
    last_applied_revision: int
    agent_version: str
    override: Override
    def __init__(self, service: _Optional[str] = ..., instance_id: _Optional[str] = ..., running_version: _Optional[str] = ..., last_applied_revision: _Optional[int] = ..., agent_version: _Optional[str] = ..., override: _Optional[_Union[Override, _Mapping]] = ...) -> None: ...

class Override(_message.Message):
    __slots__ = ("active", "reason", "actor", "expires_at", "content_json", "digest")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    CONTENT_JSON_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    active: bool
    reason: str
    actor: str
    expires_at: _timestamp_pb2.Timestamp
    content_json: str
    digest: str
    def __init__(self, active: _Optional[bool] = ..., reason: _Optional[str] = ..., actor: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., content_json: _Optional[str] = ..., digest: _Optional[str] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("revision", "rejected_reason")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    REJECTED_REASON_FIELD_NUMBER: _ClassVar[int]
    revision: int
    rejected_reason: str
    def __init__(self, revision: _Optional[int] = ..., rejected_reason: _Optional[str] = ...) -> None: ...

class SyncRequest(_message.Message):
    __slots__ = ("hello", "ack", "override")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    OVERRIDE_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    ack: Ack
    override: Override
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., ack: _Optional[_Union[Ack, _Mapping]] = ..., override: _Optional[_Union[Override, _Mapping]] = ...) -> None: ...

class Snapshot(_message.Message):
    __slots__ = ("revision", "flags", "shedding", "pin")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    revision: int
    flags: _containers.RepeatedCompositeFieldContainer[_types_pb2.Flag]
    shedding: _types_pb2.Shedding
    pin: _types_pb2.Pin
    def __init__(self, revision: _Optional[int] = ..., flags: _Optional[_Iterable[_Union[_types_pb2.Flag, _Mapping]]] = ..., shedding: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ..., pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ...) -> None: ...

class FlagRef(_message.Message):
    __slots__ = ("scope", "name")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    scope: str
    name: str
    def __init__(self, scope: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("revision", "flags_set", "flags_removed", "shedding", "shedding_removed", "pin", "pin_removed")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    FLAGS_SET_FIELD_NUMBER: _ClassVar[int]
    FLAGS_REMOVED_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_FIELD_NUMBER: _ClassVar[int]
    SHEDDING_REMOVED_FIELD_NUMBER: _ClassVar[int]
    PIN_FIELD_NUMBER: _ClassVar[int]
    PIN_REMOVED_FIELD_NUMBER: _ClassVar[int]
    revision: int
    flags_set: _containers.RepeatedCompositeFieldContainer[_types_pb2.Flag]
    flags_removed: _containers.RepeatedCompositeFieldContainer[FlagRef]
    shedding: _types_pb2.Shedding
    shedding_removed: bool
    pin: _types_pb2.Pin
    pin_removed: bool
    def __init__(self, revision: _Optional[int] = ..., flags_set: _Optional[_Iterable[_Union[_types_pb2.Flag, _Mapping]]] = ..., flags_removed: _Optional[_Iterable[_Union[FlagRef, _Mapping]]] = ..., shedding: _Optional[_Union[_types_pb2.Shedding, _Mapping]] = ..., shedding_removed: _Optional[bool] = ..., pin: _Optional[_Union[_types_pb2.Pin, _Mapping]] = ..., pin_removed: _Optional[bool] = ...) -> None: ...

class Resume(_message.Message):
    __slots__ = ("revision", "server_revision")
    REVISION_FIELD_NUMBER: _ClassVar[int]
    SERVER_REVISION_FIELD_NUMBER: _ClassVar[int]
    revision: int
    server_revision: int
    def __init__(self, revision: _Optional[int] = ..., server_revision: _Optional[int] = ...) -> None: ...

class SyncResponse(_message.Message):
    __slots__ = ("snapshot", "change", "resume")
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    snapshot: Snapshot
    change: Change
    resume: Resume
    def __init__(self, snapshot: _Optional[_Union[Snapshot, _Mapping]] = ..., change: _Optional[_Union[Change, _Mapping]] = ..., resume: _Optional[_Union[Resume, _Mapping]] = ...) -> None: ...
