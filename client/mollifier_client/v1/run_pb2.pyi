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

class RunStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_STATUS_UNSPECIFIED: _ClassVar[RunStatus]
    RUN_STATUS_QUEUED: _ClassVar[RunStatus]
    RUN_STATUS_DELAYED: _ClassVar[RunStatus]
    RUN_STATUS_DRAINING: _ClassVar[RunStatus]
    RUN_STATUS_PENDING: _ClassVar[RunStatus]
    RUN_STATUS_CANCELED: _ClassVar[RunStatus]
    RUN_STATUS_SYSTEM_FAILURE: _ClassVar[RunStatus]
    RUN_STATUS_FAILED: _ClassVar[RunStatus]

class RunSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_SOURCE_UNSPECIFIED: _ClassVar[RunSource]
    RUN_SOURCE_BUFFER: _ClassVar[RunSource]
    RUN_SOURCE_POSTGRES: _ClassVar[RunSource]
RUN_STATUS_UNSPECIFIED: RunStatus
RUN_STATUS_QUEUED: RunStatus
RUN_STATUS_DELAYED: RunStatus
RUN_STATUS_DRAINING: RunStatus
RUN_STATUS_PENDING: RunStatus
RUN_STATUS_CANCELED: RunStatus
RUN_STATUS_SYSTEM_FAILURE: RunStatus
RUN_STATUS_FAILED: RunStatus
RUN_SOURCE_UNSPECIFIED: RunSource
RUN_SOURCE_BUFFER: RunSource
RUN_SOURCE_POSTGRES: RunSource

class RunSnapshot(_message.Message):
    __slots__ = ("run_id", "env_id", "org_id", "task_identifier", "payload", "payload_type", "idempotency_key", "idempotency_key_expires_at", "tags", "metadata", "metadata_type", "delay_until", "ttl", "queue", "concurrency_key", "machine_preset", "parent_run_id", "root_run_id", "batch_id", "batch_index", "trace_id", "span_id", "max_attempts", "priority", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_TYPE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_TYPE_FIELD_NUMBER: _ClassVar[int]
    DELAY_UNTIL_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    QUEUE_FIELD_NUMBER: _ClassVar[int]
    CONCURRENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MACHINE_PRESET_FIELD_NUMBER: _ClassVar[int]
    PARENT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROOT_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_INDEX_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    SPAN_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    env_id: str
    org_id: str
    task_identifier: str
    payload: bytes
    payload_type: str
    idempotency_key: str
    idempotency_key_expires_at: _timestamp_pb2.Timestamp
    tags: _containers.RepeatedScalarFieldContainer[str]
    metadata: bytes
    metadata_type: str
    delay_until: _timestamp_pb2.Timestamp
    ttl: _duration_pb2.Duration
    queue: str
    concurrency_key: str
    machine_preset: str
    parent_run_id: str
    root_run_id: str
    batch_id: str
    batch_index: int
    trace_id: str
    span_id: str
    max_attempts: int
    priority: int
    extra: _containers.ScalarMap[str, str]
    def __init__(self, run_id: _Optional[str] = ..., env_id: _Optional[str] = ..., org_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., payload: _Optional[bytes] = ..., payload_type: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., idempotency_key_expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., tags: _Optional[_Iterable[str]] = ..., metadata: _Optional[bytes] = ..., metadata_type: _Optional[str] = ..., delay_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., queue: _Optional[str] = ..., concurrency_key: _Optional[str] = ..., machine_preset: _Optional[str] = ..., parent_run_id: _Optional[str] = ..., root_run_id: _Optional[str] = ..., batch_id: _Optional[str] = ..., batch_index: _Optional[int] = ..., trace_id: _Optional[str] = ..., span_id: _Optional[str] = ..., max_attempts: _Optional[int] = ..., priority: _Optional[int] = ..., extra: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "env_id", "status", "source", "snapshot", "created_at", "attempts", "last_error", "canceled_at", "cancel_reason", "materialized_at")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    CANCELED_AT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZED_AT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    env_id: str
    status: RunStatus
    source: RunSource
    snapshot: RunSnapshot
    created_at: _timestamp_pb2.Timestamp
    attempts: int
    last_error: str
    canceled_at: _timestamp_pb2.Timestamp
    cancel_reason: str
    materialized_at: _timestamp_pb2.Timestamp
    def __init__(self, run_id: _Optional[str] = ..., env_id: _Optional[str] = ..., status: _Optional[_Union[RunStatus, str]] = ..., source: _Optional[_Union[RunSource, str]] = ..., snapshot: _Optional[_Union[RunSnapshot, _Mapping]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., last_error: _Optional[str] = ..., canceled_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., cancel_reason: _Optional[str] = ..., materialized_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RunRef(_message.Message):
    __slots__ = ("env_id", "run_id")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...
