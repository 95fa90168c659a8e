"""Every Redis key the sidecar uses, in one place.

Per-environment keys share the hash tag ``{<env_id>}`` so that each Lua script,
which only ever touches one environment, touches one hash slot and runs
unchanged on Redis Cluster. Env ids cannot contain braces (see validation), so
the tag is always exactly the env id.

The org/env index lives outside any env's slot; it is updated beside the
scripts (same pipeline, not the same script) and repaired by a scan, so it may
lag the queues but never loses an env for longer than one repair pass.
"""

from __future__ import annotations

__all__ = [
    "DRAIN_COUNTERS_PREFIX",
    "DRAIN_PAUSED",
    "INDEX_ORGS",
    "OLD_RUN_PATTERN",
    "STATS_TOTAL_DEPTH",
    "WRITE_SLOTS",
    "EnvKeys",
    "env_keys",
    "old_run_env",
    "org_envs_key",
]

PREFIX = "mf"

# SET of org ids that have (or recently had) buffered runs.
INDEX_ORGS = f"{PREFIX}:idx:orgs"
# STRING: present while an operator has paused the built-in drainers.
DRAIN_PAUSED = f"{PREFIX}:drain:paused"
# HASH per sidecar instance: the counters its drain process publishes (with a TTL).
DRAIN_COUNTERS_PREFIX = f"{PREFIX}:drain:counters:"
# STRING: the whole buffer's depth, recomputed by the drainer's sweep.
STATS_TOTAL_DEPTH = f"{PREFIX}:stats:depth"
# ZSET holder -> lapses at (ms): the Postgres write slots in use (write_slot.lua).
WRITE_SLOTS = f"{PREFIX}:pg:slots"


# The earlier buffer layout, a HASH per run (mf:{env}:run:<run_id>) and the
# queue a ZSET (EnvKeys.old_queue): only read to move such runs into the
# current layout (lua/upgrade.lua). The SCAN pattern of those run hashes:
OLD_RUN_PATTERN = f"{PREFIX}:{{*}}:run:*"
_OLD_RUN_HEAD, _OLD_RUN_SEP = f"{PREFIX}:{{", "}:run:"


def old_run_env(key: str) -> str | None:
    """The env id of a run hash of the earlier layout; None for another key."""
    if not key.startswith(_OLD_RUN_HEAD) or _OLD_RUN_SEP not in key:
        return None
    return key[len(_OLD_RUN_HEAD) : key.index(_OLD_RUN_SEP)]


def org_envs_key(org_id: str) -> str:
    """SET of env ids of one org that have (or recently had) buffered runs."""
    return f"{PREFIX}:idx:org:{org_id}"


class EnvKeys:
    """The keys of one environment; all in the slot of ``{env_id}``."""

    __slots__ = (
        "alias_prefix",
        "back",
        "claim_prefix",
        "env",
        "env_id",
        "failed",
        "gate",
        "idem_prefix",
        "lease",
        "policy",
        "queue",
        "request_prefix",
        "retry",
        "runs",
        "tag",
    )

    def __init__(self, env_id: str) -> None:
        self.env_id = env_id
        self.tag = f"{PREFIX}:{{{env_id}}}"
        t = self.tag
        # LIST of run ids in arrival order: the runs accepted and never leased
        # (RPUSH at accept, popped from the head by a lease; see lua/includes/queue.lua).
        self.queue = f"{t}:ql"
        # ZSET run_id -> arrival score: queued runs that came back (a lease that
        # expired, a backoff that ended, a retried dead letter). Every one is
        # older than every run in the LIST, so a lease takes these first.
        self.back = f"{t}:qb"
        # ZSET run_id -> lease deadline (ms).
        self.lease = f"{t}:lease"
        # ZSET run_id -> time (ms) a backed-off run may be leased again.
        self.retry = f"{t}:retry"
        # ZSET run_id -> time (ms) it was dead-lettered.
        self.failed = f"{t}:failed"
        # HASH: the sliding window and trip (ws, wc, wp, tu).
        self.gate = f"{t}:gate"
        # HASH: per-env overrides (threshold, window_ms, hold_ms).
        self.policy = f"{t}:policy"
        # HASH: org id, last arrival score, counters.
        self.env = f"{t}:env"
        # HASH run_id -> the run's entry, packed (see lua/includes/entry.lua).
        self.runs = f"{t}:runs"
        # STRING per (task, key): the run id the idempotency key is bound to.
        self.idem_prefix = f"{t}:idem:"
        # STRING per (task, key): a pre-gate claim's ownership token.
        self.claim_prefix = f"{t}:claim:"
        # STRING per run: the earlier run it resolved to when drained (its
        # idempotency key was already a row's), so reads of it still answer.
        self.alias_prefix = f"{t}:alias:"
        # STRING per request id: the stored answer of a mutating call.
        self.request_prefix = f"{t}:req:"

    @property
    def buffered(self) -> tuple[str, str, str, str, str]:
        """The sets a buffered run is in, in the order the scripts take them:
        queue LIST, back ZSET, lease, retry and failed ZSETs."""
        return (self.queue, self.back, self.lease, self.retry, self.failed)

    @property
    def old_queue(self) -> str:
        """The earlier layout's queue ZSET (see OLD_RUN_PATTERN)."""
        return f"{self.tag}:q"

    @property
    def old_run_prefix(self) -> str:
        """The earlier layout's run hash prefix, mf:{env}:run: (see OLD_RUN_PATTERN)."""
        return f"{self.tag}:run:"

    def idem(self, task_identifier: str, idempotency_key: str) -> str:
        # Task identifiers cannot contain ':', so the split is unambiguous.
        return f"{self.idem_prefix}{task_identifier}:{idempotency_key}"

    def claim(self, task_identifier: str, idempotency_key: str) -> str:
        return f"{self.claim_prefix}{task_identifier}:{idempotency_key}"

    def request(self, request_id: str) -> str:
        return self.request_prefix + request_id


def env_keys(env_id: str) -> EnvKeys:
    """The keys of one environment."""
    return EnvKeys(env_id)
