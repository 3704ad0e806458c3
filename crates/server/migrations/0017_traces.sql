-- Tracing (issue 17): the W3C trace context a job belongs to (`00-<trace>-<span>-<flags>`),
-- taken from the request that submitted it (or the parent of a follow-up). Leases carry it to
-- agents and audit entries about the job name its trace id. Jobs stored before have none.
ALTER TABLE jobs ADD COLUMN traceparent TEXT;
