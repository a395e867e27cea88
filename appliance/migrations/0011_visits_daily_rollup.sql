-- Visits: a daily roll-up beside the hourly one (bench/visits.py: summing 30 days of hourly rows by
-- subject read ~720,000 rows, 370 ms at 10M visits; the daily rows are 30x fewer), and one function
-- that invalidates both for the hours a late write or an erasure touched.
--
-- The visit writer rolls a day up once its 24 hours are rolled up (appliance.visits.queries). Roll-ups
-- and invalidations take the same transaction-level advisory lock, so a roll-up never commits counts
-- read before an erasure that committed first.

CREATE TABLE visit_rollup_days (
    day     date NOT NULL,
    dim     text NOT NULL CHECK (dim IN ('camera', 'decision', 'subject')),
    key     text NOT NULL,
    visits  integer NOT NULL CHECK (visits >= 0),
    PRIMARY KEY (dim, day, key)
);
CREATE TABLE visit_rollup_days_done (
    day        date PRIMARY KEY,
    rolled_at  timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE, DELETE ON visit_rollup_days, visit_rollup_days_done TO appliance_rw;

-- Forget the roll-up of these hours and of their days: the next reads count them from visits and the
-- writer's next round rolls them up again.
CREATE FUNCTION visits_invalidate_hours(p_hours timestamptz[]) RETURNS void
LANGUAGE plpgsql SET search_path = public, pg_temp AS $$
BEGIN
    IF p_hours IS NULL OR cardinality(p_hours) = 0 THEN
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(hashtext('visit_rollup'));
    DELETE FROM visit_rollup WHERE hour = ANY(p_hours);
    DELETE FROM visit_rollup_hours WHERE hour = ANY(p_hours);
    DELETE FROM visit_rollup_days
        WHERE day IN (SELECT DISTINCT (h AT TIME ZONE 'UTC')::date FROM unnest(p_hours) AS h);
    DELETE FROM visit_rollup_days_done
        WHERE day IN (SELECT DISTINCT (h AT TIME ZONE 'UTC')::date FROM unnest(p_hours) AS h);
END
$$;
GRANT EXECUTE ON FUNCTION visits_invalidate_hours(timestamptz[]) TO appliance_rw;

CREATE OR REPLACE FUNCTION visits_drop_before(p_day date) RETURNS SETOF text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'visits'::regclass AND c.relname ~ '^visits_[0-9]{8}$'
               AND to_date(substr(c.relname, 8), 'YYYYMMDD') < p_day
             ORDER BY c.relname LOOP
        EXECUTE format('DROP TABLE %I', r.relname);
        RETURN NEXT r.relname;
    END LOOP;
    DELETE FROM visit_rollup WHERE hour < p_day::timestamp AT TIME ZONE 'UTC';
    DELETE FROM visit_rollup_hours WHERE hour < p_day::timestamp AT TIME ZONE 'UTC';
    DELETE FROM visit_rollup_days WHERE day < p_day;
    DELETE FROM visit_rollup_days_done WHERE day < p_day;
END
$$;
