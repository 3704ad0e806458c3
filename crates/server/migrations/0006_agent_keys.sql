-- Signed reports (issue 11): each agent registers an ed25519 public key (hex) at enrolment;
-- its reports must carry a signature the key verifies. Agents enrolled before this have none
-- and must enroll again.
ALTER TABLE agents ADD COLUMN public_key TEXT;
