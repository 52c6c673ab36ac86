# shellcheck shell=bash
# lib.sh: what the drain benches (drain_tail.sh, drain_kafka.sh, drain_pipeline.sh)
# share. Sourced, not run: the script sets PROG and `set -euo pipefail`, sources this
# file, then
#   bench_init <temp dir name> [database]   knobs, URLs, tools, temp dir, cleanup
#                                trap; the scratch database is pgferry_bench by default
#   build_pgferry                BIN: PGFERRY_BIN or a fresh `cargo build --release`
#   setup_bench [slot...]        database, patients table, publication, all slots
#                                (default bench_recv and bench_pgferry, _N per repeat)
#   run_workload                 the backlog; START_LSN, END_LSN, WAL_MB
#   run_repeats <function>       per repeat: pg_recvlogical and <function> <repeat>
# and reports from the RECV_* arrays and its own. Common knobs: ROWS (default
# 200000), REPEAT (default 1), PGFERRY_BIN, KEEP_OUTPUT=1. See drain_tail.sh for
# what is measured and why the pg_recvlogical anchor is fair.
#
# Everything here touches only the scratch database (pgferry_bench unless bench_init
# was given another name) and its slots on the server of ${PGFERRY_SOURCE_URL}.

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
log() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# bench_init <temp dir name> [database]: validates the knobs and the environment,
# names the scratch database (default pgferry_bench), creates WORK and installs the
# cleanup trap (which also calls bench_cleanup_hook if defined).
bench_init() {
    ROWS=${ROWS:-200000}
    REPEAT=${REPEAT:-1}
    [[ $ROWS =~ ^[1-9][0-9]*$ ]] || die "ROWS must be a positive whole number, got '$ROWS'"
    [[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "REPEAT must be a positive whole number, got '$REPEAT'"
    readonly ROWS REPEAT
    readonly CHANGES=$((2 * ROWS))
    readonly BENCH_DB=${2:-pgferry_bench}

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

    local tool
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

    WORK=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
    readonly WORK
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

psql_admin() { psql -X -q -v ON_ERROR_STOP=1 -d "$ADMIN_URL" "$@"; }
psql_bench() { psql -X -q -v ON_ERROR_STOP=1 -d "$BENCH_URL" "$@"; }

# Drop every slot of the scratch database (ending a session still streaming from
# one), then the database. Only ever touches database ${BENCH_DB}.
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
    if declare -F bench_cleanup_hook >/dev/null; then
        bench_cleanup_hook
    fi
    log "cleaning up: dropping the slots and database ${BENCH_DB}"
    drop_bench
    if [[ ${KEEP_OUTPUT:-0} == 1 || $rc != 0 ]]; then
        log "kept ${WORK} (pgferry output and logs)"
    else
        rm -rf "$WORK"
    fi
    exit "$rc"
}

# ------------------------------------------------------------------------ build --
build_pgferry() {
    if [[ -n ${PGFERRY_BIN:-} ]]; then
        BIN=$PGFERRY_BIN
        [[ -x $BIN ]] || die "PGFERRY_BIN=$BIN is not an executable"
    else
        log "cargo build --release (incremental)"
        (cd "$REPO" && cargo build --release --bin pgferry) || die "cargo build --release failed"
        BIN=$REPO/target/release/pgferry
    fi
    readonly BIN
}

# ------------------------------------------------------------------------ setup --
slot_suffix() { (($1 == 1)) && echo "" || echo "_$1"; }

# The DDL of the bench table, for psql (drain_pipeline.sh creates it in targets too).
patients_ddl() {
    cat <<'SQL'
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
SQL
}

# The anchor's slot (run_recv), <RECV_SLOT>[_N]. Slot names are cluster-wide: a
# script that may run next to another bench sets its own after sourcing this file.
RECV_SLOT=bench_recv

# setup_bench [slot...]: the database, table and publication, then per repeat one
# pgoutput slot <slot>[_N] for each name (default: ${RECV_SLOT} bench_pgferry).
# shellcheck disable=SC2120 # the arguments are optional
setup_bench() {
    local r sfx slot slots=("$RECV_SLOT" bench_pgferry)
    (($# == 0)) || slots=("$@")
    log "creating database ${BENCH_DB}, table, publication and $((${#slots[@]} * REPEAT)) slots"
    drop_bench
    psql_admin -c "create database ${BENCH_DB}"
    patients_ddl | psql_bench
    psql_bench -c "create publication bench for table public.patients"
    for ((r = 1; r <= REPEAT; r++)); do
        sfx=$(slot_suffix "$r")
        for slot in "${slots[@]}"; do
            psql_bench -At -c "select pg_create_logical_replication_slot('${slot}${sfx}', 'pgoutput')" >/dev/null
        done
    done
}

# --------------------------------------------------------------------- workload --
# The INSERT of :rows patients (psql variable `rows`), for psql's stdin.
insert_patients_sql() {
    cat <<'SQL'
insert into public.patients
select g,
       f.first || ' ' || l.last,
       date '1930-01-01' + (g * 37 % 32000),
       case when g % 2 = 0 then 'F' else 'M' end,
       '+44 7' || lpad((g::bigint * 7919 % 1000000000)::text, 9, '0'),
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
SQL
}

run_workload() {
    log "workload: insert ${ROWS} rows in one statement, then update all of them"
    START_LSN=$(psql_bench -At -c "select pg_current_wal_lsn()")
    { insert_patients_sql; echo 'update public.patients set weight = weight + 1, updated_at = now();'; } |
        psql_bench -v rows="$ROWS"
    END_LSN=$(psql_bench -At -c "select pg_current_wal_lsn()")
    readonly START_LSN END_LSN
    WAL_MB=$(psql_bench -At -c "select round(pg_wal_lsn_diff('${END_LSN}', '${START_LSN}') / 1e6, 1)")
    readonly WAL_MB
    log "backlog: ${START_LSN} .. ${END_LSN} (${WAL_MB} MB of WAL)"
}

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
# "<busy> <idle>" jiffies of all CPUs since boot (/proc/stat), for host_busy.
cpu_jiffies() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9, $5 + $6; exit }' /proc/stat 2>/dev/null || echo "0 0"; }
# host_busy <cpu_jiffies before> <cpu_jiffies after>: % of all CPUs busy in between,
# whoever used them (PostgreSQL, a broker, pgferry, anything else on the host).
host_busy() {
    awk -v a="$1" -v b="$2" 'BEGIN { split(a, x, " "); split(b, y, " "); busy = y[1] - x[1]; idle = y[2] - x[2]
        if (busy + idle > 0) printf "%.0f%%", 100 * busy / (busy + idle); else print "n/a" }'
}
# Voluntary and involuntary context switches from a `/usr/bin/time -v` report.
ctx_switches() {
    [[ -n $TIME_V && -s $1 ]] || { echo n/a; return; }
    awk -F: '/Voluntary context switches/ { v = $2 + 0 } /Involuntary context switches/ { i = $2 + 0 }
        END { printf "%d/%d", v, i }' "$1"
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

declare -a RECV_SECS=() RECV_RSS=() RECV_CPU=()

run_recv() { # run_recv <repeat>
    local r=$1 sfx t0 t1
    sfx=$(slot_suffix "$r")
    log "run ${r}: pg_recvlogical --slot ${RECV_SLOT}${sfx} -E ${END_LSN}"
    t0=$(now)
    timed "$WORK/recv${sfx}.time" pg_recvlogical -d "$BENCH_URL" --slot "${RECV_SLOT}${sfx}" --start \
        -E "$END_LSN" -o proto_version=1 -o publication_names=bench -f /dev/null \
        || die "pg_recvlogical failed (exit $?)"
    t1=$(now)
    RECV_SECS+=("$(elapsed "$t0" "$t1")")
    RECV_RSS+=("$(peak_rss "$WORK/recv${sfx}.time")")
    RECV_CPU+=("$(cpu_secs "$WORK/recv${sfx}.time")")
}

# run_repeats <function>: REPEAT rounds of pg_recvlogical and `<function> <repeat>`,
# alternating which side reads first so neither always gets the warmer caches.
run_repeats() {
    local r
    LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)
    for ((r = 1; r <= REPEAT; r++)); do
        if ((r % 2 == 1)); then
            run_recv "$r"
            "$1" "$r"
        else
            "$1" "$r"
            run_recv "$r"
        fi
    done
}

# ----------------------------------------------------------------------- report --
rate() { awk -v n="$CHANGES" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }
best() { printf '%s\n' "$@" | sort -g | head -n 1; }
# ratio <pgferry seconds> <pg_recvlogical seconds>: of changes/s, >1 pgferry faster.
ratio() { awk -v f="$1" -v r="$2" 'BEGIN { printf "%.2f", r / f }'; }

# report_head <bench name> <what pgferry does>
report_head() {
    local pad
    pad=$(printf '%*s' $((${#1} + 2)) '')
    echo
    echo "$1: ${ROWS} rows, ${CHANGES} changes (insert + update, 2 transactions), ${WAL_MB} MB of WAL"
    echo "${pad}backlog ${START_LSN} .. ${END_LSN} on ${BENCH_URL}"
    if [[ -n ${2:-} ]]; then
        echo "${pad}$2"
    fi
    echo "${pad}host: $(nproc) CPUs, load average before the runs: ${LOAD_BEFORE}"
}

# A python with confluent-kafka (optional): the Kafka drains use it to count the
# messages on their topics and to delete the topics afterwards.
PYTHON=${KAFKA_PYTHON:-/tmp/kvenv/bin/python}
if ! [[ -x $PYTHON ]] || ! "$PYTHON" -c 'import confluent_kafka' 2>/dev/null; then
    PYTHON=
fi
readonly PYTHON

# kafka_py <count|delete> <topic...>: prints "<messages> <distinct keys> <latest
# message timestamp, Unix seconds>" of each topic, read from the start until 2 s
# pass without a message, or deletes the topics.
kafka_py() {
    "$PYTHON" - "$PGFERRY_BROKERS" "$@" <<'PY'
import sys
import time
from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

brokers, action, topics = sys.argv[1], sys.argv[2], sys.argv[3:]
if action == "delete":
    admin = AdminClient({"bootstrap.servers": brokers})
    for topic, f in admin.delete_topics(topics, operation_timeout=10).items():
        try:
            f.result()
        except Exception as e:  # a topic never created, or a broker without delete
            print(f"{topic}: not deleted: {e}", file=sys.stderr)
    sys.exit(0)
consumer = Consumer({"bootstrap.servers": brokers, "group.id": "pgferry-bench-count",
                     "enable.auto.commit": False})
for topic in topics:
    meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None:
        print(f"{topic}: no such topic ({meta.error if meta else 'missing'})", file=sys.stderr)
        sys.exit(1)
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    count, keys, latest, idle_since = 0, set(), 0, time.monotonic()
    while time.monotonic() - idle_since < 2:
        batch = consumer.consume(num_messages=10000, timeout=0.5)
        for m in batch:
            if m.error() is not None:
                print(f"{topic}: {m.error()}", file=sys.stderr)
                sys.exit(1)
            keys.add(m.key())
            latest = max(latest, m.timestamp()[1])
        if batch:
            count += len(batch)
            idle_since = time.monotonic()
    print(count, len(keys), f"{latest / 1000:.3f}")
consumer.close()
PY
}
