-- Issue 27: every served user leaves a trace, metrics over the whole job run, each execution in its own row,
-- job runs that are not a market's night, and invalidated documents (docs/audit.md, docs/design.md).

-- 1. A failed user's trail: CALC_STARTED and a terminal CALC_FAILED naming the stage and the reason. A completed
--    user keeps exactly the four events (CALC_STARTED, INPUTS_CAPTURED, SCORES_COMPUTED, CALC_COMPLETED).
--    NOT VALID: every row written before met the narrower check, so the two years of partitions are not scanned.
ALTER TABLE calculation_events DROP CONSTRAINT IF EXISTS calculation_events_event_type_check;
ALTER TABLE calculation_events ADD CONSTRAINT calculation_events_event_type_check
    CHECK (event_type IN ('CALC_STARTED', 'INPUTS_CAPTURED', 'SCORES_COMPUTED', 'CALC_COMPLETED', 'CALC_FAILED')) NOT VALID;

-- 2. What each completed user's calculation produced, written with its 'completed' row: the job run's metrics are
--    summed here, whichever execution or task attempt computed the user (NULL for users completed before this).
ALTER TABLE overnight_job_users ADD COLUMN assets_scored integer, ADD COLUMN recommendations integer,
    ADD COLUMN warned boolean;

-- 3. Each execution of a job run (a DAG run's `start` continuing or starting it) in its own row: the job run keeps
--    the latest DAG run id and the whole run's outcome; these rows keep every execution's, within the retention.
CREATE TABLE overnight_job_run_executions (
    job_run_id       uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    attempt          integer NOT NULL,
    dag_run_id       text,
    status           varchar(20) NOT NULL CHECK (status IN ('started', 'completed', 'partial', 'failed')),
    started_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    completed_at     timestamptz,
    users_processed  integer,
    users_failed     integer,
    metrics          jsonb,
    PRIMARY KEY (job_run_id, attempt)
);
INSERT INTO overnight_job_run_executions (job_run_id, attempt, dag_run_id, status, started_at, completed_at,
                                          users_processed, users_failed, metrics)
SELECT id, 1, dag_run_id, status, started_at, completed_at, users_processed, users_failed, metrics
FROM overnight_job_runs;

-- 4. Job runs that are not a market's night have no market: `cache-warm` (the cache warmer). A `recalculation`
--    (one user's, asked by an invalidation) has its market and session.
ALTER TABLE overnight_job_runs ALTER COLUMN market DROP NOT NULL;

-- 5. Invalidated documents (docs/access.md, docs/design.md): the time a user's cached advice was dropped, and the
--    recalculation asked for then (its DAG run), so the dashboard says `recalculating` until a newer document lands.
CREATE TABLE overnight_invalidations (
    user_id          uuid PRIMARY KEY,
    invalidated_at   timestamptz NOT NULL,
    invalidated_by   text,
    dag_id           text,
    dag_run_id       text,
    session_date     date
);

-- 6. `/audit/assets/{symbol}` finds every calculation whose universe held the asset, scored or not: the symbols of
--    SCORES_COMPUTED's `scores` (the `symbols` column) and of its `unscored` (no price, no exchange rate, a missing
--    fundamental), in one GIN index on SCORES_COMPUTED rows only. An index, not a wider `symbols` column: the bytes
--    per user of the trail (docs/scaling.md) stay as they were. Building it reads each SCORES_COMPUTED payload once.
CREATE FUNCTION overnight_universe(symbols text[], payload jsonb) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT coalesce(symbols, '{}'::text[])
           || coalesce(ARRAY(SELECT jsonb_object_keys(coalesce(payload -> 'unscored', '{}'::jsonb))), '{}'::text[])
$$;
CREATE INDEX calculation_events_universe_idx ON calculation_events
    USING gin (overnight_universe(symbols, payload)) WHERE event_type = 'SCORES_COMPUTED';
