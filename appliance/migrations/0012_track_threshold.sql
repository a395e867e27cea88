-- The fused decision of a track has its own calibrated threshold (issue 19; vector.calibration.track_scores):
-- the same FAR target per stranger *track* as `threshold` per query. NULL on a row applied before this
-- column existed: the track then uses that row's `threshold`, as it did when it was applied; NULL on a
-- reset row (threshold NULL too): the configured default `track_threshold`.
ALTER TABLE model_thresholds
    ADD COLUMN track_threshold double precision CHECK (track_threshold BETWEEN -1 AND 1);
