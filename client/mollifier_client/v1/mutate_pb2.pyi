import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mollifier_client.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MutationTarget(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MUTATION_TARGET_UNSPECIFIED: _ClassVar[MutationTarget]
    MUTATION_TARGET_BUFFER: _ClassVar[MutationTarget]
    MUTATION_TARGET_POSTGRES: _ClassVar[MutationTarget]

class MetadataOperationType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METADATA_OPERATION_TYPE_UNSPECIFIED: _ClassVar[MetadataOperationType]
    METADATA_OPERATION_TYPE_SET: _ClassVar[MetadataOperationType]
    METADATA_OPERATION_TYPE_DELETE: _ClassVar[MetadataOperationType]
    METADATA_OPERATION_TYPE_APPEND: _ClassVar[MetadataOperationType]
    METADATA_OPERATION_TYPE_REMOVE: _ClassVar[MetadataOperationType]
    METADATA_OPERATION_TYPE_INCREMENT: _ClassVar[MetadataOperationType]
MUTATION_TARGET_UNSPECIFIED: MutationTarget
MUTATION_TARGET_BUFFER: MutationTarget
MUTATION_TARGET_POSTGRES: MutationTarget
METADATA_OPERATION_TYPE_UNSPECIFIED: MetadataOperationType
METADATA_OPERATION_TYPE_SET: MetadataOperationType
METADATA_OPERATION_TYPE_DELETE: MetadataOperationType
METADATA_OPERATION_TYPE_APPEND: MetadataOperationType
METADATA_OPERATION_TYPE_REMOVE: MetadataOperationType
METADATA_OPERATION_TYPE_INCREMENT: MetadataOperationType

class CancelRunRequest(_message.Message):
    __slots__ = ("env_id", "run_id", "request_id", "reason")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    request_id: str
    reason: str
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run", "applied_to", "already_final")
    RUN_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_FIELD_NUMBER: _ClassVar[int]
    ALREADY_FINAL_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    applied_to: MutationTarget
    already_final: bool
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., applied_to: _Optional[_Union[MutationTarget, str]] = ..., already_final: _Optional[bool] = ...) -> None: ...

class RescheduleRunRequest(_message.Message):
    __slots__ = ("env_id", "run_id", "request_id", "delay_until")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DELAY_UNTIL_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    request_id: str
    delay_until: _timestamp_pb2.Timestamp
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., delay_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RescheduleRunResponse(_message.Message):
    __slots__ = ("run", "applied_to")
    RUN_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    applied_to: MutationTarget
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., applied_to: _Optional[_Union[MutationTarget, str]] = ...) -> None: ...

class MetadataOperation(_message.Message):
    __slots__ = ("type", "path", "value_json")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    VALUE_JSON_FIELD_NUMBER: _ClassVar[int]
    type: MetadataOperationType
    path: str
    value_json: str
    def __init__(self, type: _Optional[_Union[MetadataOperationType, str]] = ..., path: _Optional[str] = ..., value_json: _Optional[str] = ...) -> None: ...

class UpdateMetadataRequest(_message.Message):
    __slots__ = ("env_id", "run_id", "request_id", "metadata_json", "operations", "parent_operations", "root_operations")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    PARENT_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    ROOT_OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    request_id: str
    metadata_json: str
    operations: _containers.RepeatedCompositeFieldContainer[MetadataOperation]
    parent_operations: _containers.RepeatedCompositeFieldContainer[MetadataOperation]
    root_operations: _containers.RepeatedCompositeFieldContainer[MetadataOperation]
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., metadata_json: _Optional[str] = ..., operations: _Optional[_Iterable[_Union[MetadataOperation, _Mapping]]] = ..., parent_operations: _Optional[_Iterable[_Union[MetadataOperation, _Mapping]]] = ..., root_operations: _Optional[_Iterable[_Union[MetadataOperation, _Mapping]]] = ...) -> None: ...

class MetadataResult(_message.Message):
    __slots__ = ("run_id", "applied_to", "metadata_json")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    applied_to: MutationTarget
    metadata_json: str
    def __init__(self, run_id: _Optional[str] = ..., applied_to: _Optional[_Union[MutationTarget, str]] = ..., metadata_json: _Optional[str] = ...) -> None: ...

class UpdateMetadataResponse(_message.Message):
    __slots__ = ("run", "parent", "root")
    RUN_FIELD_NUMBER: _ClassVar[int]
    PARENT_FIELD_NUMBER: _ClassVar[int]
    ROOT_FIELD_NUMBER: _ClassVar[int]
    run: MetadataResult
    parent: MetadataResult
    root: MetadataResult
    def __init__(self, run: _Optional[_Union[MetadataResult, _Mapping]] = ..., parent: _Optional[_Union[MetadataResult, _Mapping]] = ..., root: _Optional[_Union[MetadataResult, _Mapping]] = ...) -> None: ...

class AddTagsRequest(_message.Message):
    __slots__ = ("env_id", "run_id", "request_id", "tags")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    request_id: str
    tags: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., tags: _Optional[_Iterable[str]] = ...) -> None: ...

class AddTagsResponse(_message.Message):
    __slots__ = ("tags", "applied_to")
    TAGS_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_FIELD_NUMBER: _ClassVar[int]
    tags: _containers.RepeatedScalarFieldContainer[str]
    applied_to: MutationTarget
    def __init__(self, tags: _Optional[_Iterable[str]] = ..., applied_to: _Optional[_Union[MutationTarget, str]] = ...) -> None: ...

class ResetIdempotencyKeyRequest(_message.Message):
    __slots__ = ("env_id", "request_id", "task_identifier", "idempotency_key")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    request_id: str
    task_identifier: str
    idempotency_key: str
    def __init__(self, env_id: _Optional[str] = ..., request_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class ResetIdempotencyKeyResponse(_message.Message):
    __slots__ = ("reset_in_buffer", "reset_in_postgres", "run_id")
    RESET_IN_BUFFER_FIELD_NUMBER: _ClassVar[int]
    RESET_IN_POSTGRES_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    reset_in_buffer: bool
    reset_in_postgres: bool
    run_id: str
    def __init__(self, reset_in_buffer: _Optional[bool] = ..., reset_in_postgres: _Optional[bool] = ..., run_id: _Optional[str] = ...) -> None: ...

class ReplayRunRequest(_message.Message):
    __slots__ = ("env_id", "run_id", "request_id", "new_run_id")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    request_id: str
    new_run_id: str
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ..., request_id: _Optional[str] = ..., new_run_id: _Optional[str] = ...) -> None: ...

class ReplayRunResponse(_message.Message):
    __slots__ = ("run", "applied_to")
    RUN_FIELD_NUMBER: _ClassVar[int]
    APPLIED_TO_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    applied_to: MutationTarget
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., applied_to: _Optional[_Union[MutationTarget, str]] = ...) -> None: ...
