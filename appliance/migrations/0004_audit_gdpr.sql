-- Audit trail and GDPR (DESIGN.md, "Audit", "GDPR"); see appliance/audit/chain.py for the record format.
--
-- * audit_log gets a retention class ('match' events are kept for less time than the rest) and
--   monthly partitions, each split by class, so retention drops whole tables instead of deleting rows.
-- * audit_heads holds each chain's head. The in-transaction chains are rows locked FOR UPDATE by the
--   writing transaction, so concurrent transactions never fork a chain and a rollback undoes both the
--   record and the head move.
-- * Append-only: triggers refuse UPDATE, DELETE and TRUNCATE on the log and its checkpoints, for every
--   role; the service role has only SELECT and INSERT there (granted in 0001).

ALTER TABLE audit_log ADD COLUMN class text NOT NULL DEFAULT 'audit' CHECK (class IN ('audit', 'match'));
-- Sub-partitions by class need the class in the key; a chain has one class, so uniqueness is unchanged.
-- Leading with (chain, seq) lets the key serve chain walks too, so the separate chain index goes: one
-- index less per insert on the batch writer's path. Records without a subject (unknown faces) are
-- most match events and are never looked up by subject, hence the partial subject index.
ALTER TABLE audit_log DROP CONSTRAINT audit_log_pkey, ADD PRIMARY KEY (chain, seq, ts, class);
DROP INDEX audit_log_chain;
DROP INDEX audit_log_subject;
CREATE INDEX audit_log_subject ON audit_log (subject_id, ts) WHERE subject_id IS NOT NULL;

ALTER TABLE audit_checkpoints ADD COLUMN kind text NOT NULL DEFAULT 'periodic'
    CHECK (kind IN ('periodic', 'shutdown', 'retention', 'manual'));
CREATE INDEX audit_checkpoints_chain ON audit_checkpoints (chain, seq);

CREATE TABLE audit_heads (
    chain       text PRIMARY KEY CHECK (length(chain) BETWEEN 1 AND 200),
    class       text NOT NULL CHECK (class IN ('audit', 'match')),
    seq         bigint NOT NULL CHECK (seq >= 0),
    hash        bytea NOT NULL,
    ts          timestamptz NOT NULL DEFAULT '1970-01-01T00:00:00Z',
    updated_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO audit_heads (chain, class, seq, hash)
SELECT format('tx:%s:%s', c, i), c, 0, '\x0000000000000000000000000000000000000000000000000000000000000000'::bytea
FROM unnest(ARRAY['audit', 'match']) AS c, generate_series(0, 7) AS i;

CREATE FUNCTION audit_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the audit trail is append-only: % on % refused', TG_OP, TG_TABLE_NAME
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'retention drops whole partitions (appliance audit retention)';
END
$$;

CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_log_default_no_truncate BEFORE TRUNCATE ON audit_log_default
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION audit_refuse_change();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();

-- Monthly partitions audit_log_YYYY_MM, each list-partitioned by class into _match and _audit leaves.
-- Rows that already landed in the default partition for a new month are moved by re-creating the
-- default partition (no UPDATE/DELETE of audit rows ever happens). SECURITY DEFINER so the service
-- can keep partitions ahead of time; it creates tables only, never drops.
CREATE FUNCTION audit_ensure_partitions(p_from date, p_months integer) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = public, pg_temp AS $$
DECLARE
    m date;
    name text;
    created integer := 0;
    moved boolean := false;
BEGIN
    IF p_months < 1 OR p_months > 120 THEN
        RAISE EXCEPTION 'p_months must be within 1..120';
    END IF;
    FOR i IN 0 .. p_months - 1 LOOP
        m := (date_trunc('month', p_from) + make_interval(months => i))::date;
        name := format('audit_log_%s', to_char(m, 'YYYY_MM'));
        CONTINUE WHEN to_regclass(name) IS NOT NULL;
        IF NOT moved AND EXISTS (SELECT 1 FROM audit_log_default
                                 WHERE ts >= m AND ts < m + interval '1 month') THEN
            ALTER TABLE audit_log DETACH PARTITION audit_log_default;
            ALTER TABLE audit_log_default RENAME TO audit_log_default_moving;
            CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
            CREATE TRIGGER audit_log_default_no_truncate BEFORE TRUNCATE ON audit_log_default
                FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change();
            moved := true;
        END IF;
        EXECUTE format('CREATE TABLE %I PARTITION OF audit_log FOR VALUES FROM (%L) TO (%L) PARTITION BY LIST (class)',
                       name, m, (m + interval '1 month')::date);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (''match'')', name || '_match', name);
        EXECUTE format('CREATE TABLE %I PARTITION OF %I FOR VALUES IN (''audit'')', name || '_audit', name);
        EXECUTE format('CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()', name || '_match');
        EXECUTE format('CREATE TRIGGER audit_no_truncate BEFORE TRUNCATE ON %I
                        FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()', name || '_audit');
        created := created + 1;
    END LOOP;
    IF moved THEN
        INSERT INTO audit_log SELECT * FROM audit_log_default_moving;
        DROP TABLE audit_log_default_moving;
    END IF;
    RETURN created;
END
$$;
REVOKE ALL ON FUNCTION audit_ensure_partitions(date, integer) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit_ensure_partitions(date, integer) TO appliance_rw;

SELECT audit_ensure_partitions((date_trunc('month', now()) - interval '1 month')::date, 4);

GRANT SELECT, INSERT, UPDATE ON audit_heads TO appliance_rw;

-- Erasure jobs record which step they reached and what they destroyed (the receipt inputs).
ALTER TABLE erasure_jobs ADD COLUMN started_at timestamptz;
ALTER TABLE erasure_jobs ADD COLUMN attempts integer NOT NULL DEFAULT 0;
