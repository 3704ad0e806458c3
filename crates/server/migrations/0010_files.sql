-- Files a job attaches to every shard's workspace (JSON: name -> base64); NULL when none.
ALTER TABLE jobs ADD COLUMN files TEXT;
