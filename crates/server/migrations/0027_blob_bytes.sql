-- A tenant's blob bytes and its cap on them (issue 33).
--
-- Each owner row carries the blob's size, so a tenant's use is one sum. Rows from before this
-- migration say -1 (unknown) until the coordinator's start measures them on disk.
ALTER TABLE blob_owners ADD COLUMN bytes BIGINT NOT NULL DEFAULT -1;
ALTER TABLE tenants ADD COLUMN max_blob_bytes BIGINT;
CREATE INDEX blob_owners_unmeasured ON blob_owners (sha256) WHERE bytes < 0;
