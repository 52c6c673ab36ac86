#!/usr/bin/env bash
# drain_pipeline.sh: how fast `pgferry run` (source and sink stages) drains a
# replication backlog end to end, EHR -> Kafka (Avro) -> hospital, measured next to
# PostgreSQL's own logical replication (a publication and a subscription between the
# same two clusters) draining the very same backlog in the same run.
#
# What it does, on the servers of ${PGFERRY_SOURCE_URL} (the "ehr" cluster),
# ${PGFERRY_TARGET_URL} (the "hospital" cluster) and the broker(s) of
# ${PGFERRY_BROKERS}:
#   1. (re)creates the scratch database pgferry_bench_pipe on the source with the
#      10-column public.patients table, publication `bench` and two pgoutput slots,
#      bench_pgferry and bench_sub, BEFORE any data is written (lib.sh);
#   2. writes the backlog: ROWS rows inserted in one statement, then one UPDATE of
#      every row (2*ROWS changes in two transactions); records the end LSN and the
#      expected target state (count(*) and sum(weight) of the source table), then
#      VACUUMs the source table so that no autovacuum of it lands in either run;
#   3. the anchor: creates the scratch database pgferry_bench_t2 on the target with
#      the same table, and in it `create subscription bench_sub ... publication
#      bench with (create_slot = false, slot_name = 'bench_sub', copy_data =
#      false)`. Its time runs from that statement until the source's slot bench_sub
#      has confirmed_flush_lsn >= the end LSN (polled every 50 ms by a loop inside
#      the source server): the apply worker confirms a position only once it applied
#      and flushed everything up to it. Then the target table must hold the expected
#      state; the subscription is disabled, detached from its slot and dropped, the
#      slot and the database too;
#   4. pgferry: creates pgferry_bench_t1 on the target with the same table, writes a
#      config ([source] slot bench_pgferry, [kafka] topic prefix pipe<epoch>[_N],
#      [sink] consumer "bench" into pgferry_bench_t1, [http] off) and starts
#      `pgferry run --config FILE`. Its time runs from the start until the target
#      table holds the expected count(*) and sum(weight) (see "the poll" below).
#      Then it gets SIGTERM and must exit 0, and `pgferry verify --config FILE`
#      (row counts and checksums of both sides) must exit 0;
#   5. prints rows, changes, seconds, changes/s, CPU seconds split by process
#      (pgferry itself, the walsender decoding the slot on the source, the target
#      backends applying the rows), pgferry's peak RSS (via /usr/bin/time -v, if
#      installed), how busy the host was, when pgferry's source stage was done, and
#      the ratio pgferry/subscription of changes/s (>1: pgferry is faster);
#   6. on exit, whatever happened: stops pgferry, drops the subscription, the target
#      databases, the slots and the source database, and deletes the bench topics
#      if python can (the broker may keep them in memory).
#
# Run it (services up and their environment loaded):
#   scripts/services.sh up && eval "$(scripts/services.sh env)"
#   benches/drain_pipeline.sh                   # ROWS=200000, REPEAT=1
#   ROWS=50000 REPEAT=3 benches/drain_pipeline.sh
# Knobs: ROWS (default 200000), REPEAT (default 1; each repeat gets its own pair of
# slots, all created before the workload, its own topic prefix and fresh target
# databases, and alternates which side goes first), PGFERRY_BIN (use this binary
# and skip `cargo build --release`), KEEP_OUTPUT=1 (keep the temp dir with configs
# and logs), KEEP_TOPICS=1 (do not delete the bench topics), DRAIN_TIMEOUT (seconds
# per side, default 900), KAFKA_PYTHON (a python with confluent-kafka, default
# /tmp/kvenv/bin/python; optional: it counts the messages and dates the last one).
#
# Why the anchor is fair: both sides start from the same kind of slot (logical,
# pgoutput, publication bench), created at the same moment, so the source's
# walsender decodes exactly the same backlog of WAL for both, and both write the
# same rows, one after the other, into an identical empty table in a fresh database
# of the same target cluster (which also runs wal_level = logical, so both pay the
# same WAL on the target). Both times include starting up and connecting, and end
# when the whole backlog is durable in the target.
# Where it is not: the two do different work in between. The subscription is one
# apply worker inside the target server that reads the pgoutput stream and applies
# it row by row through the executor, each source transaction as one target
# transaction (here two big ones, committed with the subscription default
# synchronous_commit = off), with no hop in between. pgferry decodes pgoutput,
# encodes Avro and produces every change to Kafka (acks=all), reads it back from
# the broker, decodes it and applies it in batches (up to batch_max_events, default
# 5000, per target transaction: COPY into a staging table, one set-based statement
# and the checkpoint row, committed durably). Its source and sink stages overlap,
# and the broker runs on the same host, sharing its CPUs with both PostgreSQL
# clusters and pgferry. So the ratio is "what the Kafka hop and pgferry's batching
# cost or gain against PostgreSQL's built-in path", not a like-for-like comparison
# of two appliers.
# The subscription's end is its confirmation to the source, which the apply worker
# sends as soon as it is idle and its commits are flushed (the subscriber's WAL
# writer flushes within wal_writer_delay, 200 ms by default).
#
# The poll: a full count(*)/sum(weight) of the target table every 100 ms would cost
# a share of the CPUs that pgferry's sink competes for (30-60 ms per scan of the
# 200000-row table after the update here). So a loop inside the target server reads
# pgferry's checkpoint table every 100 ms (the next Kafka offset it will read,
# written in the same transaction as the rows) and runs the full count/sum only once
# the checkpoint says all 2*ROWS messages are applied, or every 2 s otherwise; only
# the full check ends the timing. The end is therefore seen within ~100 ms.
set -euo pipefail

readonly PROG="${0##*/}"
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ -n ${PGFERRY_BROKERS:-} && -n ${PGFERRY_TARGET_URL:-} ]] ||
    die "PGFERRY_BROKERS or PGFERRY_TARGET_URL is not set; run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}
[[ $DRAIN_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "DRAIN_TIMEOUT must be a positive whole number of seconds"
readonly DRAIN_TIMEOUT
command -v pgrep >/dev/null || die "pgrep is not on PATH (apt-get install procps)"

bench_init pgferry-drain-pipeline pgferry_bench_pipe
TOPIC_STAMP=$(date +%s)
readonly TOPIC_STAMP
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
readonly CLK_TCK

# The target databases' URLs: PGFERRY_TARGET_URL with its database name replaced.
readonly T1_DB=pgferry_bench_t1 T2_DB=pgferry_bench_t2
if [[ $PGFERRY_TARGET_URL =~ ^(postgres(ql)?://[^/?]*)(/[^?]*)?(\?.*)?$ ]]; then
    readonly TARGET_ADMIN_URL=$PGFERRY_TARGET_URL
    readonly T1_URL="${BASH_REMATCH[1]}/${T1_DB}${BASH_REMATCH[4]}"
    readonly T2_URL="${BASH_REMATCH[1]}/${T2_DB}${BASH_REMATCH[4]}"
else
    die "PGFERRY_TARGET_URL must look like postgres://user@host:port/db, got '$PGFERRY_TARGET_URL'"
fi
psql_target() { psql -X -q -v ON_ERROR_STOP=1 -d "$TARGET_ADMIN_URL" "$@"; }
psql_t1() { psql -X -q -v ON_ERROR_STOP=1 -d "$T1_URL" "$@"; }
psql_t2() { psql -X -q -v ON_ERROR_STOP=1 -d "$T2_URL" "$@"; }
target_url() { [[ $1 == "$T1_DB" ]] && echo "$T1_URL" || echo "$T2_URL"; }

topic_prefix() { echo "pipe${TOPIC_STAMP}$(slot_suffix "$1")"; }

# drop_target <database>: detaches and drops its subscriptions (DROP DATABASE refuses
# a database with one), then drops it. Only ever touches pgferry_bench_t1/_t2.
drop_target() {
    local db=$1 url sub
    url=$(target_url "$db")
    if [[ -n $(psql_target -At -c "select 1 from pg_database where datname = '${db}'") ]]; then
        while read -r sub; do
            [[ -n $sub ]] || continue
            psql -X -q -d "$url" -c "alter subscription ${sub} disable" \
                -c "alter subscription ${sub} set (slot_name = none)" -c "drop subscription ${sub}" || true
        done < <(psql -X -At -d "$url" -c "select subname from pg_subscription s join pg_database d
            on d.oid = s.subdbid where d.datname = current_database()" 2>/dev/null)
    fi
    psql_target -c "set client_min_messages = warning" -c "drop database if exists ${db} with (force)"
}

# create_target <database>: a fresh database with the bench table, nothing else.
create_target() {
    drop_target "$1"
    psql_target -c "create database $1"
    patients_ddl | psql -X -q -v ON_ERROR_STOP=1 -d "$(target_url "$1")"
}

# drop_slot <slot>: on the source, retrying while its walsender is still exiting.
drop_slot() {
    for _ in $(seq 40); do
        [[ -n $(psql_bench -At -c "select 1 from pg_replication_slots where slot_name = '$1'") ]] || return 0
        psql_bench -At -c "select pg_drop_replication_slot('$1')" >/dev/null 2>&1 && return 0
        sleep 0.25
    done
    log "could not drop slot $1 (still active?); the cleanup will try again"
}

# pgferry's pid and the source-side poller's while they run, so that a failing script
# does not leave them behind.
FERRY_PID=
SRC_POLL_PID=

# Ends the psql waiting for pgferry's slot, and its loop in the source server (a
# backend does not notice that its client left while it sleeps).
stop_source_poll() {
    [[ -n $SRC_POLL_PID ]] || return 0
    psql_bench -At -c "select pg_cancel_backend(pid) from pg_stat_activity
        where application_name = 'bench_source_poll' and datname = current_database()" >/dev/null 2>&1 || true
    kill "$SRC_POLL_PID" 2>/dev/null || true
    wait "$SRC_POLL_PID" 2>/dev/null || true
    SRC_POLL_PID=
}

bench_cleanup_hook() {
    if [[ -n $FERRY_PID ]] && kill -TERM "$FERRY_PID" 2>/dev/null; then
        log "stopped pgferry (pid ${FERRY_PID})"
        sleep 1
    fi
    stop_source_poll
    log "dropping the subscription and the target databases ${T1_DB}, ${T2_DB}"
    drop_target "$T2_DB"
    drop_target "$T1_DB"
    [[ -n $PYTHON && ${KEEP_TOPICS:-0} != 1 ]] || return 0
    local r topics=()
    for ((r = 1; r <= REPEAT; r++)); do
        topics+=("$(topic_prefix "$r").public.patients" "$(topic_prefix "$r")._schemas")
    done
    log "deleting the bench topics ${topics[*]}"
    kafka_py delete "${topics[@]}" || true
}

# proc_cpu <pid...>: user + system CPU seconds of these processes so far (0 for gone).
proc_cpu() {
    local pid ticks=0 t
    for pid in "$@"; do
        [[ -n $pid && -r /proc/$pid/stat ]] || continue
        # Fields after the ")" that ends the command name: utime and stime are 12 and 13.
        t=$(sed 's/.*) //' "/proc/$pid/stat" 2>/dev/null | awk '{ print $12 + $13 }') || continue
        ticks=$((ticks + ${t:-0}))
    done
    awk -v t="$ticks" -v hz="$CLK_TCK" 'BEGIN { printf "%.2f", t / hz }'
}

# thread_cpu <pid>: CPU seconds of the process's live threads, summed by thread name,
# busiest first ("name=secs ...").
thread_cpu() {
    local task
    for task in /proc/"$1"/task/*; do
        [[ -r $task/stat ]] || continue
        printf '%s\t%s\n' "$(cat "$task/comm" 2>/dev/null)" "$(sed 's/.*) //' "$task/stat" | awk '{ print $12 + $13 }')"
    done | awk -F'\t' -v hz="$CLK_TCK" '{ t[$1] += $2; n[$1]++ }
        END { for (k in t) printf "%.2f %s%s\n", t[k] / hz, k, (n[k] > 1 ? "(x" n[k] ")" : "") }' |
        sort -rg | awk '{ printf "%s%s=%s", (NR > 1 ? " " : ""), $2, $1 }'
}

# The walsender streaming a slot (pid), "" if none.
walsender_pid() { psql_bench -At -c "select active_pid from pg_replication_slots where slot_name = '$1'"; }

build_pgferry
drop_target "$T2_DB"
drop_target "$T1_DB"
setup_bench bench_pgferry bench_sub
run_workload

EXPECTED=$(psql_bench -At -F ' ' -c "select count(*), sum(weight) from public.patients")
readonly EXPECTED
read -r WANT_ROWS WANT_SUM <<<"$EXPECTED"
readonly WANT_ROWS WANT_SUM
((WANT_ROWS == ROWS)) || die "the source table holds ${WANT_ROWS} rows after the workload, expected ${ROWS}"
log "expected target state: count ${WANT_ROWS}, sum(weight) ${WANT_SUM}; vacuuming the source table"
psql_bench -c "vacuum (analyze) public.patients"

# Waits inside the source server, up to max_wait seconds, for the slot's
# confirmed_flush_lsn to reach target, polling every 50 ms; returns the Unix time it
# did, or NULL.
psql_bench -At >/dev/null <<'SQL'
create function public.bench_wait_confirmed(slot text, target pg_lsn, max_wait float8)
returns float8 language plpgsql as $$
declare
    deadline timestamptz := clock_timestamp() + max_wait * interval '1 second';
begin
    loop
        if (select confirmed_flush_lsn >= target from pg_replication_slots where slot_name = slot) then
            return extract(epoch from clock_timestamp());
        end if;
        exit when clock_timestamp() >= deadline;
        perform pg_sleep(0.05);
    end loop;
    return null;
end $$;
SQL

# Created in each pgferry target database: waits inside the target server, up to
# max_wait seconds, for public.patients to hold want_rows rows with sum(weight) =
# want_sum; returns the Unix time it did, or NULL. The full count/sum runs on the
# first round, when pgferry's checkpoints (consumer "bench") say all want_offsets
# messages are applied, and every 2 s; the checkpoint is read every 100 ms.
WAIT_STATE_FN=$(cat <<'SQL'
create function public.bench_wait_state(want_rows bigint, want_sum numeric, want_offsets bigint,
                                        max_wait float8)
returns float8 language plpgsql as $$
declare
    deadline timestamptz := clock_timestamp() + max_wait * interval '1 second';
    last_full timestamptz := clock_timestamp() - interval '1 hour';
    offsets bigint;
    n bigint;
    s numeric;
begin
    loop
        offsets := 0;
        if to_regclass('pgferry.checkpoints') is not null then
            execute 'select coalesce(sum(next_offset), 0) from pgferry.checkpoints where consumer = ''bench'''
                into offsets;
        end if;
        if offsets >= want_offsets or clock_timestamp() - last_full >= interval '2 seconds' then
            select count(*), coalesce(sum(weight), 0) into n, s from public.patients;
            last_full := clock_timestamp();
            if n = want_rows and s = want_sum then
                return extract(epoch from clock_timestamp());
            end if;
        end if;
        exit when clock_timestamp() >= deadline;
        perform pg_sleep(0.1);
    end loop;
    return null;
end $$;
SQL
)
readonly WAIT_STATE_FN

# Other pgferry processes and test runs on this host share its CPUs and may restart
# the target cluster (the outage tests do): noted per run, so a perturbed run shows.
declare -A OTHERS=()
note_others() {
    local found
    found=$(pgrep -x pgferry | grep -vx "${FERRY_PID:-0}" | tr '\n' ' ' || true)
    found+=$(pgrep -f 'cargo test|cargo nextest' | tr '\n' ' ' || true)
    [[ -z $found ]] || OTHERS[${found% }]=1
}

too_long() { awk -v a="$1" -v b="$(now)" -v t="$DRAIN_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; }

# ------------------------------------------------------------- the subscription --
declare -a SUB_SECS=() SUB_APPLY=() SUB_WALSND=() SUB_HOST=()

run_sub() { # run_sub <repeat>
    local r=$1 sfx sub done_at='' t0 jiffies0 jiffies1 state apply_pid wal_pid stats
    sfx=$(slot_suffix "$r")
    sub=bench_sub${sfx}
    create_target "$T2_DB"
    log "run ${r}: create subscription ${sub} in ${T2_DB} (slot ${sub}, publication bench)"
    jiffies0=$(cpu_jiffies)
    t0=$(now)
    note_others
    psql_t2 -c "create subscription ${sub} connection '${BENCH_URL}' publication bench
        with (create_slot = false, slot_name = '${sub}', copy_data = false)"
    while [[ -z $done_at ]]; do
        if too_long "$t0"; then
            stats=$(psql_t2 -At -c "select apply_error_count from pg_stat_subscription_stats where subname = '${sub}'")
            die "slot ${sub} did not reach ${END_LSN} within ${DRAIN_TIMEOUT} s (at $(psql_bench -At -c \
                "select confirmed_flush_lsn from pg_replication_slots where slot_name = '${sub}'"); apply errors: ${stats}; see the target's server log)"
        fi
        done_at=$(psql_bench -At -c "select bench_wait_confirmed('${sub}', '${END_LSN}', 1)")
    done
    jiffies1=$(cpu_jiffies)
    note_others
    # CPU of the apply worker (target) and of the walsender decoding its slot (source).
    apply_pid=$(psql_t2 -At -c "select pid from pg_stat_subscription where subname = '${sub}' and relid is null")
    wal_pid=$(walsender_pid "$sub")
    SUB_APPLY+=("$(proc_cpu "$apply_pid")")
    SUB_WALSND+=("$(proc_cpu "$wal_pid")")
    state=$(psql_t2 -At -F ' ' -c "select count(*), sum(weight) from public.patients")
    [[ $state == "$EXPECTED" ]] ||
        die "the subscription confirmed ${END_LSN} but ${T2_DB}.public.patients holds (count, sum) ${state}, expected ${EXPECTED}"
    stats=$(psql_t2 -At -c "select apply_error_count from pg_stat_subscription_stats where subname = '${sub}'")
    [[ ${stats:-0} == 0 ]] || log "warning: subscription ${sub} had ${stats} apply errors (it retried)"
    SUB_SECS+=("$(elapsed "$t0" "$done_at")")
    SUB_HOST+=("$(host_busy "$jiffies0" "$jiffies1")")
    drop_target "$T2_DB"
    drop_slot "$sub"
}

# ------------------------------------------------------------------------ pgferry --
declare -a FERRY_SECS=() FERRY_RSS=() FERRY_CPU=() FERRY_STOP=() FERRY_HOST=() FERRY_SRC=() FERRY_LAST=()
declare -a FERRY_WALSND=() FERRY_TARGET=() FERRY_THREADS=() FERRY_COUNT=()

run_pgferry() { # run_pgferry <repeat>
    local r=$1 sfx slot prefix config t0 t1 t2 done_at='' src_at='' launcher pid rc=0 count keys latest
    local jiffies0 jiffies1 wal_pid target_pids state
    sfx=$(slot_suffix "$r")
    slot=bench_pgferry${sfx}
    prefix=$(topic_prefix "$r")
    config=$WORK/pgferry${sfx}.toml
    create_target "$T1_DB"
    psql_t1 <<<"$WAIT_STATE_FN"
    cat >"$config" <<TOML
[source]
url = "${BENCH_URL}"
slot = "${slot}"
publication = "bench"
heartbeat_interval = "10s"
# The slot exists before pgferry first starts, so by default it would also copy the
# table while streaming; the anchor copies nothing (copy_data = false / pg_recvlogical).
snapshot = "never"
[kafka]
brokers = "${PGFERRY_BROKERS}"
topic_prefix = "${prefix}"
[sink]
url = "${T1_URL}"
consumer = "bench"
[http]
listen = ""
[[tables]]
source = "public.patients"
TOML
    log "run ${r}: pgferry run --config ${config} (topic ${prefix}.public.patients, target ${T1_DB})"
    local cmd=("$BIN" run --config "$config")
    jiffies0=$(cpu_jiffies)
    t0=$(now)
    if [[ -n $TIME_V ]]; then
        "$TIME_V" -v -o "$WORK/pgferry${sfx}.time" "${cmd[@]}" >"$WORK/pgferry${sfx}.out" 2>"$WORK/pgferry${sfx}.log" &
        launcher=$!
        # SIGTERM must go to pgferry itself: /usr/bin/time would just die of it.
        pid=
        for _ in $(seq 200); do
            pid=$(pgrep -P "$launcher" || true)
            [[ -n $pid ]] && break
            sleep 0.01
        done
        [[ -n $pid ]] || die "cannot find pgferry's process under /usr/bin/time (pid ${launcher})"
    else
        "${cmd[@]}" >"$WORK/pgferry${sfx}.out" 2>"$WORK/pgferry${sfx}.log" &
        launcher=$!
        pid=$launcher
    fi
    FERRY_PID=$pid
    note_others
    # When the source stage is done: its slot confirmed the end LSN, i.e. Kafka
    # acknowledged every change (pgferry confirms at most every 100 ms).
    PGAPPNAME=bench_source_poll psql -X -At -d "$BENCH_URL" \
        -c "select bench_wait_confirmed('${slot}', '${END_LSN}', ${DRAIN_TIMEOUT})" \
        >"$WORK/source_done${sfx}" 2>/dev/null &
    SRC_POLL_PID=$!

    while [[ -z $done_at ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$launcher" || rc=$?
            log "pgferry run exited early with status ${rc}; its stderr:"
            cat "$WORK/pgferry${sfx}.log" >&2
            die "pgferry run stopped before ${T1_DB} reached the expected state"
        fi
        if too_long "$t0"; then
            die "${T1_DB}.public.patients did not reach (count, sum) ${EXPECTED} within ${DRAIN_TIMEOUT} s (it holds $(psql_t1 \
                -At -F ' ' -c "select count(*), sum(weight) from public.patients")); see ${WORK}/pgferry${sfx}.log"
        fi
        done_at=$(psql_t1 -At -c "select bench_wait_state(${WANT_ROWS}, ${WANT_SUM}, ${CHANGES}, 2)")
    done
    jiffies1=$(cpu_jiffies)
    t1=$(now)
    note_others
    # CPU so far of the walsender decoding its slot (source), of pgferry's sessions in
    # the target (the backends applying its batches) and of pgferry's threads.
    wal_pid=$(walsender_pid "$slot")
    mapfile -t target_pids < <(psql_target -At -c \
        "select pid from pg_stat_activity where datname = '${T1_DB}' and backend_type = 'client backend'")
    FERRY_WALSND+=("$(proc_cpu "$wal_pid")")
    FERRY_TARGET+=("$(proc_cpu "${target_pids[@]}")")
    FERRY_THREADS+=("$(thread_cpu "$pid")")

    kill -TERM "$pid"
    wait "$launcher" || rc=$?
    t2=$(now)
    FERRY_PID=
    if ((rc != 0)); then
        log "pgferry run exited with status ${rc} after SIGTERM; its stderr:"
        cat "$WORK/pgferry${sfx}.log" >&2
        die "pgferry run did not stop cleanly (exit ${rc})"
    fi
    # The source's confirmation usually comes before the target is complete (the sink
    # trails the source); if not, pgferry confirms the rest at its shutdown.
    for _ in $(seq 100); do
        [[ -s $WORK/source_done${sfx} ]] && break
        kill -0 "$SRC_POLL_PID" 2>/dev/null || break
        sleep 0.05
    done
    stop_source_poll
    src_at=$(cat "$WORK/source_done${sfx}" 2>/dev/null || true)
    FERRY_SRC+=("$([[ -n $src_at ]] && elapsed "$t0" "$src_at" || echo n/a)")

    state=$(psql_t1 -At -F ' ' -c "select count(*), sum(weight) from public.patients")
    [[ $state == "$EXPECTED" ]] ||
        die "after pgferry stopped ${T1_DB}.public.patients holds (count, sum) ${state}, expected ${EXPECTED}"
    log "run ${r}: pgferry verify --config ${config}"
    rc=0
    "$BIN" verify --config "$config" >"$WORK/verify${sfx}.out" 2>&1 || rc=$?
    if ((rc != 0)); then
        cat "$WORK/verify${sfx}.out" >&2
        die "pgferry verify exited with status ${rc}"
    fi
    VERIFY_LINE=$(tail -n 1 "$WORK/verify${sfx}.out" | tr -s ' ')

    FERRY_SECS+=("$(elapsed "$t0" "$done_at")")
    FERRY_STOP+=("$(elapsed "$t1" "$t2")")
    FERRY_RSS+=("$(peak_rss "$WORK/pgferry${sfx}.time")")
    FERRY_CPU+=("$(cpu_secs "$WORK/pgferry${sfx}.time")")
    FERRY_HOST+=("$(host_busy "$jiffies0" "$jiffies1")")
    if [[ -n $PYTHON ]]; then
        read -r count keys latest < <(kafka_py count "${prefix}.public.patients") ||
            die "cannot count the messages of ${prefix}.public.patients"
        ((count == CHANGES && keys == ROWS)) ||
            die "topic ${prefix}.public.patients holds ${count} messages with ${keys} keys, expected ${CHANGES} with ${ROWS}"
        FERRY_COUNT+=("$count")
        FERRY_LAST+=("$(elapsed "$t0" "$latest")")
    else
        FERRY_COUNT+=(n/a)
        FERRY_LAST+=(n/a)
    fi
    drop_target "$T1_DB"
    drop_slot "$slot"
}

# REPEAT rounds of both sides, alternating which goes first.
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)
for ((r = 1; r <= REPEAT; r++)); do
    if ((r % 2 == 1)); then
        run_sub "$r"
        run_pgferry "$r"
    else
        run_pgferry "$r"
        run_sub "$r"
    fi
done

# ----------------------------------------------------------------------- report --
report_head drain_pipeline "pgferry: run (source + sink), Avro via ${PGFERRY_BROKERS} (topics pipe${TOPIC_STAMP}[_N].public.patients) into ${T1_DB}; anchor: subscription bench_sub[_N] in ${T2_DB}, on ${TARGET_ADMIN_URL%/*}"
row() { printf '%-4s %-13s %8s %10s %7s %11s %11s %9s %8s %9s %13s %13s\n' "$@"; }
row run side seconds changes/s "CPU s" "walsender s" "target s" "peak RSS" "stop s" "host busy" \
    "in Kafka at s" "last msg at s"
for ((i = 0; i < REPEAT; i++)); do
    row "$((i + 1))" subscription "${SUB_SECS[i]}" "$(rate "${SUB_SECS[i]}")" - "${SUB_WALSND[i]}" "${SUB_APPLY[i]}" \
        - - "${SUB_HOST[i]}" - -
    row "$((i + 1))" "pgferry run" "${FERRY_SECS[i]}" "$(rate "${FERRY_SECS[i]}")" "${FERRY_CPU[i]}" \
        "${FERRY_WALSND[i]}" "${FERRY_TARGET[i]}" "${FERRY_RSS[i]}" "${FERRY_STOP[i]}" "${FERRY_HOST[i]}" \
        "${FERRY_SRC[i]}" "${FERRY_LAST[i]}"
done
echo "(seconds: subscription until its slot confirmed the end LSN (applied and flushed); pgferry until the"
echo " target held the expected count and sum(weight); CPU s: pgferry's process, start to exit;"
echo " walsender s: the source walsender decoding the slot; target s: the apply worker, or pgferry's"
echo " sessions in the target; peak RSS in MB; stop s: SIGTERM to exit 0; host busy: all $(nproc) CPUs,"
echo " whoever used them; in Kafka at s: when pgferry's slot confirmed the end LSN (Kafka acknowledged"
echo " everything); last msg at s: the newest message's timestamp, when pgferry produced it)"
for ((i = 0; i < REPEAT; i++)); do
    echo "pgferry threads, run $((i + 1)), CPU s: ${FERRY_THREADS[i]}"
done
echo "pgferry verify: exit 0; ${VERIFY_LINE}"
SUB_BEST=$(best "${SUB_SECS[@]}")
FERRY_BEST=$(best "${FERRY_SECS[@]}")
((REPEAT > 1)) && echo "best of ${REPEAT}: subscription ${SUB_BEST} s, pgferry ${FERRY_BEST} s"
echo "ratio pgferry/subscription (changes/s): $(ratio "$FERRY_BEST" "$SUB_BEST")  (>1 means pgferry is faster)"
if ((${#OTHERS[@]} > 0)); then
    echo "WARNING: other pgferry or cargo test processes ran during the measurements (pids: ${!OTHERS[*]});"
    echo "         they share the CPUs and may restart the target: the timings above are perturbed"
fi
[[ -n $PYTHON ]] || echo "messages: not counted, no python with confluent-kafka (set KAFKA_PYTHON to check them)"
[[ -n $TIME_V ]] || echo "peak RSS, CPU s: skipped, /usr/bin/time is not installed (apt-get install time)"
