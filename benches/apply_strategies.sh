#!/usr/bin/env bash
# Which batch-apply strategy should the sink use? Measures, on the target server, the
# two candidates for applying batches of upserts to a 10-column patients table:
#
#   unnest: INSERT INTO t SELECT u.c::type, … FROM unnest($1::text[], …) ON CONFLICT … DO UPDATE
#           (one statement, the values as text arrays — what the sink does)
#   copy:   COPY a temp table FROM STDIN (text), then
#           INSERT INTO t SELECT c::type, … FROM tmp ON CONFLICT … DO UPDATE
#
# Both run BATCHES batches of BATCH rows (half new keys, half updates of existing
# ones), each batch in its own transaction, driven by psql from prepared files so the
# client side costs the same. Run: benches/apply_strategies.sh  (env BATCH, BATCHES)
set -euo pipefail

url=${PGFERRY_TARGET_URL:?eval "\$(scripts/services.sh env)" first}
batch=${BATCH:-5000}
batches=${BATCHES:-40}
db=pgferry_bench_apply
base=${url%/*}
work=$(mktemp -d)
trap 'rm -rf "$work"; psql "$base/postgres" -qc "drop database if exists $db with (force)" >/dev/null 2>&1 || true' EXIT

PGOPTIONS='-c client_min_messages=warning' psql "$base/postgres" -qc "drop database if exists $db with (force)" -c "create database $db" >/dev/null
dburl="$base/$db"
ddl="(id bigint primary key, name text, dob date, gender char(1), contact_number text, email text,
      address text, notes text, weight numeric(6,2), updated_at timestamptz)"
psql "$dburl" -qc "create table p_unnest $ddl; create table p_copy $ddl"

cols="id, name, dob, gender, contact_number, email, address, notes, weight, updated_at"
casts="u.id::bigint, u.name::text, u.dob::date, u.gender::char(1), u.contact_number::text, u.email::text,"
casts+=" u.address::text, u.notes::text, u.weight::numeric(6,2), u.updated_at::timestamptz"
set_list="name = excluded.name, dob = excluded.dob, gender = excluded.gender, contact_number = excluded.contact_number,"
set_list+=" email = excluded.email, address = excluded.address, notes = excluded.notes, weight = excluded.weight,"
set_list+=" updated_at = excluded.updated_at"

# The rows of batch b as tab-separated text (half overlap the previous batch's keys).
rows() {
    python3 - "$1" "$batch" <<'PY'
import sys
b, n = int(sys.argv[1]), int(sys.argv[2])
start = b * n // 2
for i in range(start, start + n):
    print(f"{i}\tPatient {i}\t19{50 + i % 50}-0{1 + i % 9}-1{i % 9}\t{'MF'[i % 2]}\t+44 7000{i:06d}\t"
          f"p{i}@example.org\t{i} Hospital Road, Leeds\t{'Routine check. ' * 12}\t{60 + i % 40}.{i % 100:02d}\t"
          f"2026-11-22 01:02:03.{i % 1000000:06d}+00")
PY
}

: > "$work/unnest.sql"
: > "$work/copy.sql"
echo "create temp table stage (like p_copy including defaults) on commit delete rows;" >> "$work/copy.sql"
echo "alter table stage alter column id drop not null;" >> "$work/copy.sql"
for ((b = 0; b < batches; b++)); do
    rows "$b" > "$work/b$b.tsv"
    # unnest: build the ten text arrays from the same rows (array literals, quoted)
    python3 - "$work/b$b.tsv" >> "$work/unnest.sql" <<PY
import sys
cols = [[] for _ in range(10)]
for line in open(sys.argv[1]):
    for i, v in enumerate(line.rstrip("\n").split("\t")):
        cols[i].append('"' + v.replace("\\\\", "\\\\\\\\").replace('"', '\\\\"') + '"')
arrays = ", ".join("'{" + ",".join(c).replace("'", "''") + "}'::text[]" for c in cols)
print("begin;")
print("insert into p_unnest ($cols) select $casts from unnest(" + arrays + ") as u($cols) on conflict (id) do update set $set_list;")
print("commit;")
PY
    {
        echo "begin;"
        echo "\\copy stage ($cols) from '$work/b$b.tsv'"
        echo "insert into p_copy ($cols) select $cols from stage on conflict (id) do update set $set_list;"
        echo "commit;"
    } >> "$work/copy.sql"
done

time_it() { # file
    local t0 t1
    t0=$(date +%s.%N)
    psql "$dburl" -q -v ON_ERROR_STOP=1 -f "$1" >/dev/null
    t1=$(date +%s.%N)
    echo "$t1 - $t0" | bc -l
}
# Warm up, then measure each twice, alternating.
time_it "$work/unnest.sql" >/dev/null
psql "$dburl" -qc "truncate p_unnest"
u1=$(time_it "$work/unnest.sql"); psql "$dburl" -qc "truncate p_unnest"
c1=$(time_it "$work/copy.sql"); psql "$dburl" -qc "truncate p_copy"
c2=$(time_it "$work/copy.sql"); psql "$dburl" -qc "truncate p_copy"
u2=$(time_it "$work/unnest.sql")
same=$(psql "$dburl" -tAc "select (select count(*) from p_unnest)")
rows_total=$((batch * batches))
printf 'apply_strategies: %d batches of %d upserts (%d rows, half updates)\n' "$batches" "$batch" "$rows_total"
best() { echo "if ($1 < $2) $1 else $2" | bc -l; }
ub=$(best "$u1" "$u2")
cb=$(best "$c1" "$c2")
printf '  unnest + on conflict:        %6.2f s  %6.2f s   best %8.0f rows/s\n' "$u1" "$u2" "$(echo "$rows_total / $ub" | bc -l)"
printf '  copy to temp + on conflict:  %6.2f s  %6.2f s   best %8.0f rows/s\n' "$c1" "$c2" "$(echo "$rows_total / $cb" | bc -l)"
printf '  ratio copy/unnest (time): %.2f  (>1 means unnest is faster)\n' "$(echo "$cb / $ub" | bc -l)"
echo "  (rows in p_unnest after the last run: $same)"
