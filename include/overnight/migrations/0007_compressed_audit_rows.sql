-- The audit rows compressed whatever their size (issue 16's storage bound: docs/scaling.md, docs/audit.md).
--
-- Postgres compresses a value only when its row is over TOAST_TUPLE_THRESHOLD (about 2 kB, fixed when the
-- server is built; `toast_tuple_target` cannot lower it), so most events and history documents, 0.1 to 2 kB
-- each, were stored as plain text. The writer (pipeline._write_results) now lands each chunk's rows in a
-- temporary staging table whose rows are padded over that threshold, so every value is compressed there, and
-- moves them with INSERT ... SELECT, which keeps a value compressed as it is.
--
-- Here, for a row that is over the threshold in the table itself (a large portfolio's INPUTS_CAPTURED):
-- storage MAIN compresses the values in the row instead of moving them out to the TOAST table, and
-- toast_tuple_target = 128 compresses every one of them, not only the largest. The staging tables copy both
-- columns' storage and compression (CREATE TABLE ... LIKE ... INCLUDING STORAGE INCLUDING COMPRESSION).
-- toast_tuple_target is a setting of each partition, never inherited: ensure_event_partitions sets it on the
-- partitions it creates.
ALTER TABLE calculation_events ALTER COLUMN payload SET STORAGE MAIN, ALTER COLUMN symbols SET STORAGE MAIN;
ALTER TABLE recommendation_history ALTER COLUMN document SET STORAGE MAIN;

DO $$
DECLARE
    part regclass;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits
                WHERE inhparent IN ('calculation_events'::regclass, 'recommendation_history'::regclass) LOOP
        EXECUTE format('ALTER TABLE %s SET (toast_tuple_target = 128)', part);
    END LOOP;
END $$;

-- The symbols with pglz, on every server: on these short arrays of short strings it stores 40 B less than lz4
-- (each element's 4-byte length word is below lz4's shortest match) for about 3 us more a row. (SET COMPRESSION
-- does not recurse to partitions; new partitions inherit it.)
DO $$
DECLARE
    part regclass;
BEGIN
    ALTER TABLE calculation_events ALTER COLUMN symbols SET COMPRESSION pglz;
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'calculation_events'::regclass LOOP
        EXECUTE format('ALTER TABLE %s ALTER COLUMN symbols SET COMPRESSION pglz', part);
    END LOOP;
END $$;

-- The monthly partitions of both audit tables, covering [from_month, from_month + months); new partitions
-- get toast_tuple_target (storage and compression they inherit from their table).
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
                EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES FROM (%L) TO (%L)'
                               ' WITH (toast_tuple_target = 128)',
                               part, parent, m, (m + interval '1 month')::date);
                created := created + 1;
            END IF;
        END LOOP;
        m := (m + interval '1 month')::date;
    END LOOP;
    RETURN created;
END $$;
