-- coleta 0003: collecting from real APIs.
-- Rows may be one per record of a page: (run_id, page, record) is the unique key, and rows of
-- page granularity keep record 0.
ALTER TABLE collected_data ADD COLUMN record integer NOT NULL DEFAULT 0;
ALTER TABLE collected_data DROP CONSTRAINT collected_data_run_page;
ALTER TABLE collected_data
    ADD CONSTRAINT collected_data_run_page_record UNIQUE (run_id, page, record);

-- A run whose API had nothing new (HTTP 304, or the body of the last stored run) is
-- 'unchanged': successful, no rows; `note` says why.
ALTER TABLE collection_runs DROP CONSTRAINT collection_runs_status_check;
ALTER TABLE collection_runs ADD CONSTRAINT collection_runs_status_check
    CHECK (status IN ('queued', 'fetching', 'stored', 'unchanged', 'failed', 'missed'));
ALTER TABLE collection_runs ADD COLUMN note text;

-- What a source's next request needs from its last stored run: the validators for a
-- conditional request, the body's sha256 (skip_unchanged) and the incremental cursor (a JSON
-- value). Written by the writer in the transaction of the data it comes from; mirrored to the
-- key-value bucket <prefix>_sources for the fetcher.
CREATE TABLE source_state (
    source        text PRIMARY KEY,
    etag          text,
    last_modified text,
    body_sha256   text,
    cursor        jsonb,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
