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

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_PASS_THROUGH: _ClassVar[Decision]
    DECISION_SHADOW_LOG: _ClassVar[Decision]
    DECISION_MOLLIFY: _ClassVar[Decision]

class DecisionReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_REASON_UNSPECIFIED: _ClassVar[DecisionReason]
    DECISION_REASON_DISABLED: _ClassVar[DecisionReason]
    DECISION_REASON_ORG_NOT_ENABLED: _ClassVar[DecisionReason]
    DECISION_REASON_BYPASS_DEBOUNCE: _ClassVar[DecisionReason]
    DECISION_REASON_BYPASS_ONE_TIME_USE_TOKEN: _ClassVar[DecisionReason]
    DECISION_REASON_BYPASS_WAIT_FOR_COMPLETION: _ClassVar[DecisionReason]
    DECISION_REASON_UNDER_THRESHOLD: _ClassVar[DecisionReason]
    DECISION_REASON_TRIPPED: _ClassVar[DecisionReason]
    DECISION_REASON_BACKLOG: _ClassVar[DecisionReason]
    DECISION_REASON_SHADOW_TRIPPED: _ClassVar[DecisionReason]
    DECISION_REASON_FAIL_OPEN: _ClassVar[DecisionReason]
    DECISION_REASON_BUFFER_FULL: _ClassVar[DecisionReason]
    DECISION_REASON_POSTGRES_UNAVAILABLE: _ClassVar[DecisionReason]
    DECISION_REASON_POSTGRES_BUSY: _ClassVar[DecisionReason]

class ClaimState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLAIM_STATE_UNSPECIFIED: _ClassVar[ClaimState]
    CLAIM_STATE_CLAIMED: _ClassVar[ClaimState]
    CLAIM_STATE_RESOLVED: _ClassVar[ClaimState]
    CLAIM_STATE_BUSY: _ClassVar[ClaimState]
DECISION_UNSPECIFIED: Decision
DECISION_PASS_THROUGH: Decision
DECISION_SHADOW_LOG: Decision
DECISION_MOLLIFY: Decision
DECISION_REASON_UNSPECIFIED: DecisionReason
DECISION_REASON_DISABLED: DecisionReason
DECISION_REASON_ORG_NOT_ENABLED: DecisionReason
DECISION_REASON_BYPASS_DEBOUNCE: DecisionReason
DECISION_REASON_BYPASS_ONE_TIME_USE_TOKEN: DecisionReason
DECISION_REASON_BYPASS_WAIT_FOR_COMPLETION: DecisionReason
DECISION_REASON_UNDER_THRESHOLD: DecisionReason
DECISION_REASON_TRIPPED: DecisionReason
DECISION_REASON_BACKLOG: DecisionReason
DECISION_REASON_SHADOW_TRIPPED: DecisionReason
DECISION_REASON_FAIL_OPEN: DecisionReason
DECISION_REASON_BUFFER_FULL: DecisionReason
DECISION_REASON_POSTGRES_UNAVAILABLE: DecisionReason
DECISION_REASON_POSTGRES_BUSY: DecisionReason
CLAIM_STATE_UNSPECIFIED: ClaimState
CLAIM_STATE_CLAIMED: ClaimState
CLAIM_STATE_RESOLVED: ClaimState
CLAIM_STATE_BUSY: ClaimState

class GateInput(_message.Message):
    __slots__ = ("env_id", "org_id", "task_identifier", "org_feature_flags", "debounce", "one_time_use_token", "wait_for_completion")
    class OrgFeatureFlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    ORG_FEATURE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    DEBOUNCE_FIELD_NUMBER: _ClassVar[int]
    ONE_TIME_USE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    org_id: str
    task_identifier: str
    org_feature_flags: _containers.ScalarMap[str, bool]
    debounce: bool
    one_time_use_token: str
    wait_for_completion: bool
    def __init__(self, env_id: _Optional[str] = ..., org_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., org_feature_flags: _Optional[_Mapping[str, bool]] = ..., debounce: _Optional[bool] = ..., one_time_use_token: _Optional[str] = ..., wait_for_completion: _Optional[bool] = ...) -> None: ...

class GateOutcome(_message.Message):
    __slots__ = ("decision", "reason", "window_count", "threshold", "tripped_until")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: DecisionReason
    window_count: int
    threshold: int
    tripped_until: _timestamp_pb2.Timestamp
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[DecisionReason, str]] = ..., window_count: _Optional[int] = ..., threshold: _Optional[int] = ..., tripped_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("env_id", "org_id", "task_identifier", "org_feature_flags", "debounce", "one_time_use_token", "wait_for_completion")
    class OrgFeatureFlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    ORG_FEATURE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    DEBOUNCE_FIELD_NUMBER: _ClassVar[int]
    ONE_TIME_USE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    org_id: str
    task_identifier: str
    org_feature_flags: _containers.ScalarMap[str, bool]
    debounce: bool
    one_time_use_token: str
    wait_for_completion: bool
    def __init__(self, env_id: _Optional[str] = ..., org_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., org_feature_flags: _Optional[_Mapping[str, bool]] = ..., debounce: _Optional[bool] = ..., one_time_use_token: _Optional[str] = ..., wait_for_completion: _Optional[bool] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("decision", "reason", "window_count", "threshold", "tripped_until")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: DecisionReason
    window_count: int
    threshold: int
    tripped_until: _timestamp_pb2.Timestamp
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[DecisionReason, str]] = ..., window_count: _Optional[int] = ..., threshold: _Optional[int] = ..., tripped_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class EvaluateBatchRequest(_message.Message):
    __slots__ = ("inputs",)
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    inputs: _containers.RepeatedCompositeFieldContainer[GateInput]
    def __init__(self, inputs: _Optional[_Iterable[_Union[GateInput, _Mapping]]] = ...) -> None: ...

class EvaluateBatchResponse(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[GateOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[GateOutcome, _Mapping]]] = ...) -> None: ...

class TriggerRequest(_message.Message):
    __slots__ = ("env_id", "org_id", "task_identifier", "org_feature_flags", "debounce", "one_time_use_token", "wait_for_completion", "snapshot", "write_through")
    class OrgFeatureFlagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bool
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bool] = ...) -> None: ...
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    ORG_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    ORG_FEATURE_FLAGS_FIELD_NUMBER: _ClassVar[int]
    DEBOUNCE_FIELD_NUMBER: _ClassVar[int]
    ONE_TIME_USE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    WAIT_FOR_COMPLETION_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    WRITE_THROUGH_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    org_id: str
    task_identifier: str
    org_feature_flags: _containers.ScalarMap[str, bool]
    debounce: bool
    one_time_use_token: str
    wait_for_completion: bool
    snapshot: _run_pb2.RunSnapshot
    write_through: bool
    def __init__(self, env_id: _Optional[str] = ..., org_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., org_feature_flags: _Optional[_Mapping[str, bool]] = ..., debounce: _Optional[bool] = ..., one_time_use_token: _Optional[str] = ..., wait_for_completion: _Optional[bool] = ..., snapshot: _Optional[_Union[_run_pb2.RunSnapshot, _Mapping]] = ..., write_through: _Optional[bool] = ...) -> None: ...

class TriggerResponse(_message.Message):
    __slots__ = ("decision", "reason", "window_count", "threshold", "tripped_until", "run_id", "run", "duplicate")
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    decision: Decision
    reason: DecisionReason
    window_count: int
    threshold: int
    tripped_until: _timestamp_pb2.Timestamp
    run_id: str
    run: _run_pb2.Run
    duplicate: bool
    def __init__(self, decision: _Optional[_Union[Decision, str]] = ..., reason: _Optional[_Union[DecisionReason, str]] = ..., window_count: _Optional[int] = ..., threshold: _Optional[int] = ..., tripped_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., run_id: _Optional[str] = ..., run: _Optional[_Union[_run_pb2.Run, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ClaimIdempotencyKeyRequest(_message.Message):
    __slots__ = ("env_id", "task_identifier", "idempotency_key", "claim_ttl")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TTL_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    task_identifier: str
    idempotency_key: str
    claim_ttl: _duration_pb2.Duration
    def __init__(self, env_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., claim_ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ClaimIdempotencyKeyResponse(_message.Message):
    __slots__ = ("state", "claim_token", "run_id", "retry_after")
    STATE_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    state: ClaimState
    claim_token: str
    run_id: str
    retry_after: _duration_pb2.Duration
    def __init__(self, state: _Optional[_Union[ClaimState, str]] = ..., claim_token: _Optional[str] = ..., run_id: _Optional[str] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class PublishIdempotencyKeyRequest(_message.Message):
    __slots__ = ("env_id", "task_identifier", "idempotency_key", "claim_token", "run_id", "expires_at")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    task_identifier: str
    idempotency_key: str
    claim_token: str
    run_id: str
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, env_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., claim_token: _Optional[str] = ..., run_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class PublishIdempotencyKeyResponse(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class ReleaseIdempotencyKeyRequest(_message.Message):
    __slots__ = ("env_id", "task_identifier", "idempotency_key", "claim_token")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CLAIM_TOKEN_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    task_identifier: str
    idempotency_key: str
    claim_token: str
    def __init__(self, env_id: _Optional[str] = ..., task_identifier: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., claim_token: _Optional[str] = ...) -> None: ...

class ReleaseIdempotencyKeyResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

class EnvPolicy(_message.Message):
    __slots__ = ("threshold", "window", "hold")
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    HOLD_FIELD_NUMBER: _ClassVar[int]
    threshold: int
    window: _duration_pb2.Duration
    hold: _duration_pb2.Duration
    def __init__(self, threshold: _Optional[int] = ..., window: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., hold: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetEnvStateRequest(_message.Message):
    __slots__ = ("env_id",)
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    def __init__(self, env_id: _Optional[str] = ...) -> None: ...

class GetEnvStateResponse(_message.Message):
    __slots__ = ("env_id", "window_count", "tripped_until", "threshold", "buffer_depth", "draining", "failed", "effective_policy", "overrides")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    WINDOW_COUNT_FIELD_NUMBER: _ClassVar[int]
    TRIPPED_UNTIL_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BUFFER_DEPTH_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_POLICY_FIELD_NUMBER: _ClassVar[int]
    OVERRIDES_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    window_count: int
    tripped_until: _timestamp_pb2.Timestamp
    threshold: int
    buffer_depth: int
    draining: int
    failed: int
    effective_policy: EnvPolicy
    overrides: EnvPolicy
    def __init__(self, env_id: _Optional[str] = ..., window_count: _Optional[int] = ..., tripped_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., threshold: _Optional[int] = ..., buffer_depth: _Optional[int] = ..., draining: _Optional[int] = ..., failed: _Optional[int] = ..., effective_policy: _Optional[_Union[EnvPolicy, _Mapping]] = ..., overrides: _Optional[_Union[EnvPolicy, _Mapping]] = ...) -> None: ...

class SetEnvPolicyRequest(_message.Message):
    __slots__ = ("env_id", "policy")
    ENV_ID_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    env_id: str
    policy: EnvPolicy
    def __init__(self, env_id: _Optional[str] = ..., policy: _Optional[_Union[EnvPolicy, _Mapping]] = ...) -> None: ...

class SetEnvPolicyResponse(_message.Message):
    __slots__ = ("effective_policy",)
    EFFECTIVE_POLICY_FIELD_NUMBER: _ClassVar[int]
    effective_policy: EnvPolicy
    def __init__(self, effective_policy: _Optional[_Union[EnvPolicy, _Mapping]] = ...) -> None: ...
