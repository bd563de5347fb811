-- Issue 25: the audit trail stores each fact once, and Postgres itself compresses it (docs/audit.md).
--
-- Before: one row per event and one per document, most of them under the ~2 kB row size at which Postgres
-- compresses a value, so they were stored as plain text unless padded (migration 0007's staging trick); and each
-- user's INPUTS_CAPTURED and SCORES_COMPUTED repeated what belongs to the job run (its quotes, its rates, the
-- criteria rules, the scores of a shared criteria version). 4.7 kB of row data per user per night.
--
-- After: what belongs to the job run is stored once in its snapshots (quotes and assets as before; the criteria
-- rules, the rates and the scores of shared criteria versions below); each chunk of users a batch writes together
-- (up to 1,000) is ONE row of `calculation_chunks` holding those users' events and documents whole, a few hundred
-- kB of JSON that Postgres compresses by itself, as any large value (TOAST, lz4 where the server has it). An
-- auditor reads the views `calculation_events` (one row per event, as before) and `recommendation_history` (one
-- row per document, the exact text).

-- 1. What was written before this migration stays where it is, read through the views; the retention drops its
--    monthly partitions as they pass the cutoff. No new row goes there.
ALTER TABLE calculation_events RENAME TO calculation_events_rows;
ALTER TABLE recommendation_history RENAME TO recommendation_history_rows;

-- 2. A chunk of users' calculations. `user_ids[i]`'s events are `events -> (i - 1)`: an array of
--    [event type, microseconds after created_at, payload] in the order written; completed users have the four
--    events in the design's order, a failed attempt CALC_STARTED and CALC_FAILED. `documents[i]` is the exact
--    JSON text user i was given (whose sha256 its CALC_COMPLETED records; NULL for a failed attempt), generated
--    at `generated_at[i]`. `symbols`: every symbol of the chunk's users' universes, for `/audit/assets/{symbol}`.
--    `events` is json, the text as written: 9 % smaller than jsonb once compressed (1,072 -> 981 B a user on the
--    1,000-user seed), and Postgres only checks it on the way in instead of converting it.
CREATE TABLE calculation_chunks (
    chunk_id        uuid NOT NULL,
    created_at      timestamptz NOT NULL,
    job_run_id      uuid NOT NULL,
    correlation_id  uuid NOT NULL,
    session_date    date NOT NULL,
    user_ids        uuid[] NOT NULL,
    events          json NOT NULL,
    generated_at    timestamptz[],
    documents       text[],
    symbols         text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (chunk_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE calculation_chunks_default PARTITION OF calculation_chunks DEFAULT;
CREATE INDEX calculation_chunks_correlation_idx ON calculation_chunks (correlation_id);
CREATE INDEX calculation_chunks_users_idx ON calculation_chunks USING gin (user_ids);
CREATE INDEX calculation_chunks_symbols_idx ON calculation_chunks USING gin (symbols);
CREATE INDEX calculation_chunks_created_idx ON calculation_chunks (created_at DESC, chunk_id DESC);

-- lz4 where the server has it (several times cheaper in CPU than pglz for the same space, migration 0003); a
-- setting of the table's columns, which its partitions inherit. Nothing else: Postgres decides what to compress.
DO $$
BEGIN
    ALTER TABLE calculation_chunks ALTER COLUMN events SET COMPRESSION lz4, ALTER COLUMN documents SET COMPRESSION lz4,
        ALTER COLUMN symbols SET COMPRESSION lz4;
    ALTER TABLE calculation_chunks_default ALTER COLUMN events SET COMPRESSION lz4,
        ALTER COLUMN documents SET COMPRESSION lz4, ALTER COLUMN symbols SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 compression not available on this server; keeping pglz';
END $$;

-- An event's id: its chunk's random id with the user's position and the event's in the last 20 bits (chunk ids
-- are made with those bits zero). Unlinkable to the user (the chunk id is random: docs/access.md, migration 0008),
-- stable, and it names its chunk, so a page of `/audit` can continue after it.
CREATE FUNCTION overnight_event_id(chunk uuid, u bigint, e bigint) RETURNS uuid
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (left(chunk::text, 31) || lpad(to_hex((u << 3) | e), 5, '0'))::uuid
$$;

-- 3. The views an auditor queries: one row per event, one row per document, the older rows included.
CREATE VIEW calculation_events AS
SELECT overnight_event_id(c.chunk_id, u.n, e.n) AS event_id, c.correlation_id, c.user_ids[u.n] AS user_id,
       (e.ev ->> 0)::varchar(30) AS event_type, (e.ev -> 2)::jsonb AS payload,
       c.created_at + (e.ev ->> 1)::bigint * interval '1 microsecond' AS created_at
FROM calculation_chunks c
CROSS JOIN LATERAL json_array_elements(c.events) WITH ORDINALITY AS u(evs, n)
CROSS JOIN LATERAL json_array_elements(u.evs) WITH ORDINALITY AS e(ev, n)
UNION ALL
SELECT event_id, correlation_id, user_id, event_type, payload, created_at FROM calculation_events_rows;

CREATE VIEW recommendation_history AS
SELECT c.user_ids[d.n] AS user_id, c.generated_at[d.n] AS generated_at, c.job_run_id, c.session_date, d.document
FROM calculation_chunks c
CROSS JOIN LATERAL unnest(c.documents) WITH ORDINALITY AS d(document, n)
WHERE d.document IS NOT NULL
UNION ALL
SELECT user_id, generated_at, job_run_id, session_date, document FROM recommendation_history_rows;

-- 4. The job run's snapshots a user's events point at instead of repeating them. Each is written once per job run
--    (ON CONFLICT DO NOTHING: every batch offers what it used) and goes with its job run.
--    Criteria rules per criteria version (a version's rules never change: a change is a new version).
CREATE TABLE overnight_job_criteria (
    job_run_id        uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    criteria_version  text NOT NULL,
    rules             jsonb NOT NULL,
    PRIMARY KEY (job_run_id, criteria_version)
);
--    The exchange rates the calculations used, by the digest INPUTS_CAPTURED names (`ratesId`): each execution of
--    a job run fetches its own.
CREATE TABLE overnight_job_rates (
    job_run_id  uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    rates_id    text NOT NULL,
    rates       jsonb NOT NULL,
    PRIMARY KEY (job_run_id, rates_id)
);
--    Scores of the criteria versions several users share: per asset, the score or why there is none (no usable
--    price, no exchange rate, a missing fundamental). A version one user alone uses keeps its scores in that
--    user's SCORES_COMPUTED.
CREATE TABLE overnight_job_scores (
    job_run_id        uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    criteria_version  text NOT NULL,
    symbol            text NOT NULL,
    score             text,
    reason            text,
    PRIMARY KEY (job_run_id, criteria_version, symbol),
    CHECK ((score IS NULL) <> (reason IS NULL))
);

-- 5. The monthly partitions, covering [from_month, from_month + months): of calculation_chunks alone now (the
--    renamed tables get no new rows).
CREATE OR REPLACE FUNCTION ensure_event_partitions(from_month date, months integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', from_month)::date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        part := format('calculation_chunks_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF calculation_chunks FOR VALUES FROM (%L) TO (%L)',
                           part, m, (m + interval '1 month')::date);
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

SELECT ensure_event_partitions((now() - interval '1 month')::date, 4);
