-- coleta 0002: slots skipped while the daemon was down are recorded as 'missed';
-- runs replayed from the dead-letter stream count their replays.
ALTER TABLE collection_runs DROP CONSTRAINT collection_runs_status_check;
ALTER TABLE collection_runs ADD CONSTRAINT collection_runs_status_check
    CHECK (status IN ('queued', 'fetching', 'stored', 'failed', 'missed'));
ALTER TABLE collection_runs ADD COLUMN replay integer NOT NULL DEFAULT 0;
