-- Visits and the biometric data lifecycle (DESIGN.md, "Visits and retention"; appliance/visits).
--
-- * visits: one row per passage at a camera (a fused track, or one match without a track), written in
--   batches by each API process's visit writer. Range-partitioned by UTC day (visits_YYYYMMDD) so
--   retention drops whole tables. The key is (day, id): a tracked visit's id is derived from
--   (camera_id, track_id, day), so two API workers that each saw part of a track upsert one row.
--   No embedding, template or image is stored here: an unknown visitor stays unknown.
-- * visit_rollup: per-hour counts by camera, decision and subject, filled on read for hours that are
--   closed (visit_rollup_hours marks which), so dashboard summaries over weeks read thousands of rows,
--   not millions. Erasure and late writes delete the hours they touch; they are recounted on next read.
-- * subjects.last_seen_at (last accepted match, flushed in batches) and subjects.retain_until (a
--   per-subject override) drive the expiry of faces (subject_retention_days).

CREATE TABLE visits (
    day         date NOT NULL,
    id          uuid NOT NULL,
    camera_id   text CHECK (length(camera_id) <= 200),
    track_id    text CHECK (length(track_id) <= 200),
    first_seen  timestamptz NOT NULL,
    last_seen   timestamptz NOT NULL,
    decision    text NOT NULL CHECK (decision IN ('match', 'unknown')),
    subject_id  uuid,
    similarity  real,
    frames      integer NOT NULL CHECK (frames >= 1),
    PRIMARY KEY (day, id),
    CHECK (subject_id IS NULL OR decision = 'match')
) PARTITION BY RANGE (day);
-- Paging by time (newest first) per partition; BRIN for range scans of summaries (a few pages per
-- partition); per camera and per subject paging. Measured by bench/visits.py against a plain table.
CREATE INDEX visits_time ON visits (first_seen, id);
CREATE INDEX visits_time_brin ON visits USING brin (first_seen);
CREATE INDEX visits_camera ON visits (camera_id, first_seen, id);
CREATE INDEX visits_subject ON visits (subject_id, first_seen, id) WHERE subject_id IS NOT NULL;

CREATE TABLE visit_rollup (
    hour    timestamptz NOT NULL,
    dim     text NOT NULL CHECK (dim IN ('camera', 'decision', 'subject')),
    key     text NOT NULL,               -- '' for no camera / an unknown visitor
    visits  integer NOT NULL CHECK (visits >= 0),
    PRIMARY KEY (dim, hour, key)
);
CREATE TABLE visit_rollup_hours (
    hour       timestamptz PRIMARY KEY,
    rolled_at  timestamptz NOT NULL DEFAULT now()
);

-- Daily partitions visits_YYYYMMDD. SECURITY DEFINER so the service keeps them ahead (tables only);
-- visits_drop_before drops only whole days before p_day (retention), never anything else.
CREATE FUNCTION visits_ensure_partitions(p_from date, p_days integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    d date;
    created integer := 0;
BEGIN
    IF p_days < 1 OR p_days > 400 THEN
        RAISE EXCEPTION 'p_days must be within 1..400';
    END IF;
    FOR i IN 0 .. p_days - 1 LOOP
        d := p_from + i;
        CONTINUE WHEN to_regclass(format('visits_%s', to_char(d, 'YYYYMMDD'))) IS NOT NULL;
        EXECUTE format('CREATE TABLE IF NOT EXISTS %I PARTITION OF visits FOR VALUES FROM (%L) TO (%L)',
                       format('visits_%s', to_char(d, 'YYYYMMDD')), d, d + 1);
        created := created + 1;
    END LOOP;
    RETURN created;
END
$$;

CREATE FUNCTION visits_drop_before(p_day date) RETURNS SETOF text
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
END
$$;
REVOKE ALL ON FUNCTION visits_ensure_partitions(date, integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION visits_drop_before(date) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION visits_ensure_partitions(date, integer) TO appliance_rw;
GRANT EXECUTE ON FUNCTION visits_drop_before(date) TO appliance_rw;

SELECT visits_ensure_partitions((now() AT TIME ZONE 'UTC')::date - 1, 9);

GRANT SELECT, INSERT, UPDATE, DELETE ON visits, visit_rollup, visit_rollup_hours TO appliance_rw;

ALTER TABLE subjects ADD COLUMN last_seen_at timestamptz;
ALTER TABLE subjects ADD COLUMN retain_until timestamptz;
