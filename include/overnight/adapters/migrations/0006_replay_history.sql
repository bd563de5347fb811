-- Replay and history (docs/audit.md).
--
-- 1. The asset snapshot of a job run: the attributes and fundamentals each asset was scored with, stored
--    once per job run by the first batch that needs the asset and read back by every batch, retry and
--    resumed run of it (as `overnight_job_prices` does for quotes), so all users of a night are scored on
--    the same fundamentals and a calculation can be replayed without the live `assets` table.
CREATE TABLE overnight_job_assets (
    job_run_id    uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    asset_id      integer NOT NULL,
    symbol        text NOT NULL,
    market        text NOT NULL,
    class_name    text NOT NULL,
    currency      char(3) NOT NULL,
    fundamentals  jsonb NOT NULL,
    PRIMARY KEY (job_run_id, asset_id)
);

-- 2. `recommendations` stays the latest document per user, where latest is the newest session: a re-run
--    of an older session never replaces a newer document (the writer's upsert checks session_date).
ALTER TABLE recommendations ADD COLUMN session_date date;
UPDATE recommendations r SET session_date = coalesce(
    (SELECT j.session_date FROM overnight_job_runs j WHERE j.id = r.job_run_id),
    (r.document ->> 'sessionDate')::date,
    (r.generated_at AT TIME ZONE 'UTC')::date);
ALTER TABLE recommendations ALTER COLUMN session_date SET NOT NULL;

-- 3. Every document a user was given, per job run: the exact JSON text (the bytes Redis served), whose
--    sha256 CALC_COMPLETED records. Partitioned by month like calculation_events and retained with it.
CREATE TABLE recommendation_history (
    user_id       uuid NOT NULL,
    generated_at  timestamptz NOT NULL,
    job_run_id    uuid NOT NULL,
    session_date  date NOT NULL,
    document      text NOT NULL,
    PRIMARY KEY (user_id, generated_at, job_run_id)
) PARTITION BY RANGE (generated_at);
CREATE TABLE recommendation_history_default PARTITION OF recommendation_history DEFAULT;

DO $$
BEGIN
    ALTER TABLE recommendation_history ALTER COLUMN document SET COMPRESSION lz4;
    ALTER TABLE recommendation_history_default ALTER COLUMN document SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported THEN
    RAISE NOTICE 'lz4 compression not available on this server; keeping pglz';
END $$;

-- The monthly partitions of both audit tables, covering [from_month, from_month + months).
CREATE OR REPLACE FUNCTION ensure_event_partitions(from_month date, months integer) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    m date := date_trunc('month', from_month)::date;
    created integer := 0;
    parent text;
    part text;
BEGIN
    FOR i IN 0 .. months - 1 LOOP
        FOREACH parent IN ARRAY ARRAY['calculation_events', 'recommendation_history'] LOOP
            part := format('%s_%s', parent, to_char(m, 'YYYY_MM'));
            IF to_regclass(part) IS NULL THEN
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)',
                               part, parent, m, (m + interval '1 month')::date);
                created := created + 1;
            END IF;
        END LOOP;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;

SELECT ensure_event_partitions((now() - interval '1 month')::date, 4);
