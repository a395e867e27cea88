-- Calibrated decision thresholds per model (DESIGN.md, "Decisions"; `appliance models calibrate`).
-- Insert-only and versioned per model: every calibration run is a row (what data it saw, what it
-- measured, who ran it, when); the threshold that applies is the newest row with applied = true, and
-- a NULL threshold there means "back to the configured default" (`appliance models reset`).
CREATE TABLE model_thresholds (
    model             text NOT NULL CHECK (length(model) BETWEEN 1 AND 100),
    version           integer NOT NULL CHECK (version > 0),
    applied           boolean NOT NULL,
    threshold         double precision CHECK (threshold BETWEEN -1 AND 1),
    target_far        double precision CHECK (target_far > 0 AND target_far < 1),
    -- The data it was measured on: counts, and the template version / feed position of the index.
    subjects          integer NOT NULL DEFAULT 0 CHECK (subjects >= 0),
    encodings         integer NOT NULL DEFAULT 0 CHECK (encodings >= 0),
    template_version  integer,
    feed_seq          bigint,
    report            jsonb NOT NULL DEFAULT '{}'::jsonb,  -- vector.calibration.Report: figures only, no vectors
    created_by        text NOT NULL CHECK (length(created_by) BETWEEN 1 AND 200),
    created_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, version)
);
CREATE INDEX model_thresholds_applied ON model_thresholds (model, version DESC) WHERE applied;
GRANT SELECT, INSERT ON model_thresholds TO appliance_rw;
