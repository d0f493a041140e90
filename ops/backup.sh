#!/usr/bin/env bash
# Back up coleta's PostgreSQL schema with pg_dump (custom format, compressed).
#
#   DATABASE_URL=postgresql://coleta@db/coleta ops/backup.sh /var/backups/coleta [schema]
#
# Schedule it daily, e.g. a systemd timer or cron: `15 3 * * * coleta ops/backup.sh …`.
# Keeps the last KEEP (default 14) dumps. Every dump is listed (pg_restore --list) right after
# it is written, so a truncated file fails the job instead of the restore.
#
# Restore test (do it monthly, on a scratch database):
#   createdb coleta_restore_test
#   pg_restore --no-owner --dbname=postgresql://…/coleta_restore_test /var/backups/coleta/<dump>
#   psql …/coleta_restore_test -c "SELECT source, max(collected_at), count(*)
#                                  FROM <schema>.collected_data GROUP BY source"
#   # compare with production, then: dropdb coleta_restore_test
# After a real restore, start coleta: catch-up re-runs slots missed since the dump (within
# each source's catchup_window), and unacknowledged messages still on NATS are written again
# (idempotently: (run_id, page) is unique).
set -euo pipefail

dir="${1:?usage: backup.sh DIR [SCHEMA]}"
schema="${2:-${COLETA_DATABASE_SCHEMA:-public}}"
keep="${KEEP:-14}"
url="${DATABASE_URL:?set DATABASE_URL}"

mkdir -p "$dir"
stamp="$(date -u +%Y%m%dT%H%M%SZ)"
out="$dir/coleta-$schema-$stamp.dump"
tmp="$out.partial"

pg_dump --format=custom --compress=6 --no-owner --schema="$schema" --file="$tmp" "$url"
pg_restore --list "$tmp" >/dev/null
mv "$tmp" "$out"
echo "backup: $out ($(du -h "$out" | cut -f1))"

# Keep the newest $keep dumps.
ls -1t "$dir"/coleta-"$schema"-*.dump 2>/dev/null | tail -n +"$((keep + 1))" | xargs -r rm --
