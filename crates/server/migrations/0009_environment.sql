-- A job's `[environment]` (JSON: its requirements), sent to agents with every lease; NULL when
-- the job uses the host's packages.
ALTER TABLE jobs ADD COLUMN environment TEXT;
