"""The asyncio client (grpc.aio)."""

# A `timeout` here is the call's gRPC deadline, handed to grpc.aio, not an asyncio wait.
# ruff: noqa: ASYNC109

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import grpc
import grpc.aio
from google.protobuf.message import Message

from mollifier_client import _methods as _m
from mollifier_client._channel import (
    Metadata,
    PathOrBytes,
    auth_metadata,
    channel_credentials,
    channel_options,
)
from mollifier_client._errors import MollifierError, error_from_rpc
from mollifier_client._retry import NO_RETRY, Attempts, RetryPolicy
from mollifier_client._trigger import fail_open_evaluate, fail_open_trigger, fills_open
from mollifier_client.v1 import buffer_pb2, drain_pb2, gate_pb2, mutate_pb2

__all__ = ["AsyncClient"]

log = logging.getLogger("mollifier_client")
Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


class AsyncClient:
    """An asyncio client for every RPC of the Mollifier sidecar.

    Make one with :meth:`connect` and share it across tasks; close it with
    :meth:`close` or use it as an async context manager. Each RPC is a method
    named in snake_case that takes either the request message or its fields
    as keyword arguments and returns the response message::

        async with AsyncClient.connect("127.0.0.1:50051", token="s3cret") as client:
            answer = await client.trigger_or_pass(
                env_id="env_1", org_id="org_1", task_identifier="email.send",
                org_feature_flags={"mollifierEnabled": True},
                snapshot={"payload": b"{}", "payload_type": "application/json"},
            )

    Every call has a deadline (``timeout=`` per call, else the client's
    ``default_timeout``) and is retried, inside that deadline, only where safe:
    UNAVAILABLE always, DEADLINE_EXCEEDED only for calls carrying a
    ``request_id``. Failures raise a :class:`~mollifier_client.MollifierError`
    subclass, raised from the :class:`grpc.RpcError`.
    """

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        token: str | None = None,
        default_timeout: float | None = 5.0,
        gate_timeout: float = 0.1,
        retry: RetryPolicy | None = None,
        metadata: Metadata | None = None,
    ) -> None:
        """Wrap an existing channel; most callers want :meth:`connect` instead."""
        self._channel = channel
        self._closed = False
        self._metadata = auth_metadata(token, metadata)
        self._default_timeout = default_timeout
        self._gate_timeout = gate_timeout
        self._retry = retry or RetryPolicy()
        self._stubs = {key: make(channel) for key, make in _m.STUBS.items()}

    @classmethod
    def connect(
        cls,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        tls: bool = False,
        root_certificates: PathOrBytes | None = None,
        client_certificate: PathOrBytes | None = None,
        client_private_key: PathOrBytes | None = None,
        tls_server_name: str | None = None,
        default_timeout: float | None = 5.0,
        gate_timeout: float = 0.1,
        retry: RetryPolicy | None = None,
        metadata: Metadata | None = None,
        options: Sequence[tuple[str, Any]] | None = None,
    ) -> Self:
        """A client for the sidecar at ``target`` (``host:port``).

        Nothing is contacted here: the channel connects on first use, so a
        webapp can start while its sidecar is down.

        Args:
            target: The sidecar's address.
            token: Bearer token, sent as ``authorization: Bearer <token>`` on
                every call (the sidecar's ``MOLLIFIER_AUTH_TOKEN``).
            tls: Use TLS with the system's root certificates.
            root_certificates: PEM (bytes or path) of the CA that signed the
                sidecar's certificate; implies TLS.
            client_certificate: PEM certificate chain for mutual TLS.
            client_private_key: PEM private key for mutual TLS.
            tls_server_name: The name to expect in the server's certificate,
                when it differs from ``target``'s host.
            default_timeout: Deadline in seconds of each call that gives no
                ``timeout``, retries included; None for no deadline.
            gate_timeout: Deadline of :meth:`trigger_or_pass` and
                :meth:`evaluate_or_pass`.
            retry: Retry policy; ``RetryPolicy(max_attempts=1)`` disables retries.
            metadata: Extra metadata sent with every call.
            options: gRPC channel options, overriding the client's defaults.
        """
        creds = channel_credentials(
            tls=tls,
            root_certificates=root_certificates,
            client_certificate=client_certificate,
            client_private_key=client_private_key,
        )
        opts = channel_options(options, tls_server_name)
        if creds is None:
            channel = grpc.aio.insecure_channel(target, options=opts)
        else:
            channel = grpc.aio.secure_channel(target, creds, options=opts)
        return cls(
            channel,
            token=token,
            default_timeout=default_timeout,
            gate_timeout=gate_timeout,
            retry=retry,
            metadata=metadata,
        )

    @property
    def channel(self) -> grpc.aio.Channel:
        """The underlying gRPC channel."""
        return self._channel

    async def close(self, grace: float | None = None) -> None:
        """Close the channel; calls still running are cancelled after ``grace`` seconds."""
        self._closed = True
        await self._channel.close(grace)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(
        self,
        method: _m.Method[Req, Resp],
        request: Req | None,
        fields: Mapping[str, Any],
        timeout: float | None,
        metadata: Metadata | None,
    ) -> Resp:
        built = method.build(request, fields)
        return await self._invoke(method, built, timeout, metadata, self._retry)

    async def _invoke(
        self,
        method: _m.Method[Req, Resp],
        request: Req,
        timeout: float | None,
        metadata: Metadata | None,
        policy: RetryPolicy,
    ) -> Resp:
        rpc = getattr(self._stubs[method.service], method.name)
        md = self._metadata + tuple(metadata or ())
        budget = self._default_timeout if timeout is None else timeout
        attempts = Attempts.of(method, policy, budget, closed=self._closed)
        while True:
            try:
                answer = await rpc(request, timeout=attempts.timeout(), metadata=md)
                return cast(Resp, answer)
            except grpc.RpcError as rpc_err:
                err = error_from_rpc(rpc_err)
                delay = attempts.pause(err)
                if delay is None:
                    raise err from rpc_err
                log.debug("retrying %s after %s in %.3fs", method.name, err.code.name, delay)
            await asyncio.sleep(delay)

    # Fail-open helpers

    async def trigger_or_pass(
        self,
        request: gate_pb2.TriggerRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.TriggerResponse:
        """Consult the gate for one trigger; never raise for the sidecar's sake.

        Takes the same request as :meth:`trigger` and makes one attempt within
        ``timeout`` (default: the client's ``gate_timeout``, 0.1 s). When the
        sidecar answers, its ``TriggerResponse`` is returned: MOLLIFY means the
        run is buffered (create nothing); PASS_THROUGH or SHADOW_LOG means
        create the run yourself with ``response.run_id``.

        On the deadline or any failure other than bad input (sidecar down,
        UNAVAILABLE, DEADLINE_EXCEEDED, cancelled, UNAUTHENTICATED, ...), it
        returns a ``TriggerResponse`` with ``DECISION_PASS_THROUGH``, reason
        ``DECISION_REASON_FAIL_OPEN`` and the run id, and logs a warning on the
        ``mollifier_client`` logger. Because the run id is chosen before the
        call (filled in when the snapshot has none), a run the sidecar did buffer
        before its answer was lost has the same id as the one you create; the
        unique run id in Postgres keeps it from existing twice.

        Raises:
            InvalidArgumentError: the request is malformed (the caller's bug).
        """
        built = _m.TRIGGER.build(request, fields)
        try:
            return await self._invoke(_m.TRIGGER, built, self._gate(timeout), metadata, NO_RETRY)
        except MollifierError as err:
            if not fills_open(err):
                raise
            log.warning("mollifier gate failed open for %s: %s", built.snapshot.run_id, err)
            return fail_open_trigger(built.snapshot.run_id)

    async def evaluate_or_pass(
        self,
        request: gate_pb2.EvaluateRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.EvaluateResponse:
        """Ask the gate for a decision; never raise for the sidecar's sake.

        Like :meth:`trigger_or_pass` for :meth:`evaluate`: on the deadline
        (default ``gate_timeout``) or any failure other than bad input, returns
        an ``EvaluateResponse`` with ``DECISION_PASS_THROUGH`` and reason
        ``DECISION_REASON_FAIL_OPEN``.

        Raises:
            InvalidArgumentError: the request is malformed (the caller's bug).
        """
        built = _m.EVALUATE.build(request, fields)
        try:
            return await self._invoke(_m.EVALUATE, built, self._gate(timeout), metadata, NO_RETRY)
        except MollifierError as err:
            if not fills_open(err):
                raise
            log.warning("mollifier gate failed open: %s", err)
            return fail_open_evaluate()

    def _gate(self, timeout: float | None) -> float:
        return self._gate_timeout if timeout is None else timeout

    # GateService

    async def evaluate(
        self,
        request: gate_pb2.EvaluateRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.EvaluateResponse:
        """Decide for one trigger without buffering anything (GateService.Evaluate).

        Fields: ``env_id``, ``org_id``, ``task_identifier``, ``org_feature_flags``
        (``{"mollifierEnabled": True}`` turns the gate on for the org), ``debounce``,
        ``one_time_use_token``, ``wait_for_completion``. For a call that must never
        block a webapp, use :meth:`evaluate_or_pass`.
        """
        return await self._call(_m.EVALUATE, request, fields, timeout, metadata)

    async def trigger(
        self,
        request: gate_pb2.TriggerRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.TriggerResponse:
        """Decide and, when the decision is MOLLIFY, buffer the run (GateService.Trigger).

        Fields: the :meth:`evaluate` fields and ``snapshot`` (a ``RunSnapshot`` or a
        dict). When ``snapshot.run_id`` is empty the client fills one in
        (``run_`` + 25 random base-36 characters) before the first attempt, so a
        retry after UNAVAILABLE cannot buffer the run twice; the response's
        ``run_id`` is the id to create the run with. Raises on every failure; for
        a webapp's trigger path use :meth:`trigger_or_pass`.
        """
        return await self._call(_m.TRIGGER, request, fields, timeout, metadata)

    async def evaluate_batch(
        self,
        request: gate_pb2.EvaluateBatchRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.EvaluateBatchResponse:
        """Decide for many triggers in one call, in order (GateService.EvaluateBatch).

        Fields: ``inputs`` (``GateInput`` messages or dicts, at most 1,000).
        """
        return await self._call(_m.EVALUATE_BATCH, request, fields, timeout, metadata)

    async def claim_idempotency_key(
        self,
        request: gate_pb2.ClaimIdempotencyKeyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.ClaimIdempotencyKeyResponse:
        """Claim an idempotency key before the gate (GateService.ClaimIdempotencyKey).

        Fields: ``env_id``, ``task_identifier``, ``idempotency_key``, ``claim_ttl``.
        The answer's ``state`` is CLAIMED (with ``claim_token``), RESOLVED (with
        ``run_id``) or BUSY (with ``retry_after``).
        """
        return await self._call(_m.CLAIM_IDEMPOTENCY_KEY, request, fields, timeout, metadata)

    async def publish_idempotency_key(
        self,
        request: gate_pb2.PublishIdempotencyKeyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.PublishIdempotencyKeyResponse:
        """Bind a claimed key to the run created (GateService.PublishIdempotencyKey).

        Fields: ``env_id``, ``task_identifier``, ``idempotency_key``, ``claim_token``,
        ``run_id``, ``expires_at``. Raises FailedPreconditionError
        (``CLAIM_NOT_HELD``) when the claim lapsed or is another caller's.
        """
        return await self._call(_m.PUBLISH_IDEMPOTENCY_KEY, request, fields, timeout, metadata)

    async def release_idempotency_key(
        self,
        request: gate_pb2.ReleaseIdempotencyKeyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.ReleaseIdempotencyKeyResponse:
        """Give a claim up without binding it (GateService.ReleaseIdempotencyKey).

        Fields: ``env_id``, ``task_identifier``, ``idempotency_key``, ``claim_token``.
        """
        return await self._call(_m.RELEASE_IDEMPOTENCY_KEY, request, fields, timeout, metadata)

    async def get_env_state(
        self,
        request: gate_pb2.GetEnvStateRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.GetEnvStateResponse:
        """Read an environment's window, trip and buffer depth (GateService.GetEnvState).

        Fields: ``env_id``.
        """
        return await self._call(_m.GET_ENV_STATE, request, fields, timeout, metadata)

    async def set_env_policy(
        self,
        request: gate_pb2.SetEnvPolicyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> gate_pb2.SetEnvPolicyResponse:
        """Override an environment's threshold, window or hold (GateService.SetEnvPolicy).

        Fields: ``env_id``, ``policy`` (an ``EnvPolicy``; zero fields go back to the default).
        """
        return await self._call(_m.SET_ENV_POLICY, request, fields, timeout, metadata)

    # BufferService

    async def accept(
        self,
        request: buffer_pb2.AcceptRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> buffer_pb2.AcceptResponse:
        """Take a snapshot into the buffer (BufferService.Accept).

        Fields: ``snapshot`` (``env_id``, ``org_id`` and ``task_identifier`` required).
        An empty ``snapshot.run_id`` is filled in by the client, as for
        :meth:`trigger`. Raises ResourceExhaustedError (``BUFFER_FULL``, with
        ``retry_after``) over capacity.
        """
        return await self._call(_m.ACCEPT, request, fields, timeout, metadata)

    async def get_run(
        self,
        request: buffer_pb2.GetRunRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> buffer_pb2.GetRunResponse:
        """Read a run wherever it is, Postgres or buffer (BufferService.GetRun).

        Fields: ``env_id``, ``run_id``. Raises NotFoundError (``RUN_NOT_FOUND``) for
        an unknown run or another env's.
        """
        return await self._call(_m.GET_RUN, request, fields, timeout, metadata)

    async def find_run_by_idempotency_key(
        self,
        request: buffer_pb2.FindRunByIdempotencyKeyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> buffer_pb2.FindRunByIdempotencyKeyResponse:
        """Find the run a live idempotency key is bound to (BufferService.FindRunByIdempotencyKey).

        Fields: ``env_id``, ``task_identifier``, ``idempotency_key``. Raises
        NotFoundError (``IDEMPOTENCY_KEY_NOT_FOUND``) for an unbound or expired key.
        """
        return await self._call(_m.FIND_RUN_BY_IDEMPOTENCY_KEY, request, fields, timeout, metadata)

    async def list_runs(
        self,
        request: buffer_pb2.ListRunsRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> buffer_pb2.ListRunsResponse:
        """One page of an environment's buffered runs, in arrival order (BufferService.ListRuns).

        Fields: ``env_id``, ``page_size``, ``page_token``.
        """
        return await self._call(_m.LIST_RUNS, request, fields, timeout, metadata)

    # MutateService

    async def cancel_run(
        self,
        request: mutate_pb2.CancelRunRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.CancelRunResponse:
        """Cancel a run, buffered or materialized (MutateService.CancelRun).

        Fields: ``env_id``, ``run_id``, ``reason``, ``request_id``. An empty
        ``request_id`` is filled in by the client so that retries (UNAVAILABLE and
        DEADLINE_EXCEEDED) are applied once.
        """
        return await self._call(_m.CANCEL_RUN, request, fields, timeout, metadata)

    async def reschedule_run(
        self,
        request: mutate_pb2.RescheduleRunRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.RescheduleRunResponse:
        """Move a delayed run's ``delay_until`` (MutateService.RescheduleRun).

        Fields: ``env_id``, ``run_id``, ``delay_until``, ``request_id`` (filled in
        when empty).
        """
        return await self._call(_m.RESCHEDULE_RUN, request, fields, timeout, metadata)

    async def update_metadata(
        self,
        request: mutate_pb2.UpdateMetadataRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.UpdateMetadataResponse:
        """Change a run's metadata, and its parent's or root's (MutateService.UpdateMetadata).

        Fields: ``env_id``, ``run_id``, ``metadata_json``, ``operations``,
        ``parent_operations``, ``root_operations`` (``MetadataOperation`` messages
        or dicts), ``request_id`` (filled in when empty).
        """
        return await self._call(_m.UPDATE_METADATA, request, fields, timeout, metadata)

    async def add_tags(
        self,
        request: mutate_pb2.AddTagsRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.AddTagsResponse:
        """Add tags to a run, de-duplicated (MutateService.AddTags).

        Fields: ``env_id``, ``run_id``, ``tags``, ``request_id`` (filled in when empty).
        """
        return await self._call(_m.ADD_TAGS, request, fields, timeout, metadata)

    async def reset_idempotency_key(
        self,
        request: mutate_pb2.ResetIdempotencyKeyRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.ResetIdempotencyKeyResponse:
        """Clear an idempotency key's binding in both stores (MutateService.ResetIdempotencyKey).

        Fields: ``env_id``, ``task_identifier``, ``idempotency_key``, ``request_id``
        (filled in when empty).
        """
        return await self._call(_m.RESET_IDEMPOTENCY_KEY, request, fields, timeout, metadata)

    async def replay_run(
        self,
        request: mutate_pb2.ReplayRunRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> mutate_pb2.ReplayRunResponse:
        """Create a new run from an old run's snapshot (MutateService.ReplayRun).

        Fields: ``env_id``, ``run_id``, ``new_run_id`` (the sidecar makes one when
        empty), ``request_id`` (filled in when empty).
        """
        return await self._call(_m.REPLAY_RUN, request, fields, timeout, metadata)

    # DrainService

    async def get_status(
        self,
        request: drain_pb2.GetStatusRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.GetStatusResponse:
        """The drainer's state and the buffer's depth per org and env (DrainService.GetStatus).

        Fields: ``org_id`` (only this org, when set).
        """
        return await self._call(_m.GET_STATUS, request, fields, timeout, metadata)

    async def pause(
        self,
        request: drain_pb2.PauseRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.PauseResponse:
        """Pause the built-in drainers of every sidecar on this Redis (DrainService.Pause).

        Fields: ``reason``.
        """
        return await self._call(_m.PAUSE, request, fields, timeout, metadata)

    async def resume(
        self,
        request: drain_pb2.ResumeRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.ResumeResponse:
        """Let the built-in drainers lease again (DrainService.Resume).

        No fields.
        """
        return await self._call(_m.RESUME, request, fields, timeout, metadata)

    async def lease(
        self,
        request: drain_pb2.LeaseRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.LeaseResponse:
        """Lease a batch of buffered runs for an external consumer (DrainService.Lease).

        Fields: ``consumer_id``, ``max_runs``, ``lease_duration``. A lease whose answer
        was lost simply expires and its runs return to their queues.
        """
        return await self._call(_m.LEASE, request, fields, timeout, metadata)

    async def ack(
        self,
        request: drain_pb2.AckRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.AckResponse:
        """Complete leased runs the consumer has created (DrainService.Ack).

        Fields: ``lease_token``, ``runs`` (``RunRef`` messages or dicts).
        """
        return await self._call(_m.ACK, request, fields, timeout, metadata)

    async def nack(
        self,
        request: drain_pb2.NackRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.NackResponse:
        """Give leased runs back, to retry later or to dead-letter (DrainService.Nack).

        Fields: ``lease_token``, ``runs``, ``retry_after``, ``dead_letter``, ``error``.
        """
        return await self._call(_m.NACK, request, fields, timeout, metadata)

    async def list_failed(
        self,
        request: drain_pb2.ListFailedRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.ListFailedResponse:
        """One page of an environment's dead-lettered runs (DrainService.ListFailed).

        Fields: ``env_id``, ``page_size``, ``page_token``.
        """
        return await self._call(_m.LIST_FAILED, request, fields, timeout, metadata)

    async def retry_failed(
        self,
        request: drain_pb2.RetryFailedRequest | None = None,
        /,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **fields: Any,
    ) -> drain_pb2.RetryFailedResponse:
        """Put dead-lettered runs back in their queue (DrainService.RetryFailed).

        Fields: ``env_id``, ``run_ids`` (empty: all of the env's), ``request_id``
        (filled in when empty).
        """
        return await self._call(_m.RETRY_FAILED, request, fields, timeout, metadata)
