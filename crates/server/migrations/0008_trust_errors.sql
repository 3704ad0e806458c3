-- Trust keeps every result an agent reported per Python version and backend, and how many of
-- them were infrastructure failures (`sandbox_error`, `killed`): its error rate.
ALTER TABLE agent_trust ADD COLUMN results BIGINT NOT NULL DEFAULT 0;
ALTER TABLE agent_trust ADD COLUMN errors BIGINT NOT NULL DEFAULT 0;
