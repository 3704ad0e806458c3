-- The sandbox backend a task's job asks for (`process`, `jail`); NULL: any agent may run it.
ALTER TABLE tasks ADD COLUMN backend TEXT;
