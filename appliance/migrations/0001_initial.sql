-- Initial schema (DESIGN.md, "Data model"). Applied by `appliance migrate` as the owner role;
-- the service logs in as a member of appliance_rw and gets only the privileges granted here.

CREATE EXTENSION IF NOT EXISTS vector;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'appliance_rw') THEN
        CREATE ROLE appliance_rw NOLOGIN;
    END IF;
END
$$;

CREATE TABLE subjects (
    id            uuid PRIMARY KEY,
    external_ref  text UNIQUE CHECK (length(external_ref) BETWEEN 1 AND 200),
    label_sealed  bytea,                     -- display label, sealed with the subject DEK
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'erasing', 'erased')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    erased_at     timestamptz
);

-- One DEK per subject, only ever stored wrapped by the KEK. Deleting the row is the crypto-shred.
CREATE TABLE subject_keys (
    subject_id    uuid PRIMARY KEY REFERENCES subjects (id),
    key_id        uuid NOT NULL UNIQUE,
    wrapped_dek   bytea NOT NULL,
    kek_version   integer NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Per model and version, the 32-byte seed of the template-protection rotation, wrapped by the KEK.
CREATE TABLE template_keys (
    model         text NOT NULL,
    version       integer NOT NULL CHECK (version > 0),
    dim           integer NOT NULL CHECK (dim > 0),
    wrapped_seed  bytea NOT NULL,
    kek_version   integer NOT NULL,
    state         text NOT NULL DEFAULT 'active' CHECK (state IN ('pending', 'active', 'retired')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
CREATE UNIQUE INDEX template_keys_one_active ON template_keys (model) WHERE state = 'active';

CREATE SEQUENCE encoding_label_seq AS bigint;

-- raw_sealed: the raw vector, AES-GCM sealed with the subject DEK (context: table, ids, model).
-- template: the protected template R·v; pgvector has no per-row dimension, indexes cast per model.
CREATE TABLE encodings (
    id                uuid PRIMARY KEY,
    label             bigint NOT NULL UNIQUE DEFAULT nextval('encoding_label_seq'),
    subject_id        uuid NOT NULL REFERENCES subjects (id),
    model             text NOT NULL,
    template_version  integer NOT NULL,
    raw_sealed        bytea NOT NULL,
    template          vector NOT NULL,
    created_at        timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (model, template_version) REFERENCES template_keys (model, version)
);
ALTER SEQUENCE encoding_label_seq OWNED BY encodings.label;
CREATE INDEX encodings_subject ON encodings (subject_id);
CREATE INDEX encodings_model_label ON encodings (model, label);

CREATE TABLE media (
    id            uuid PRIMARY KEY,
    subject_id    uuid REFERENCES subjects (id),
    parent_id     uuid REFERENCES media (id) ON DELETE CASCADE,
    camera_id     text CHECK (length(camera_id) <= 200),
    kind          text NOT NULL CHECK (kind IN ('image', 'clip', 'thumbnail', 'enrolment')),
    object_key    text NOT NULL UNIQUE,
    content_type  text NOT NULL,
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0),
    sha256        bytea NOT NULL,
    wrapped_dek   bytea,                    -- NULL when sealed with the subject's DEK
    kek_version   integer,
    captured_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz
);
CREATE INDEX media_subject ON media (subject_id);
CREATE INDEX media_camera_time ON media (camera_id, captured_at);
CREATE INDEX media_expiry ON media (expires_at) WHERE expires_at IS NOT NULL;

-- Append-only, hash-chained. Each writer keeps its own chain (chain, seq); see appliance/audit.
CREATE TABLE audit_log (
    ts          timestamptz NOT NULL,
    chain       text NOT NULL,
    seq         bigint NOT NULL,
    actor       text NOT NULL,
    action      text NOT NULL,
    subject_id  uuid,
    object_id   text,
    outcome     text NOT NULL,
    request_id  text,
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    prev_hash   bytea NOT NULL,
    hash        bytea NOT NULL,
    PRIMARY KEY (ts, chain, seq)
) PARTITION BY RANGE (ts);
CREATE TABLE audit_log_default PARTITION OF audit_log DEFAULT;
CREATE INDEX audit_log_subject ON audit_log (subject_id, ts);
CREATE INDEX audit_log_chain ON audit_log (chain, seq);

CREATE TABLE audit_checkpoints (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ts          timestamptz NOT NULL DEFAULT now(),
    chain       text NOT NULL,
    seq         bigint NOT NULL,
    head_hash   bytea NOT NULL,
    count       bigint NOT NULL,
    key_id      text NOT NULL,
    signature   bytea NOT NULL
);

CREATE TABLE erasure_jobs (
    id                 uuid PRIMARY KEY,
    subject_id         uuid NOT NULL UNIQUE REFERENCES subjects (id),
    state              text NOT NULL DEFAULT 'pending'
                       CHECK (state IN ('pending', 'running', 'done', 'failed')),
    step               text,
    progress           jsonb NOT NULL DEFAULT '{}'::jsonb,
    receipt            jsonb,
    receipt_signature  bytea,
    request_id         text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    finished_at        timestamptz
);

-- API keys: the public prefix finds the row, only a SHA-256 of the secret is stored.
CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    prefix       text NOT NULL UNIQUE,
    secret_hash  bytea NOT NULL,
    scopes       text[] NOT NULL CHECK (scopes <@ ARRAY['match', 'enroll', 'media', 'audit', 'admin']),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

GRANT USAGE ON SCHEMA public TO appliance_rw;
GRANT SELECT, INSERT, UPDATE, DELETE ON subjects, subject_keys, template_keys, encodings, media,
    erasure_jobs, api_keys TO appliance_rw;
GRANT USAGE, SELECT ON SEQUENCE encoding_label_seq TO appliance_rw;
-- The audit trail: the service may add and read, never change or remove.
GRANT SELECT, INSERT ON audit_log, audit_checkpoints TO appliance_rw;
