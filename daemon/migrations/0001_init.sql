-- coleta 0001: runs and the data they collected.

CREATE TABLE collection_runs (
    run_id        text PRIMARY KEY,
    source        text NOT NULL,
    trigger       text NOT NULL CHECK (trigger IN ('schedule', 'manual', 'backfill', 'catchup')),
    scheduled_for timestamptz NOT NULL,
    status        text NOT NULL DEFAULT 'queued'
                  CHECK (status IN ('queued', 'fetching', 'stored', 'failed')),
    attempts      integer NOT NULL DEFAULT 0,
    pages         integer NOT NULL DEFAULT 0,
    rows          integer NOT NULL DEFAULT 0,
    bytes         bigint  NOT NULL DEFAULT 0,
    http_status   integer,
    error_code    text,
    error         text,
    trace_id      text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    queued_at     timestamptz,
    started_at    timestamptz,
    finished_at   timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX collection_runs_recent ON collection_runs (created_at DESC);
CREATE INDEX collection_runs_source_recent ON collection_runs (source, created_at DESC);
CREATE INDEX collection_runs_source_slot ON collection_runs (source, scheduled_for DESC);

-- The original design's table: one row per stored response page. JSON bodies land in `data`;
-- any other body (or JSON that jsonb cannot hold) lands in `body` with its content type.
-- Downstream jobs claim `pending` rows (see the README) and set `processed_at`.
CREATE TABLE collected_data (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        text NOT NULL,
    source        text NOT NULL,
    page          integer NOT NULL DEFAULT 0,
    scheduled_for timestamptz,
    collected_at  timestamptz NOT NULL DEFAULT now(),
    http_status   integer,
    content_type  text,
    data          jsonb,
    body          bytea,
    status        text NOT NULL DEFAULT 'pending',
    processed_at  timestamptz,
    CONSTRAINT collected_data_run_page UNIQUE (run_id, page)
);
CREATE INDEX collected_data_source_collected ON collected_data (source, collected_at DESC);
CREATE INDEX collected_data_pending ON collected_data (id) WHERE status = 'pending';
