-- Media (DESIGN.md, "Media"; issue 5): thumbnail size and image dimensions beside each row, and the
-- indexes the media API, the thumbnail cascade and the retention sweep need.

ALTER TABLE media
    ADD COLUMN thumb_size  integer CHECK (thumb_size IN (128, 256)),
    ADD COLUMN width       integer CHECK (width > 0),
    ADD COLUMN height      integer CHECK (height > 0),
    ADD CONSTRAINT media_thumbnail_shape CHECK ((kind = 'thumbnail') = (thumb_size IS NOT NULL AND parent_id IS NOT NULL));

-- One thumbnail per parent and size; also serves ON DELETE CASCADE from the parent row.
CREATE UNIQUE INDEX media_parent_thumb ON media (parent_id, thumb_size) WHERE parent_id IS NOT NULL;
-- Listing pages by capture time (keyset on captured_at, id), with or without a subject/camera filter.
CREATE INDEX media_captured ON media (captured_at, id) WHERE kind <> 'thumbnail';
