-- coleta 0005: rows are content-addressed, so a replay never loses data.
-- A dead-letter replay (or a retry after a crash) may fetch other content than the first
-- attempt stored at the same (run_id, page, record): a later run moved the incremental cursor,
-- the API changed. Keyed on (run_id, page, record) alone, ON CONFLICT DO NOTHING dropped the new
-- rows while the cursor and validators saved with them moved past them. Keyed on the SHA-256
-- of the row's content as received as well, the new content is stored beside the first (with
-- its replay number), and a message delivered again, or a replay that fetched identical
-- content, still stores nothing twice.
--
-- Rows written before this migration keep a NULL content_sha256 (the column is nullable:
-- adding it rewrites nothing; `replay` has a constant default, which PostgreSQL 11 and later
-- add without a rewrite either). NULLs never conflict, so a message in flight during the
-- upgrade — stored by the old writer, delivered again to the new one — may be stored twice.
-- Building the unique index reads the table once and blocks writes to it meanwhile.
ALTER TABLE collected_data ADD COLUMN content_sha256 bytea;
ALTER TABLE collected_data ADD COLUMN replay integer NOT NULL DEFAULT 0;
CREATE UNIQUE INDEX collected_data_run_page_record_content
    ON collected_data (run_id, page, record, content_sha256);
ALTER TABLE collected_data DROP CONSTRAINT collected_data_run_page_record;
