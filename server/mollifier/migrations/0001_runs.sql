-- The runs table: one row per materialized run.
-- Columns the spec names are real columns (so a webapp can query them); the
-- whole protobuf snapshot is kept too, so a Run can be rebuilt byte for byte.
CREATE SCHEMA IF NOT EXISTS mollifier;

CREATE TABLE IF NOT EXISTS mollifier.runs (
    run_id                      text PRIMARY KEY,
    env_id                      text NOT NULL,
    org_id                      text NOT NULL,
    task_identifier             text NOT NULL,
    status                      text NOT NULL
        CHECK (status IN ('PENDING', 'DELAYED', 'CANCELED', 'SYSTEM_FAILURE')),
    payload                     bytea NOT NULL DEFAULT ''::bytea,
    payload_type                text NOT NULL DEFAULT '',
    idempotency_key             text,
    idempotency_key_expires_at  timestamptz,
    tags                        text[] NOT NULL DEFAULT '{}',
    metadata                    jsonb,
    metadata_type               text NOT NULL DEFAULT '',
    delay_until                 timestamptz,
    ttl_ms                      bigint,
    queue                       text NOT NULL DEFAULT '',
    concurrency_key             text NOT NULL DEFAULT '',
    machine_preset              text NOT NULL DEFAULT '',
    parent_run_id               text,
    root_run_id                 text,
    batch_id                    text,
    batch_index                 integer,
    trace_id                    text NOT NULL DEFAULT '',
    span_id                     text NOT NULL DEFAULT '',
    max_attempts                integer NOT NULL DEFAULT 0,
    priority                    integer NOT NULL DEFAULT 0,
    extra                       jsonb NOT NULL DEFAULT '{}'::jsonb,
    error                       text,
    canceled_at                 timestamptz,
    cancel_reason               text,
    created_at                  timestamptz NOT NULL,
    materialized_at             timestamptz NOT NULL DEFAULT now(),
    snapshot                    bytea NOT NULL
);

-- Exactly once per (env, task, key): a second run with a bound key is not created.
CREATE UNIQUE INDEX IF NOT EXISTS runs_idempotency_key
    ON mollifier.runs (env_id, task_identifier, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX IF NOT EXISTS runs_env_id ON mollifier.runs (env_id);
