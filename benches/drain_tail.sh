#!/usr/bin/env bash
# drain_tail.sh: how fast `pgferry tail` drains a replication backlog, measured next
# to pg_recvlogical draining the very same backlog in the same run.
#
# What it does, on the server of ${PGFERRY_SOURCE_URL} (the local "ehr" cluster):
#   1. (re)creates a scratch database pgferry_bench with a 10-column public.patients
#      table, a publication `bench` for it, and two pgoutput logical slots,
#      bench_recv and bench_pgferry, BEFORE any data is written;
#   2. writes the backlog: ROWS rows inserted in one statement, then one UPDATE of
#      every row (2*ROWS changes in two transactions), and records the end LSN;
#   3. drains slot bench_recv with `pg_recvlogical --start -E <end lsn>` (the
#      anchor) and slot bench_pgferry with `pgferry tail --end-lsn <end lsn>`,
#      timing each with wall-clock time; pgferry's output must have 2*ROWS lines;
#   4. prints rows, changes, seconds, changes/s, client CPU time and peak RSS (via
#      /usr/bin/time -v, if installed), when pgferry wrote its last line, and the
#      ratio pgferry/pg_recvlogical of changes/s (>1: pgferry is faster);
#   5. drops the slots and the database on exit, whatever happened.
#
# Run it (services up and their environment loaded):
#   scripts/services.sh up && eval "$(scripts/services.sh env)"
#   benches/drain_tail.sh                       # ROWS=200000, REPEAT=1
#   ROWS=50000 REPEAT=3 benches/drain_tail.sh
# Knobs: ROWS (default 200000), REPEAT (default 1; each repeat gets its own pair of
# slots, all created before the workload, and alternates which side goes first),
# PGFERRY_BIN (use this binary and skip `cargo build --release`),
# KEEP_OUTPUT=1 (keep the temp dir with pgferry's JSON output and logs).
#
# Why the anchor is fair: both sides read the same server, through the same kind of
# slot (logical, pgoutput, proto_version 1, publication bench), created at the same
# moment, so the walsender decodes exactly the same backlog of WAL for both. The
# server-side work (WAL reading, logical decoding, reorder-buffer spill of the big
# transactions, pgoutput encoding) is identical; what differs is the client.
# pg_recvlogical only copies the raw pgoutput bytes to /dev/null, while pgferry
# decodes every message, looks up the relation in the catalog, converts each row to
# its event model and writes one JSON line per change to a file. So the ratio is
# "how close pgferry's client side gets to a client that does nothing". Both times
# include process start, connecting and stopping; pgferry notices that it reached
# --end-lsn on a status tick (about once a second), so short runs are biased
# against it by up to ~1 s.
set -euo pipefail

readonly PROG="${0##*/}"
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

ROWS=${ROWS:-200000}
REPEAT=${REPEAT:-1}
[[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive whole number, got '$ROWS'"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive whole number, got '$REPEAT'"
readonly ROWS REPEAT
readonly CHANGES=$((2 * ROWS))
readonly BENCH_DB=pgferry_bench

[[ -n ${PGFERRY_SOURCE_URL:-} ]] ||
    die "PGFERRY_SOURCE_URL is not set; run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""

# The bench database's URL: PGFERRY_SOURCE_URL with its database name replaced, so
# user, password, host, port and parameters all come from it.
if [[ $PGFERRY_SOURCE_URL =~ ^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$ ]]; then
    readonly ADMIN_URL=$PGFERRY_SOURCE_URL
    readonly BENCH_URL="${BASH_REMATCH[1]}/${BENCH_DB}${BASH_REMATCH[4]}"
else
    die "PGFERRY_SOURCE_URL must look like postgres://user@host:port/db, got '$PGFERRY_SOURCE_URL'"
fi

for tool in psql pg_recvlogical; do
    command -v "$tool" >/dev/null || die "$tool is not on PATH (it is in /usr/lib/postgresql/<version>/bin)"
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
readonly REPO
export LC_ALL=C # awk and printf with a '.' decimal point

TIME_V=
if [[ -x /usr/bin/time ]] && /usr/bin/time -v true >/dev/null 2>&1; then
    TIME_V=/usr/bin/time
fi
readonly TIME_V

WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgferry-drain-tail.XXXXXX")
readonly WORK

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" "$@"; }
psql_bench() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_URL" "$@"; }

# Drop every slot of the scratch database (ending a session still streaming from
# one), then the database. Only ever touches database pgferry_bench.
drop_bench() {
    psql_admin -At >/dev/null <<SQL || true
select pg_terminate_backend(active_pid) from pg_replication_slots
 where database = '${BENCH_DB}' and active_pid is not null;
SQL
    local slot
    for _ in 1 2 3 4 5; do
        local left=0
        while read -r slot; do
            [[ -n $slot ]] || continue
            left=1
            psql_admin -At -c "select pg_drop_replication_slot('${slot}')" >/dev/null 2>&1 || true
        done < <(psql_admin -At -c "select slot_name from pg_replication_slots where database = '${BENCH_DB}'")
        [[ $left == 0 ]] && break
        sleep 0.5
    done
    psql_admin -c "set client_min_messages = warning" -c "drop database if exists ${BENCH_DB} with (force)"
}

cleanup() {
    local rc=$?
    set +e
    log "cleaning up: dropping the slots and database ${BENCH_DB}"
    drop_bench
    if [[ ${KEEP_OUTPUT:-0} == 1 || $rc != 0 ]]; then
        log "kept ${WORK} (pgferry output and logs)"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ------------------------------------------------------------------------ build --
if [[ -n ${PGFERRY_BIN:-} ]]; then
    BIN=$PGFERRY_BIN
    [[ -x $BIN ]] || die "PGFERRY_BIN=$BIN is not an executable"
else
    log "cargo build --release (incremental)"
    (cd "$REPO" && cargo build --release --bin pgferry) || die "cargo build --release failed"
    BIN=$REPO/target/release/pgferry
fi
readonly BIN

# ------------------------------------------------------------------------ setup --
slot_suffix() { (($1 == 1)) && echo "" || echo "_$1"; }

log "creating database ${BENCH_DB}, table, publication and $((2 * REPEAT)) slots"
drop_bench
psql_admin -c "create database ${BENCH_DB}"
psql_bench <<'SQL'
create table public.patients (
    id             bigint primary key,
    name           text,
    dob            date,
    gender         char(1),
    contact_number text,
    email          text,
    address        text,
    notes          text,
    weight         numeric(6,2),
    updated_at     timestamptz
);
create publication bench for table public.patients;
SQL
for ((r = 1; r <= REPEAT; r++)); do
    sfx=$(slot_suffix "$r")
    psql_bench -At >/dev/null <<SQL
select pg_create_logical_replication_slot('bench_recv${sfx}', 'pgoutput');
select pg_create_logical_replication_slot('bench_pgferry${sfx}', 'pgoutput');
SQL
done

# --------------------------------------------------------------------- workload --
log "workload: insert ${ROWS} rows in one statement, then update all of them"
START_LSN=$(psql_bench -At -c "select pg_current_wal_lsn()")
psql_bench -v rows="$ROWS" <<'SQL'
insert into public.patients
select g,
       f.first || ' ' || l.last,
       date '1930-01-01' + (g * 37 % 32000),
       case when g % 2 = 0 then 'F' else 'M' end,
       '+44 7' || lpad((g * 7919 % 1000000000)::text, 9, '0'),
       lower(f.first) || '.' || lower(l.last) || g || '@example.org',
       (g % 240 + 1) || ' ' || s.street || ', ' || s.town || ' ' || upper(substr(md5(g::text), 1, 3)) || ' '
           || (g % 9 + 1) || upper(substr(md5(g::text), 4, 2)) || ', United Kingdom',
       n.note || ' Ref ' || g || '.',
       round((45 + (g % 700) / 10.0)::numeric, 2),
       now() - (g % 100000) * interval '1 minute'
  from generate_series(1, :rows) as g
  cross join lateral (select (array['Margaret','James','Aisha','Oliver','Priya','Thomas','Chloe',
                                    'Mohammed','Eleanor','Daniel'])[1 + g % 10] as first) f
  cross join lateral (select (array['Smith','O''Connell','Patel','Jones','Nowak','Williams',
                                    'Okafor','Brown','Taylor','Whitfield'])[1 + (g / 10) % 10] as last) l
  cross join lateral (select (array['Harbour View Road','Mill Lane','Station Road','Church Street',
                                    'Victoria Avenue'])[1 + g % 5] as street,
                             (array['Portsmouth','Leeds','Bristol','Norwich','Exeter',
                                    'York'])[1 + (g / 5) % 6] as town) s
  cross join lateral (select (array[
      'Follow-up after laparoscopic cholecystectomy; wound healing well, no signs of infection. '
          || 'Mild post-operative nausea resolved. Continue paracetamol 1g QDS PRN; review bloods in 2 weeks.',
      'Type 2 diabetes annual review: HbA1c 54 mmol/mol, BP 138/84, feet checked and intact. '
          || 'Discussed diet and exercise; metformin continued. Retinal screening booked for next month.',
      'Presented with productive cough for 10 days, afebrile, chest clear on auscultation. '
          || 'Likely viral; safety-netting advice given. Return if breathless or symptoms beyond 3 weeks.'
  ])[1 + g % 3] as note) n;
update public.patients set weight = weight + 1, updated_at = now();
SQL
END_LSN=$(psql_bench -At -c "select pg_current_wal_lsn()")
readonly START_LSN END_LSN
WAL_MB=$(psql_bench -At -c "select round(pg_wal_lsn_diff('${END_LSN}', '${START_LSN}') / 1e6, 1)")
log "backlog: ${START_LSN} .. ${END_LSN} (${WAL_MB} MB of WAL)"

# -------------------------------------------------------------------- measuring --
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
# CPU seconds (user + system) from a `/usr/bin/time -v` report, or "n/a".
cpu_secs() {
    [[ -n $TIME_V && -s $1 ]] || { echo n/a; return; }
    awk -F: '/User time|System time/ { t += $2; n++ } END { if (n == 2) printf "%.2f", t; else print "n/a" }' "$1"
}
# Peak RSS in MB from a `/usr/bin/time -v` report, or "n/a".
peak_rss() {
    [[ -n $TIME_V && -s $1 ]] || { echo n/a; return; }
    awk -F: '/Maximum resident set size/ { printf "%.1f", $2 / 1024; found = 1 } END { if (!found) print "n/a" }' "$1"
}
timed() { # timed <time -v report file> <command...>
    local report=$1
    shift
    if [[ -n $TIME_V ]]; then
        "$TIME_V" -v -o "$report" "$@"
    else
        "$@"
    fi
}

declare -a RECV_SECS=() RECV_RSS=() RECV_CPU=() FERRY_SECS=() FERRY_RSS=() FERRY_CPU=() FERRY_LAST=()

run_recv() { # run_recv <repeat>
    local r=$1 sfx t0 t1
    sfx=$(slot_suffix "$r")
    log "run ${r}: pg_recvlogical --slot bench_recv${sfx} -E ${END_LSN}"
    t0=$(now)
    timed "$WORK/recv${sfx}.time" pg_recvlogical -d "$BENCH_URL" --slot "bench_recv${sfx}" --start \
        -E "$END_LSN" -o proto_version=1 -o publication_names=bench -f /dev/null \
        || die "pg_recvlogical failed (exit $?)"
    t1=$(now)
    RECV_SECS+=("$(elapsed "$t0" "$t1")")
    RECV_RSS+=("$(peak_rss "$WORK/recv${sfx}.time")")
    RECV_CPU+=("$(cpu_secs "$WORK/recv${sfx}.time")")
}

run_pgferry() { # run_pgferry <repeat>
    local r=$1 sfx t0 t1 rc=0 lines config out
    sfx=$(slot_suffix "$r")
    config=$WORK/pgferry${sfx}.toml
    out=$WORK/pgferry${sfx}.jsonl
    cat >"$config" <<TOML
[source]
url = "${BENCH_URL}"
slot = "bench_pgferry${sfx}"
publication = "bench"
heartbeat_interval = "10s"
[http]
listen = ""
[[tables]]
source = "public.patients"
TOML
    log "run ${r}: pgferry tail --config ${config} --end-lsn ${END_LSN}"
    t0=$(now)
    timed "$WORK/pgferry${sfx}.time" "$BIN" tail --config "$config" --end-lsn "$END_LSN" \
        >"$out" 2>"$WORK/pgferry${sfx}.log" || rc=$?
    t1=$(now)
    if ((rc != 0)); then
        log "pgferry tail exited with status ${rc}; its stderr:"
        cat "$WORK/pgferry${sfx}.log" >&2
        die "pgferry tail failed (exit ${rc}); output so far: $(wc -l <"$out") lines in ${out}"
    fi
    lines=$(wc -l <"$out")
    if ((lines != CHANGES)); then
        die "pgferry tail printed ${lines} lines, expected ${CHANGES} (2 x ${ROWS} rows); see ${out} and ${WORK}/pgferry${sfx}.log"
    fi
    FERRY_SECS+=("$(elapsed "$t0" "$t1")")
    FERRY_RSS+=("$(peak_rss "$WORK/pgferry${sfx}.time")")
    FERRY_CPU+=("$(cpu_secs "$WORK/pgferry${sfx}.time")")
    # When the last line was written (the file's mtime): pgferry notices that it
    # reached --end-lsn only on its ~1 s status tick, so its wall time is rounded up.
    FERRY_LAST+=("$(elapsed "$t0" "$(stat -c %.9Y "$out")")")
    FERRY_OUT_MB=$(awk -v b="$(stat -c %s "$out")" 'BEGIN { printf "%.1f", b / 1e6 }')
    FERRY_SAMPLE=$(head -n 1 "$out" | cut -c 1-300)
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)
for ((r = 1; r <= REPEAT; r++)); do
    # Alternate which side reads first, so neither always gets the warmer caches.
    if ((r % 2 == 1)); then
        run_recv "$r"
        run_pgferry "$r"
    else
        run_pgferry "$r"
        run_recv "$r"
    fi
done

# ----------------------------------------------------------------------- report --
rate() { awk -v n="$CHANGES" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }
best() { printf '%s\n' "$@" | sort -g | head -n 1; }

echo
echo "drain_tail: ${ROWS} rows, ${CHANGES} changes (insert + update, 2 transactions), ${WAL_MB} MB of WAL"
echo "            backlog ${START_LSN} .. ${END_LSN} on ${BENCH_URL}"
echo "            host: $(nproc) CPUs, load average before the runs: ${LOAD_BEFORE}"
printf '%-4s %-15s %9s %12s %8s %14s %14s\n' run side seconds changes/s "CPU s" "peak RSS (MB)" "last line at s"
for ((i = 0; i < REPEAT; i++)); do
    printf '%-4s %-15s %9s %12s %8s %14s %14s\n' "$((i + 1))" pg_recvlogical "${RECV_SECS[i]}" \
        "$(rate "${RECV_SECS[i]}")" "${RECV_CPU[i]}" "${RECV_RSS[i]}" -
    printf '%-4s %-15s %9s %12s %8s %14s %14s\n' "$((i + 1))" "pgferry tail" "${FERRY_SECS[i]}" \
        "$(rate "${FERRY_SECS[i]}")" "${FERRY_CPU[i]}" "${FERRY_RSS[i]}" "${FERRY_LAST[i]}"
done
echo "(CPU s: user + system of the client process only; the walsender's work is the same for both)"
RECV_BEST=$(best "${RECV_SECS[@]}")
FERRY_BEST=$(best "${FERRY_SECS[@]}")
RATIO=$(awk -v f="$FERRY_BEST" -v r="$RECV_BEST" 'BEGIN { printf "%.2f", r / f }')
((REPEAT > 1)) && echo "best of ${REPEAT}: pg_recvlogical ${RECV_BEST} s, pgferry ${FERRY_BEST} s"
echo "ratio pgferry/pg_recvlogical (changes/s): ${RATIO}  (>1 means pgferry is faster)"
LAST_BEST=$(best "${FERRY_LAST[@]}")
echo "ratio to pgferry's last line instead of its exit: $(awk -v f="$LAST_BEST" -v r="$RECV_BEST" 'BEGIN { printf "%.2f", r / f }')"
echo "pgferry wrote ${FERRY_OUT_MB} MB of JSON; first line: ${FERRY_SAMPLE}"
[[ -n $TIME_V ]] || echo "peak RSS: skipped, /usr/bin/time is not installed (apt-get install time)"
