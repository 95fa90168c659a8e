from mollifier_client.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AcceptResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCEPT_RESULT_UNSPECIFIED: _ClassVar[AcceptResult]
    ACCEPT_RESULT_ACCEPTED: _ClassVar[AcceptResult]
    ACCEPT_RESULT_DUPLICATE_RUN_ID: _ClassVar[AcceptResult]
    ACCEPT_RESULT_DUPLICATE_IDEMPOTENCY_KEY: _ClassVar[AcceptResult]
ACCEPT_RESULT_UNSPECIFIED: AcceptResult
ACCEPT_RESULT_ACCEPTED: AcceptResult
ACCEPT_RESULT_DUPLICATE_RUN_ID: AcceptResult
ACCEPT_RESULT_DUPLICATE_IDEMPOTENCY_KEY: AcceptResult

class AcceptRequest(_message.Message):
    __slots__ = ("snapshot",)
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    snapshot: _run_pb2.RunSnapshot
    def __init__(self, snapshot: _Optional[_Union[_run_pb2.RunSnapshot, _Mapping]] = ...) -> None: ...

class AcceptResponse(_message.Message):
    __slots__ = ("result", "run", "existing_run_id")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    EXISTING_RUN_ID_FIELD_NUMBER: _ClassVar[int]
    result: AcceptResult
    run: _run_pb2.Run
    existing_run_id: str
    def __init__(self, result: _Optional[_Union[AcceptResult, str]] = ..., run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., existing_run_id: _Optional[str] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("env_id", "run_id")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_id: str
    def __init__(self, env_id: _Optional[str] = ..., run_id: _Optional[str] = ...) -> None: ...

class GetRunResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class FindRunByIdempotencyKeyRequest(_message.Message):
    __slots__ = ("env_id", "task_identifier", "idempotency_key")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    task_identifier: str
    idempotency_key: str
    def __init__(self, env_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class FindRunByIdempotencyKeyResponse(_message.Message):
    __slots__ = ("run",)
    RUN_FIELD_NUMBER: _ClassVar[int]
    run: _run_pb2.Run
    def __init__(self, run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ...) -> None: ...

class ListRunsRequest(_message.Message):
    __slots__ = ("env_id", "page_size", "page_token")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    page_size: int
    page_token: str
    def __init__(self, env_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRunsResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[_run_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
