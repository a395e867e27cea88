-- Thumbnails live in their own row (issue 5, upload throughput): a sealed 128/256 px thumbnail is a
-- few KB, and its S3 PUT cost more CPU (SDK + SeaweedFS) than making it. The bytes stay sealed exactly
-- as an object would be (crypto.stream under the row's DEK, bound to its id and kind), so the
-- crypto-shred, KEK rewrap (wrapped_dek is unchanged) and erasure (rows deleted, then VACUUM of
-- media, which covers its TOAST table) reach them as before.
--
-- Exactly one of object_key (the bucket) and sealed (this row) holds a row's sealed bytes. Rows
-- written before this migration keep their thumbnails in the bucket and are still read from there.

ALTER TABLE media
    ALTER COLUMN object_key DROP NOT NULL,
    ADD COLUMN sealed bytea,
    ADD CONSTRAINT media_stored_once CHECK ((object_key IS NULL) <> (sealed IS NULL)),
    ADD CONSTRAINT media_inline_thumbnails_only CHECK (sealed IS NULL OR kind = 'thumbnail');

-- Sealed bytes are incompressible: store large values out of line without trying to compress them.
ALTER TABLE media ALTER COLUMN sealed SET STORAGE EXTERNAL;
