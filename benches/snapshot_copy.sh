#!/usr/bin/env bash
# snapshot_copy.sh: how fast pgferry's initial snapshot brings an existing table from
# the EHR to the hospital database (EHR -> Kafka (Avro) -> hospital), next to
# PostgreSQL's own initial table sync (CREATE SUBSCRIPTION ... WITH (copy_data = true),
# timed until the table's srsubstate is 'r') and `pg_dump --data-only | psql`, on the
# same table between the same clusters, in the same run.
#
# On the server of ${PGFERRY_SOURCE_URL}, the target server of ${PGFERRY_TARGET_URL}
# and the broker(s) of ${PGFERRY_BROKERS}:
#   1. (re)creates the scratch database pgferry_bench_snap with the 10-column
#      public.patients table of lib.sh holding ROWS rows (default 1,000,000);
#   2. native sync: an empty copy of the table in target database
#      pgferry_bench_snap_native and a subscription with copy_data = true; the time
#      runs from CREATE SUBSCRIPTION to srsubstate = 'r' (ready);
#   3. pg_dump --data-only of the table piped into psql on target database
#      pgferry_bench_snap_dump (table created empty first);
#   4. pgferry: `pgferry run` (both stages) with a fresh slot into target database
#      pgferry_bench_snap_ferry (empty table created first); the time runs from the
#      start of the process until the target holds ROWS rows, with the time until the
#      source logged "initial snapshot done" (everything durable on Kafka) beside it;
#      peak RSS and CPU from /usr/bin/time -v;
#   5. checks that each target holds ROWS rows with the source's checksum, prints
#      rows/s for each and the ratios pgferry/native and pgferry/dump (>1: pgferry is
#      faster), and drops everything it made on exit.
#
# Knobs: ROWS, PGFERRY_BIN (skip the release build), KEEP_OUTPUT=1,
# SNAPSHOT_WORKERS (default: pgferry's default, the cores), CHUNK_ROWS.
set -euo pipefail
PROG=snapshot_copy.sh
export ROWS=${ROWS:-1000000}
# shellcheck source=benches/lib.sh
source "$(dirname "$0")/lib.sh"
bench_init pgferry-snapshot pgferry_bench_snap

[[ -n ${PGFERRY_BROKERS:-} && -n ${PGFERRY_TARGET_URL:-} ]] ||
    die "PGFERRY_BROKERS or PGFERRY_TARGET_URL is not set; run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""
command -v pg_dump >/dev/null || die "pg_dump is not on PATH"
if [[ $PGFERRY_TARGET_URL =~ ^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$ ]]; then
    readonly TARGET_ADMIN_URL=$PGFERRY_TARGET_URL
    T_BASE="${BASH_REMATCH[1]}"
    T_PARAMS="${BASH_REMATCH[4]}"
else
    die "PGFERRY_TARGET_URL must look like postgres://user@host:port/db, got '$PGFERRY_TARGET_URL'"
fi
turl() { echo "${T_BASE}/$1${T_PARAMS}"; }
psql_t() { psql -X -q -v ON_ERROR_STOP=1 -d "$(turl "$1")" "${@:2}"; }
TARGETS=(pgferry_bench_snap_native pgferry_bench_snap_dump pgferry_bench_snap_ferry)
PREFIX="benchsnap$(date +%s)"
FERRY_PID=

drop_targets() {
    local db sub
    for db in "${TARGETS[@]}"; do
        while read -r sub; do
            [[ -n $sub ]] || continue
            psql -X -q -d "$(turl "$db")" -c "alter subscription ${sub} disable" \
                -c "alter subscription ${sub} set (slot_name = none)" -c "drop subscription ${sub}" 2>/dev/null || true
        done < <(psql -X -At -d "$(turl "$db")" -c "select subname from pg_subscription" 2>/dev/null || true)
        psql -X -q -d "$TARGET_ADMIN_URL" -c "set client_min_messages = warning" \
            -c "drop database if exists ${db} with (force)" || true
    done
}
bench_cleanup_hook() {
    [[ -n $FERRY_PID ]] && kill -TERM "$FERRY_PID" 2>/dev/null && sleep 2
    drop_targets
}

build_pgferry
log "creating ${BENCH_DB} with ${ROWS} patients"
drop_bench
psql_admin -c "create database ${BENCH_DB}"
patients_ddl | psql_bench
insert_patients_sql | psql_bench -v rows="$ROWS"
psql_bench -c "analyze public.patients" -c "create publication bench for table public.patients"
SUM_SQL="select count(*) || ':' || sum(hashtext(p::text)::bigint) from public.patients p"
EXPECTED=$(psql_bench -At -c "$SUM_SQL")
drop_targets
for db in "${TARGETS[@]}"; do
    psql -X -q -v ON_ERROR_STOP=1 -d "$TARGET_ADMIN_URL" -c "create database ${db}"
    patients_ddl | psql_t "$db"
done
check_target() { # check_target <db> <what>
    local got
    got=$(psql_t "$1" -At -c "$SUM_SQL")
    [[ $got == "$EXPECTED" ]] || die "$2: ${1}.public.patients holds (count:checksum) ${got}, expected ${EXPECTED}"
}

# ------------------------------------------------------------------ native sync --
log "native: create subscription with copy_data = true"
t0=$(now)
psql_t pgferry_bench_snap_native -c "create subscription bench_snap_sub connection '${BENCH_URL}' publication bench with (copy_data = true)"
until [[ $(psql_t pgferry_bench_snap_native -At -c "select coalesce(min(srsubstate), '?') from pg_subscription_rel") == r ]]; do
    sleep 0.02
done
t1=$(now)
NATIVE_S=$(elapsed "$t0" "$t1")
check_target pgferry_bench_snap_native native
psql_t pgferry_bench_snap_native -c "alter subscription bench_snap_sub disable" \
    -c "alter subscription bench_snap_sub set (slot_name = none)" -c "drop subscription bench_snap_sub"
psql_admin -At -c "select pg_drop_replication_slot(slot_name) from pg_replication_slots where slot_name = 'bench_snap_sub'" >/dev/null || true

# ------------------------------------------------------------- pg_dump | psql --
log "pg_dump --data-only | psql"
t0=$(now)
pg_dump --data-only -t public.patients -d "$BENCH_URL" | psql -X -q -v ON_ERROR_STOP=1 -d "$(turl pgferry_bench_snap_dump)" >/dev/null
t1=$(now)
DUMP_S=$(elapsed "$t0" "$t1")
check_target pgferry_bench_snap_dump dump

# --------------------------------------------------------------------- pgferry --
CFG=$WORK/snapshot.toml
cat >"$CFG" <<TOML
[source]
url = "${BENCH_URL}"
slot = "bench_snap_pgferry"
publication = "bench"
${SNAPSHOT_WORKERS:+snapshot_workers = ${SNAPSHOT_WORKERS}}
${CHUNK_ROWS:+snapshot_chunk_rows = ${CHUNK_ROWS}}
[kafka]
brokers = "${PGFERRY_BROKERS}"
topic_prefix = "${PREFIX}"
[sink]
url = "$(turl pgferry_bench_snap_ferry)"
consumer = "bench"
[http]
listen = ""
[[tables]]
source = "public.patients"
TOML
log "pgferry run (topic prefix ${PREFIX})"
t0=$(now)
if [[ -n $TIME_V ]]; then
    "$TIME_V" -v -o "$WORK/ferry.time" "$BIN" run --config "$CFG" 2>"$WORK/ferry.log" &
else
    "$BIN" run --config "$CFG" 2>"$WORK/ferry.log" &
fi
LAUNCHER=$!
FERRY_PID=$LAUNCHER
if [[ -n $TIME_V ]]; then
    # SIGTERM must go to pgferry itself: /usr/bin/time would just die of it.
    FERRY_PID=
    for _ in $(seq 200); do
        FERRY_PID=$(pgrep -P "$LAUNCHER" || true)
        [[ -n $FERRY_PID ]] && break
        sleep 0.01
    done
    [[ -n $FERRY_PID ]] || die "cannot find pgferry's process under /usr/bin/time (pid ${LAUNCHER})"
fi
KAFKA_S=
while :; do
    kill -0 "$FERRY_PID" 2>/dev/null || die "pgferry exited early; see ${WORK}/ferry.log"
    if [[ -z $KAFKA_S ]] && grep -q "initial snapshot done" "$WORK/ferry.log"; then
        KAFKA_S=$(elapsed "$t0" "$(now)")
    fi
    n=$(psql_t pgferry_bench_snap_ferry -At -c "select count(*) from public.patients")
    [[ $n == "$ROWS" ]] && break
    sleep 0.05
done
t1=$(now)
FERRY_S=$(elapsed "$t0" "$t1")
kill -TERM "$FERRY_PID"
wait "$LAUNCHER" || die "pgferry did not exit 0 on SIGTERM; see ${WORK}/ferry.log"
FERRY_PID=
check_target pgferry_bench_snap_ferry pgferry

rate() { awk -v r="$ROWS" -v s="$1" 'BEGIN { printf "%.0f", r / s }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b / a }'; }
printf '\n%-34s %10s %12s\n' "initial copy of ${ROWS} rows" seconds rows/s
printf '%-34s %10s %12s\n' "native subscription (copy_data)" "$NATIVE_S" "$(rate "$NATIVE_S")"
printf '%-34s %10s %12s\n' "pg_dump --data-only | psql" "$DUMP_S" "$(rate "$DUMP_S")"
printf '%-34s %10s %12s\n' "pgferry EHR -> Kafka -> hospital" "$FERRY_S" "$(rate "$FERRY_S")"
printf '%-34s %10s %12s\n' "  of which EHR -> Kafka (durable)" "${KAFKA_S:-n/a}" "$([[ -n $KAFKA_S ]] && rate "$KAFKA_S" || echo n/a)"
printf '\npgferry / native speed: %s   pgferry / pg_dump speed: %s\n' "$(ratio "$FERRY_S" "$NATIVE_S")" "$(ratio "$FERRY_S" "$DUMP_S")"
printf 'pgferry peak RSS: %s MB, CPU: %s s\n' "$(peak_rss "$WORK/ferry.time")" "$(cpu_secs "$WORK/ferry.time")"
