-- The price snapshot of a job run: each quote the run used, stored once per job run instead of in
-- every user's INPUTS_CAPTURED event (the price map was 60 % of that event and of the audit trail's
-- size). INPUTS_CAPTURED keeps the price each user's calculation used per symbol; this table keeps the
-- quote behind it: currency, as-of time and source. Deleted with its job run by the retention DAG.
CREATE TABLE overnight_job_prices (
    job_run_id  uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    symbol      text NOT NULL,
    price       numeric NOT NULL,
    currency    char(3) NOT NULL,
    as_of       timestamptz NOT NULL,
    source      text,
    PRIMARY KEY (job_run_id, symbol)
);
