-- Answers of mutating calls applied in Postgres, by request id, so a retried
-- call is applied once and answered the same. Written in the same transaction
-- as the change itself; the row's primary key also makes a concurrent copy of
-- the call wait for the first one and then read its answer.
CREATE TABLE IF NOT EXISTS mollifier.mutation_requests (
    env_id      text NOT NULL,
    request_id  text NOT NULL,
    kind        text NOT NULL,
    response    bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (env_id, request_id)
);

CREATE INDEX IF NOT EXISTS mutation_requests_created_at
    ON mollifier.mutation_requests (created_at);
