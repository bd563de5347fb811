-- Nothing a viewer reads names a user (docs/access.md).
--
-- 1. Event ids are random (version 4) from now on. Until now they were uuid5(correlation id,
--    "<user id>:<event type>"): anyone knowing a candidate user id could compute them and link `/audit`'s
--    `eventId` (and its cursor, and the order of events written in the same instant) to a user id. The
--    events already written get random ids too. The id was never a key anything else refers to: a
--    retried batch skips the users already completed (overnight_job_users, in the same transaction).
--    Cost: one pass over the audit trail, once, when this migration is applied.
UPDATE calculation_events SET event_id = gen_random_uuid() WHERE substr(event_id::text, 15, 1) = '5';

-- 2. The batches of a job run's plan: the first and last user id of each (and the run's `user_ids`, when it
--    names users), kept here rather than in Airflow's XCom, which every viewer of the DAG reads. The XCom of
--    `plan_batches` carries each batch's number, positions and a count; `score_batch` reads its range here.
CREATE TABLE overnight_job_batches (
    job_run_id   uuid NOT NULL REFERENCES overnight_job_runs (id) ON DELETE CASCADE,
    plan_id      uuid NOT NULL,
    batch_index  integer NOT NULL,
    lo           uuid NOT NULL,
    hi           uuid NOT NULL,
    user_ids     uuid[],
    planned_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, batch_index)
);
CREATE INDEX overnight_job_batches_job_idx ON overnight_job_batches (job_run_id);
