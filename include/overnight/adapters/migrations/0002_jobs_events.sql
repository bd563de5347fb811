-- Job runs, per-user progress, the audit trail (monthly partitions) and the latest recommendations.

CREATE TABLE overnight_job_runs (
    id               uuid PRIMARY KEY,
    job_type         varchar(50) NOT NULL,
    status           varchar(20) NOT NULL
                     CHECK (status IN ('started', 'completed', 'partial', 'failed')),
    started_at       timestamptz NOT NULL,
    completed_at     timestamptz,
    users_processed  integer NOT NULL DEFAULT 0,
    users_failed     integer NOT NULL DEFAULT 0,
    correlation_id   uuid NOT NULL UNIQUE,
    error_details    jsonb,
    metrics          jsonb,
    market           text NOT NULL,
    session_date     date NOT NULL,
    dag_run_id       text,
    alerts           jsonb NOT NULL DEFAULT '[]'::jsonb
);
CREATE INDEX overnight_job_runs_market_started_idx ON overnight_job_runs (market, started_at DESC);
CREATE INDEX overnight_job_runs_session_idx ON overnight_job_runs (market, session_date, started_at DESC);
CREATE INDEX overnight_job_runs_started_idx ON overnight_job_runs (started_at DESC);

-- One row per user a job run worked on: the guard that makes retries and re-runs idempotent
-- (a user's events are written in the same transaction as its 'completed' row here).
CREATE TABLE overnight_job_users (
    job_run_id  uuid NOT NULL,
    user_id     uuid NOT NULL,
    status      varchar(10) NOT NULL CHECK (status IN ('completed', 'failed')),
    stage       text,
    error       text,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_run_id, user_id)
);

-- The audit trail. Partitioned by month on created_at so that 2 years of retention is a DROP of
-- old partitions; `symbols` (set on SCORES_COMPUTED) backs "all calculations for asset X".
CREATE TABLE calculation_events (
    event_id        uuid NOT NULL,
    correlation_id  uuid NOT NULL,
    user_id         uuid NOT NULL,
    event_type      varchar(30) NOT NULL
                    CHECK (event_type IN ('CALC_STARTED', 'INPUTS_CAPTURED', 'SCORES_COMPUTED', 'CALC_COMPLETED')),
    payload         jsonb NOT NULL,
    symbols         text[],
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);
CREATE TABLE calculation_events_default PARTITION OF calculation_events DEFAULT;
CREATE INDEX calculation_events_correlation_idx ON calculation_events (correlation_id, user_id);
CREATE INDEX calculation_events_symbols_idx ON calculation_events USING gin (symbols);
CREATE INDEX calculation_events_created_idx ON calculation_events (created_at DESC);

-- Creates the monthly partitions covering [from_month, from_month + months).
CREATE FUNCTION ensure_event_partitions(from_month date, months integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', from_month)::date;
    created integer := 0;
    part text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        part := format('calculation_events_%s', to_char(m, 'YYYY_MM'));
        IF to_regclass(part) IS NULL THEN
            EXECUTE format(
                'CREATE TABLE %I PARTITION OF calculation_events FOR VALUES FROM (%L) TO (%L)',
                part, m, (m + interval '1 month')::date);
            created := created + 1;
        END IF;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

SELECT ensure_event_partitions((now() - interval '1 month')::date, 4);

-- The latest recommendations document per user: the dashboard's fallback when Redis misses.
CREATE TABLE recommendations (
    user_id          uuid PRIMARY KEY,
    job_run_id       uuid NOT NULL,
    correlation_id   uuid NOT NULL,
    generated_at     timestamptz NOT NULL,
    criteria_version text NOT NULL,
    rates_stale      boolean NOT NULL DEFAULT false,
    document         jsonb NOT NULL,
    portfolio        jsonb NOT NULL
);
CREATE INDEX recommendations_generated_idx ON recommendations (generated_at);
