-- Match records stored in blocks: one audit_log row holds up to 1000 consecutive records of one
-- writer match chain (appliance/audit/chain.py, "match blocks").
--
-- Why: at tens of thousands of match events per second, a row per record (heap tuple, primary-key
-- and subject-index entries, COPY text parsing) cost PostgreSQL ~20 us of CPU per event, more than
-- the match that caused it; a block row costs ~0.5 us per record and ~9x less disk and WAL. The
-- records and their hash chain are unchanged: the exporter expands blocks, so the verifier and the
-- export format do not know about them.
--
-- A block row: seq/ts/hash are its last record's, prev_hash its first record's prev, first_ts its
-- first record's time; events = how many records; packed = zstd(JSON array of [ts, action, outcome,
-- body]); hashes = their 32-byte hashes concatenated; subjects = the distinct subject ids (GIN, for
-- access requests). Plain rows leave all five NULL. Append-only triggers and grants are unchanged.

ALTER TABLE audit_log ADD COLUMN first_ts timestamptz;
ALTER TABLE audit_log ADD COLUMN events integer;
ALTER TABLE audit_log ADD COLUMN packed bytea;
ALTER TABLE audit_log ADD COLUMN hashes bytea;
ALTER TABLE audit_log ADD COLUMN subjects uuid[];
ALTER TABLE audit_log ADD CONSTRAINT audit_log_block_shape CHECK (
    (events IS NULL AND first_ts IS NULL AND packed IS NULL AND hashes IS NULL AND subjects IS NULL)
    OR (events BETWEEN 1 AND 100000 AND class = 'match' AND first_ts IS NOT NULL AND first_ts <= ts
        AND packed IS NOT NULL AND hashes IS NOT NULL AND octet_length(hashes) = 32 * events));
-- Already compressed (packed) or random (hashes): PostgreSQL's own compression would only cost CPU.
ALTER TABLE audit_log ALTER COLUMN packed SET STORAGE EXTERNAL;
ALTER TABLE audit_log ALTER COLUMN hashes SET STORAGE EXTERNAL;
CREATE INDEX audit_log_subjects ON audit_log USING gin (subjects) WHERE subjects IS NOT NULL;
