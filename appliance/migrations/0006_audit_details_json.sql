-- Audit details are stored as `json`, the exact canonical text the writer hashed, instead of `jsonb`.
--
-- Why: the batch writer's COPY is the appliance's heaviest write (tens of thousands of match events
-- per second), and parsing each record's details into jsonb's binary form cost PostgreSQL about a
-- quarter of its CPU per row (measured: 18-22 -> 13-14 us/row). Nothing queries inside details; the
-- exporter reads them back as JSON values, and `json` keeps the text byte for byte, so the verifier
-- sees exactly what was hashed (jsonb re-printed numbers and re-ordered keys).
-- Existing rows are converted by a rewrite (no UPDATE: the append-only trigger is not involved).

ALTER TABLE audit_log ALTER COLUMN details DROP DEFAULT;
ALTER TABLE audit_log ALTER COLUMN details TYPE json USING details::json;
ALTER TABLE audit_log ALTER COLUMN details SET DEFAULT '{}'::json;
