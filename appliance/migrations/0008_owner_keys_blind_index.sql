-- Erasure final on disk (DESIGN.md, "GDPR"): each subject's DEK is wrapped by a key of its own in the
-- key provider (an "owner key": a Vault transit key per subject, or a slot in the local provider's
-- owner-key file), destroyed on erasure. Deleting the subject_keys row alone left the KEK-wrapped DEK
-- in dead tuples, WAL and backups, where the appliance's own credentials could still unwrap it.
--
-- scheme: 'owner' = wrapped by the subject's owner key (every new key); 'kek' = wrapped by the shared
-- KEK (rows from before this migration, re-wrapped by appliance.subject_keys.upgrade_legacy_keys).
ALTER TABLE subject_keys ADD COLUMN scheme text NOT NULL DEFAULT 'kek' CHECK (scheme IN ('kek', 'owner'));
ALTER TABLE subject_keys ALTER COLUMN scheme SET DEFAULT 'owner';
CREATE INDEX subject_keys_legacy ON subject_keys (subject_id) WHERE scheme = 'kek';

-- Template seeds likewise: each (model, version) seed is wrapped by an owner key of its own, destroyed
-- once a re-key has moved every template off it (destroyed_at). Stale copies of templates protected
-- under that version (dead tuples, WAL, backups) can then no longer be inverted into face vectors.
ALTER TABLE template_keys ADD COLUMN scheme text NOT NULL DEFAULT 'kek' CHECK (scheme IN ('kek', 'owner'));
ALTER TABLE template_keys ALTER COLUMN scheme SET DEFAULT 'owner';
ALTER TABLE template_keys ADD COLUMN destroyed_at timestamptz;

-- external_ref is PII: stored sealed with the subject DEK and found through a keyed hash (a blind
-- index, HMAC-SHA256 under a KEK-wrapped lookup key). The plaintext column stays only until the
-- upgrade has moved each row (then it is NULL everywhere and nothing writes it again).
ALTER TABLE subjects ADD COLUMN external_ref_hash bytea UNIQUE;
ALTER TABLE subjects ADD COLUMN external_ref_sealed bytea;

CREATE TABLE lookup_keys (
    name          text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    wrapped_key   bytea NOT NULL,
    kek_version   integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);
GRANT SELECT, INSERT, UPDATE ON lookup_keys TO appliance_rw;
