import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mollifier_client.v1 import run_pb2 as _run_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DrainState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DRAIN_STATE_UNSPECIFIED: _ClassVar[DrainState]
    DRAIN_STATE_RUNNING: _ClassVar[DrainState]
    DRAIN_STATE_PAUSED: _ClassVar[DrainState]
    DRAIN_STATE_DISABLED: _ClassVar[DrainState]
DRAIN_STATE_UNSPECIFIED: DrainState
DRAIN_STATE_RUNNING: DrainState
DRAIN_STATE_PAUSED: DrainState
DRAIN_STATE_DISABLED: DrainState

class EnvStatus(_message.Message):
    __slots__ = ("env_id", "queued", "draining", "failed", "oldest_age", "tripped_until")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    queued: int
    draining: int
    failed: int
    oldest_age: _duration_pb2.Duration
    tripped_until: _timestamp_pb2.Timestamp
    def __init__(self, env_id: _Optional[str] = ..., queued: _Optional[int] = ..., draining: _Optional[int] = ..., failed: _Optional[int] = ..., oldest_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., tripped_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class OrgStatus(_message.Message):
    __slots__ = ("org_id", "queued", "draining", "envs")
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ENVS_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    queued: int
    draining: int
    envs: _containers.RepeatedCompositeFieldContainer[EnvStatus]
    def __init__(self, org_id: _Optional[str] = ..., queued: _Optional[int] = ..., draining: _Optional[int] = ..., envs: _Optional[_Iterable[_Union[EnvStatus, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("org_id",)
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    org_id: str
    def __init__(self, org_id: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("state", "orgs", "in_flight", "materialized_total", "failed_total", "oldest_age", "stale_entries")
    STATE_FIELD_NUMBER: _ClassVar[int]
    ORGS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    MATERIALIZED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    FAILED_TOTAL_FIELD_NUMBER: _ClassVar[int]
    OLDEST_AGE_FIELD_NUMBER: _ClassVar[int]
    STALE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    state: DrainState
    orgs: _containers.RepeatedCompositeFieldContainer[OrgStatus]
    in_flight: int
    materialized_total: int
    failed_total: int
    oldest_age: _duration_pb2.Duration
    stale_entries: int
    def __init__(self, state: _Optional[_Union[DrainState, str]] = ..., orgs: _Optional[_Iterable[_Union[OrgStatus, _Mapping]]] = ..., in_flight: _Optional[int] = ..., materialized_total: _Optional[int] = ..., failed_total: _Optional[int] = ..., oldest_age: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., stale_entries: _Optional[int] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class PauseResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: DrainState
    def __init__(self, state: _Optional[_Union[DrainState, str]] = ...) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: DrainState
    def __init__(self, state: _Optional[_Union[DrainState, str]] = ...) -> None: ...

class LeaseRequest(_message.Message):
    __slots__ = ("consumer_id", "max_runs", "lease_duration")
    CONSUMER_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNS_FIELD_NUMBER: _ClassVar[int]
    LEASE_DURATION_FIELD_NUMBER: _ClassVar[int]
    consumer_id: str
    max_runs: int
    lease_duration: _duration_pb2.Duration
    def __init__(self, consumer_id: _Optional[str] = ..., max_runs: _Optional[int] = ..., lease_duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LeaseResponse(_message.Message):
    __slots__ = ("lease_token", "lease_deadline", "runs")
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_DEADLINE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    lease_token: str
    lease_deadline: _timestamp_pb2.Timestamp
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.Run]
    def __init__(self, lease_token: _Optional[str] = ..., lease_deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., runs: _Optional[_Iterable[_Union[_run_pb2.Run, _Mapping]]] = ...) -> None: ...

class AckRequest(_message.Message):
    __slots__ = ("lease_token", "runs")
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    lease_token: str
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRef]
    def __init__(self, lease_token: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[_run_pb2.RunRef, _Mapping]]] = ...) -> None: ...

class AckResponse(_message.Message):
    __slots__ = ("acked", "rejected")
    ACKED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    acked: int
    rejected: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRef]
    def __init__(self, acked: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[_run_pb2.RunRef, _Mapping]]] = ...) -> None: ...

class NackRequest(_message.Message):
    __slots__ = ("lease_token", "runs", "retry_after", "dead_letter", "error")
    LEASE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    lease_token: str
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRef]
    retry_after: _duration_pb2.Duration
    dead_letter: bool
    error: str
    def __init__(self, lease_token: _Optional[str] = ..., runs: _Optional[_Iterable[_Union[_run_pb2.RunRef, _Mapping]]] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., dead_letter: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class NackResponse(_message.Message):
    __slots__ = ("requeued", "dead_lettered", "rejected")
    REQUEUED_FIELD_NUMBER: _ClassVar[int]
    DEAD_LETTERED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    requeued: int
    dead_lettered: int
    rejected: _containers.RepeatedCompositeFieldContainer[_run_pb2.RunRef]
    def __init__(self, requeued: _Optional[int] = ..., dead_lettered: _Optional[int] = ..., rejected: _Optional[_Iterable[_Union[_run_pb2.RunRef, _Mapping]]] = ...) -> None: ...

class ListFailedRequest(_message.Message):
    __slots__ = ("env_id", "page_size", "page_token")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    page_size: int
    page_token: str
    def __init__(self, env_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListFailedResponse(_message.Message):
    __slots__ = ("runs", "next_page_token")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    runs: _containers.RepeatedCompositeFieldContainer[_run_pb2.Run]
    next_page_token: str
    def __init__(self, runs: _Optional[_Iterable[_Union[_run_pb2.Run, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RetryFailedRequest(_message.Message):
    __slots__ = ("env_id", "run_ids", "request_id")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    run_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, env_id: _Optional[str] = ..., run_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RetryFailedResponse(_message.Message):
    __slots__ = ("retried",)
    RETRIED_FIELD_NUMBER: _ClassVar[int]
    retried: int
    def __init__(self, retried: _Optional[int] = ...) -> None: ...
