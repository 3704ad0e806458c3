-- Token cache (issue 35): a coordinator believes a token it looked up until the database says
-- the token changed, instead of reading it again on every request. Every statement that ends or
-- shortens a token (revoke, rotate, an agent revoked, a credential renewed) sets `changed_at`;
-- each coordinator reads the tokens changed in the last minute four times a second and forgets
-- those it holds.
ALTER TABLE tokens ADD COLUMN changed_at BIGINT;
CREATE INDEX tokens_changed ON tokens (changed_at) WHERE changed_at IS NOT NULL;
