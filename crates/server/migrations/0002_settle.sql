-- The settle state machine (issue 8): returned leases are closed, folds are leased steps.
-- A closed lease can settle nothing (its agent gave it back unrun).
ALTER TABLE leases ADD COLUMN closed BIGINT NOT NULL DEFAULT 0;
-- The coordinator folding the job, until when, how many tries so far, not before when.
ALTER TABLE jobs ADD COLUMN fold_owner TEXT;
ALTER TABLE jobs ADD COLUMN fold_expires BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN fold_tries BIGINT NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN fold_after BIGINT NOT NULL DEFAULT 0;
