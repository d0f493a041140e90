"""The writer's SQL: rows into ``collected_data``, a run's record, its source's state.

Rows are content-addressed: the unique key is ``(run_id, page, record, content_sha256)`` with
``ON CONFLICT DO NOTHING``, so a message delivered again stores nothing twice. A run's record
only moves forward (``UPSERT_RUN``), and a source's state never gets ahead of the rows stored
(``UPSERT_SOURCE_STATE``).
"""

__all__ = [
    "COPY_LARGE_BODY",
    "CREATE_LARGE_BODY",
    "INSERT_DATA",
    "INSERT_LARGE_BODY",
    "SELECT_SOURCE_STATE",
    "UPSERT_RUN",
    "UPSERT_SOURCE_STATE",
]

INSERT_DATA = """
INSERT INTO collected_data
    (run_id, source, page, record, scheduled_for, collected_at, http_status, content_type,
     replay, content_sha256, data, body)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s::jsonb, %s)
ON CONFLICT (run_id, page, record, content_sha256) DO NOTHING
"""

#: A page stored whole from the object store (``LargeRow``) is streamed into this table with
#: COPY, then moved into ``collected_data`` under the rule of ``INSERT_DATA``. Dropped at commit.
CREATE_LARGE_BODY = """
CREATE TEMPORARY TABLE IF NOT EXISTS coleta_large_body (data jsonb, body bytea) ON COMMIT DROP
"""
COPY_LARGE_BODY = {
    "data": "COPY coleta_large_body (data) FROM STDIN (FORMAT BINARY)",
    "body": "COPY coleta_large_body (body) FROM STDIN (FORMAT BINARY)",
}
INSERT_LARGE_BODY = """
WITH large AS (DELETE FROM coleta_large_body RETURNING data, body)
INSERT INTO collected_data
    (run_id, source, page, record, scheduled_for, collected_at, http_status, content_type,
     replay, content_sha256, data, body)
SELECT %s::text, %s::text, %s::integer, %s::integer, %s::timestamptz, %s::timestamptz,
       %s::integer, %s::text, %s::integer, %s::bytea, data, body
FROM large
ON CONFLICT (run_id, page, record, content_sha256) DO NOTHING
"""


#: Validators are replaced by a one-request run's (``remember``); the cursor only grows. Not at
#: all when the run's record (written just before, in the same transaction) is ``failed`` in
#: this replay — a page of it was rejected, so its rows are not all stored — or belongs to a
#: later replay, which saves its own state.
UPSERT_SOURCE_STATE = """
INSERT INTO source_state AS s (source, etag, last_modified, body_sha256, cursor, updated_at)
SELECT %(source)s::text, %(etag)s::text, %(last_modified)s::text, %(body_sha256)s::text,
       %(cursor)s::jsonb, now()
WHERE NOT EXISTS (
    SELECT 1 FROM collection_runs r
    WHERE r.run_id = %(run_id)s::text
      AND (r.replay > %(replay)s::integer
           OR (r.replay = %(replay)s::integer AND r.status = 'failed')))
ON CONFLICT (source) DO UPDATE SET
    etag          = CASE WHEN %(remember)s THEN EXCLUDED.etag ELSE s.etag END,
    last_modified = CASE WHEN %(remember)s THEN EXCLUDED.last_modified ELSE s.last_modified END,
    body_sha256   = CASE WHEN %(remember)s THEN EXCLUDED.body_sha256 ELSE s.body_sha256 END,
    cursor        = GREATEST(s.cursor, EXCLUDED.cursor),
    updated_at    = now()
"""

SELECT_SOURCE_STATE = """
SELECT source, etag, last_modified, body_sha256, cursor FROM source_state
WHERE %(sources)s::text[] IS NULL OR source = ANY(%(sources)s::text[])
"""

# Status only moves forward: queued → fetching → stored | unchanged | failed; a terminal
# status stays.
# 'missed' is not terminal: a later run of the same slot (catch-up, backfill) replaces it.
# Each dead-letter replay of a run has a higher ``replay`` number: its first event starts the
# record over, and events of an older attempt arriving late change nothing.
UPSERT_RUN = """
INSERT INTO collection_runs AS r
    (run_id, source, trigger, scheduled_for, status, attempts, pages, rows, bytes,
     http_status, error_code, error, trace_id, queued_at, started_at, finished_at, replay,
     note)
VALUES (%(run_id)s, %(source)s, %(trigger)s, %(scheduled_for)s, %(status)s, %(attempts)s,
        %(pages)s, %(rows)s, %(bytes)s, %(http_status)s, %(error_code)s, %(error)s,
        %(trace_id)s, %(queued_at)s, %(started_at)s, %(finished_at)s, %(replay)s, %(note)s)
ON CONFLICT (run_id) DO UPDATE SET
    status = CASE
        WHEN EXCLUDED.status = 'missed' THEN r.status
        WHEN EXCLUDED.replay > r.replay OR r.status = 'missed' THEN EXCLUDED.status
        WHEN EXCLUDED.replay < r.replay OR r.status IN ('stored', 'unchanged', 'failed')
            THEN r.status
        WHEN EXCLUDED.status = 'queued' THEN r.status
        ELSE EXCLUDED.status END,
    attempts    = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.attempts
                       ELSE GREATEST(r.attempts, EXCLUDED.attempts) END,
    pages       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.pages
                       ELSE GREATEST(r.pages, EXCLUDED.pages) END,
    rows        = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.rows
                       ELSE GREATEST(r.rows, EXCLUDED.rows) END,
    bytes       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.bytes
                       ELSE GREATEST(r.bytes, EXCLUDED.bytes) END,
    http_status = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.http_status
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.http_status
                       ELSE COALESCE(EXCLUDED.http_status, r.http_status) END,
    error_code  = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.error_code
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.error_code
                       ELSE EXCLUDED.error_code END,
    error       = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.error
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed')
                           THEN r.error
                       ELSE EXCLUDED.error END,
    trace_id    = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.trace_id
                       ELSE COALESCE(r.trace_id, EXCLUDED.trace_id) END,
    queued_at   = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.queued_at
                       ELSE COALESCE(r.queued_at, EXCLUDED.queued_at) END,
    started_at  = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.started_at
                       ELSE COALESCE(r.started_at, EXCLUDED.started_at) END,
    finished_at = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.finished_at
                       ELSE COALESCE(r.finished_at, EXCLUDED.finished_at) END,
    note        = CASE WHEN EXCLUDED.replay > r.replay THEN EXCLUDED.note
                       WHEN EXCLUDED.replay < r.replay
                           OR r.status IN ('stored', 'unchanged', 'failed') THEN r.note
                       ELSE COALESCE(EXCLUDED.note, r.note) END,
    replay      = GREATEST(r.replay, EXCLUDED.replay),
    updated_at  = now()
"""
