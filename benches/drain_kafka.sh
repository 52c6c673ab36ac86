#!/usr/bin/env bash
# drain_kafka.sh: how fast `pgferry run --only source` drains a replication backlog
# into Kafka (Avro, acks=all), measured next to pg_recvlogical draining the very
# same backlog in the same run. The Kafka twin of drain_tail.sh.
#
# What it does, on the server of ${PGFERRY_SOURCE_URL} and the broker(s) of
# ${PGFERRY_BROKERS}:
#   1. (re)creates the scratch database pgferry_bench_kafka with the 10-column
#      public.patients table, publication `bench` and two pgoutput slots,
#      bench_kafka_recv and bench_kafka, BEFORE any data is written (lib.sh; its
#      own database and slot names, so it fails cleanly rather than collide when
#      another bench runs at the same time; the timings would suffer anyway);
#   2. writes the backlog: ROWS rows inserted in one statement, then one UPDATE of
#      every row (2*ROWS changes in two transactions), and records the end LSN;
#   3. drains slot bench_kafka_recv with `pg_recvlogical --start -E <end lsn>` (the
#      anchor), and slot bench_kafka with `pgferry run --only source`, producing
#      to topic bench<epoch seconds>[_N].public.patients. `run` has no end LSN, so
#      the script polls the slot's confirmed_flush_lsn every 50 ms (a loop inside
#      the server) until it reaches the end LSN: pgferry confirms a position only
#      once Kafka acknowledged (acks=all) every message up to it. That moment is
#      pgferry's time; then it gets SIGTERM and must exit 0;
#   4. if /tmp/kvenv/bin/python (or $KAFKA_PYTHON) has confluent-kafka, reads the
#      topic back and checks that it holds exactly 2*ROWS messages with ROWS
#      distinct keys; otherwise says it skipped that check (python is optional);
#   5. prints rows, changes, seconds, changes/s, client CPU time, peak RSS and
#      context switches (via /usr/bin/time -v, if installed), how long pgferry
#      took to stop, how busy the host's CPUs were meanwhile, and the ratio
#      pgferry/pg_recvlogical of changes/s (>1: pgferry is faster);
#   6. drops the slots and the database on exit, whatever happened, and deletes the
#      bench topics if python can (the broker may keep them in memory).
#
# Run it (services up and their environment loaded):
#   scripts/services.sh up && eval "$(scripts/services.sh env)"
#   benches/drain_kafka.sh                      # ROWS=200000, REPEAT=1
#   ROWS=50000 REPEAT=3 benches/drain_kafka.sh
# Knobs: ROWS (default 200000), REPEAT (default 1; each repeat gets its own pair of
# slots, all created before the workload, its own topic prefix, and alternates
# which side goes first), PGFERRY_BIN (use this binary and skip `cargo build
# --release`), KEEP_OUTPUT=1 (keep the temp dir with configs and logs),
# KEEP_TOPICS=1 (do not delete the bench topics), DRAIN_TIMEOUT (seconds to wait
# for the slot to reach the end LSN, default 900), KAFKA_PYTHON (a python with
# confluent-kafka), PERF=1 (attach `perf record -g` to pgferry while it drains;
# the perf.data files stay in the kept temp dir; perf costs pgferry some time).
#
# What the ratio means: as in drain_tail.sh the server-side work is identical for
# both sides, and pg_recvlogical only copies the raw pgoutput bytes to /dev/null.
# pgferry decodes every message, converts each row to its event model, encodes an
# Avro key and value per change and produces them (lz4, idempotent, acks=all) to
# the broker, which on this host shares the CPUs with PostgreSQL and pgferry.
# pgferry's time ends when the last acknowledgement is confirmed to the slot; it
# includes process start, connecting, creating the topics and writing the schemas.
# The poll adds up to 50 ms, but the slot moves in coarser steps: pgferry sends
# its standby status (the confirmed position) on a 1 s tick, so its time is rounded
# up to its next tick, by up to ~1 s, as in drain_tail.sh. With python, the
# timestamp of the topic's newest message (librdkafka's CreateTime: when pgferry
# produced it, a few ms before the broker acknowledged it) gives a second, finer
# end time: "last msg at s", a lower bound. The CPU column is pgferry's own
# process only (the broker's work is not counted anywhere).
set -euo pipefail

readonly PROG="${0##*/}"
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

[[ -n ${PGFERRY_BROKERS:-} ]] ||
    die "PGFERRY_BROKERS is not set; run: scripts/services.sh up && eval \"\$(scripts/services.sh env)\""
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-900}
[[ $DRAIN_TIMEOUT =~ ^[1-9][0-9]*$ ]] || die "DRAIN_TIMEOUT must be a positive whole number of seconds"
readonly DRAIN_TIMEOUT
command -v pgrep >/dev/null || die "pgrep is not on PATH (apt-get install procps)"
if [[ ${PERF:-0} == 1 ]]; then
    command -v perf >/dev/null || die "PERF=1 but perf is not on PATH"
    KEEP_OUTPUT=1
fi

RECV_SLOT=bench_kafka_recv
readonly FERRY_SLOT=bench_kafka
bench_init pgferry-drain-kafka pgferry_bench_kafka
TOPIC_STAMP=$(date +%s)
readonly TOPIC_STAMP

topic_prefix() { echo "bench${TOPIC_STAMP}$(slot_suffix "$1")"; }

# pgferry's pid while it runs, so that a failing script does not leave it behind.
FERRY_PID=

bench_cleanup_hook() {
    if [[ -n $FERRY_PID ]] && kill -TERM "$FERRY_PID" 2>/dev/null; then
        log "stopped pgferry (pid ${FERRY_PID})"
        sleep 1
    fi
    [[ -n $PYTHON && ${KEEP_TOPICS:-0} != 1 ]] || return 0
    local r topics=()
    for ((r = 1; r <= REPEAT; r++)); do
        topics+=("$(topic_prefix "$r").public.patients" "$(topic_prefix "$r")._schemas")
    done
    log "deleting the bench topics ${topics[*]}"
    kafka_py delete "${topics[@]}" || true
}

build_pgferry
setup_bench "$RECV_SLOT" "$FERRY_SLOT"
run_workload

# Waits inside the server, up to max_wait seconds, for the slot's confirmed_flush_lsn
# to reach target, polling every 50 ms; returns the Unix time it did, or NULL.
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

# -------------------------------------------------------------------- measuring --
declare -a FERRY_SECS=() FERRY_RSS=() FERRY_CPU=() FERRY_STOP=() FERRY_COUNT=() FERRY_HOST=() FERRY_CSW=() FERRY_LAST=()

run_pgferry() { # run_pgferry <repeat>
    local r=$1 sfx prefix config t0 t1 t2 done_at='' launcher pid perf_pid='' rc=0 count keys latest jiffies0 jiffies1
    sfx=$(slot_suffix "$r")
    prefix=$(topic_prefix "$r")
    config=$WORK/pgferry${sfx}.toml
    cat >"$config" <<TOML
[source]
url = "${BENCH_URL}"
slot = "${FERRY_SLOT}${sfx}"
publication = "bench"
heartbeat_interval = "10s"
# The slot exists before pgferry first starts, so by default it would also copy the
# table while streaming; the anchor copies nothing (copy_data = false / pg_recvlogical).
snapshot = "never"
[kafka]
brokers = "${PGFERRY_BROKERS}"
topic_prefix = "${prefix}"
[http]
listen = ""
[[tables]]
source = "public.patients"
TOML
    log "run ${r}: pgferry run --only source --config ${config} (topic ${prefix}.public.patients)"
    local cmd=("$BIN" run --config "$config" --only source)
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
    if [[ ${PERF:-0} == 1 ]]; then
        perf record -g -F 499 -p "$pid" -o "$WORK/perf${sfx}.data" 2>"$WORK/perf${sfx}.log" &
        perf_pid=$!
    fi

    while [[ -z $done_at ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$launcher" || rc=$?
            log "pgferry run exited early with status ${rc}; its stderr:"
            cat "$WORK/pgferry${sfx}.log" >&2
            die "pgferry run stopped before the slot reached ${END_LSN}"
        fi
        if awk -v a="$t0" -v b="$(now)" -v t="$DRAIN_TIMEOUT" 'BEGIN { exit !(b - a > t) }'; then
            kill -TERM "$pid" 2>/dev/null || true
            die "slot ${FERRY_SLOT}${sfx} did not reach ${END_LSN} within ${DRAIN_TIMEOUT} s (at $(psql_bench -At -c \
                "select confirmed_flush_lsn from pg_replication_slots where slot_name = '${FERRY_SLOT}${sfx}'")); see ${WORK}/pgferry${sfx}.log"
        fi
        done_at=$(psql_bench -At -c "select bench_wait_confirmed('${FERRY_SLOT}${sfx}', '${END_LSN}', 1)")
    done
    jiffies1=$(cpu_jiffies)
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" || true
    fi

    t1=$(now)
    kill -TERM "$pid"
    wait "$launcher" || rc=$?
    t2=$(now)
    FERRY_PID=
    if ((rc != 0)); then
        log "pgferry run exited with status ${rc} after SIGTERM; its stderr:"
        cat "$WORK/pgferry${sfx}.log" >&2
        die "pgferry run did not stop cleanly (exit ${rc})"
    fi
    FERRY_SECS+=("$(elapsed "$t0" "$done_at")")
    FERRY_STOP+=("$(elapsed "$t1" "$t2")")
    FERRY_RSS+=("$(peak_rss "$WORK/pgferry${sfx}.time")")
    FERRY_CPU+=("$(cpu_secs "$WORK/pgferry${sfx}.time")")
    FERRY_CSW+=("$(ctx_switches "$WORK/pgferry${sfx}.time")")
    FERRY_HOST+=("$(host_busy "$jiffies0" "$jiffies1")")
    if [[ -n $PYTHON ]]; then
        read -r count keys latest < <(kafka_py count "${prefix}.public.patients") ||
            die "cannot count the messages of ${prefix}.public.patients"
        ((count == CHANGES && keys == ROWS)) ||
            die "topic ${prefix}.public.patients holds ${count} messages with ${keys} keys, expected ${CHANGES} with ${ROWS} (2 x ${ROWS} rows)"
        FERRY_COUNT+=("$count")
        FERRY_LAST+=("$(elapsed "$t0" "$latest")")
    else
        FERRY_COUNT+=(n/a)
        FERRY_LAST+=(n/a)
    fi
}

run_repeats run_pgferry

# ----------------------------------------------------------------------- report --
report_head drain_kafka "pgferry: run --only source, Avro to ${PGFERRY_BROKERS}, topics bench${TOPIC_STAMP}[_N].public.patients"
row() { printf '%-4s %-15s %9s %12s %8s %14s %9s %10s %10s %16s %14s\n' "$@"; }
row run side seconds changes/s "CPU s" "peak RSS (MB)" "stop s" messages "host busy" "ctx sw vol/invol" \
    "last msg at s"
for ((i = 0; i < REPEAT; i++)); do
    row "$((i + 1))" pg_recvlogical "${RECV_SECS[i]}" "$(rate "${RECV_SECS[i]}")" "${RECV_CPU[i]}" "${RECV_RSS[i]}" \
        - - - - -
    row "$((i + 1))" "pgferry run" "${FERRY_SECS[i]}" "$(rate "${FERRY_SECS[i]}")" "${FERRY_CPU[i]}" \
        "${FERRY_RSS[i]}" "${FERRY_STOP[i]}" "${FERRY_COUNT[i]}" "${FERRY_HOST[i]}" "${FERRY_CSW[i]}" "${FERRY_LAST[i]}"
done
echo "(seconds: pgferry's until its slot confirmed the end LSN, i.e. Kafka acknowledged everything;"
echo " stop s: SIGTERM to exit 0; CPU s, ctx sw: pgferry's process only, start to exit;"
echo " host busy: all $(nproc) CPUs, whoever used them - walsender, broker, pgferry - until the end LSN;"
echo " last msg at s: the newest message's timestamp on the topic, when pgferry produced it)"
RECV_BEST=$(best "${RECV_SECS[@]}")
FERRY_BEST=$(best "${FERRY_SECS[@]}")
((REPEAT > 1)) && echo "best of ${REPEAT}: pg_recvlogical ${RECV_BEST} s, pgferry ${FERRY_BEST} s"
echo "ratio pgferry/pg_recvlogical (changes/s): $(ratio "$FERRY_BEST" "$RECV_BEST")  (>1 means pgferry is faster)"
if [[ -n $PYTHON ]]; then
    LAST_BEST=$(best "${FERRY_LAST[@]}")
    echo "ratio to pgferry's last produced message instead of the slot confirmation: $(ratio "$LAST_BEST" "$RECV_BEST")"
fi
if [[ -z $PYTHON ]]; then
    echo "messages: not counted, no python with confluent-kafka (set KAFKA_PYTHON to check them)"
fi
if [[ ${PERF:-0} == 1 ]]; then
    echo "perf: perf report -i ${WORK}/perf.data (and perf_N.data per repeat)"
fi
[[ -n $TIME_V ]] || echo "peak RSS: skipped, /usr/bin/time is not installed (apt-get install time)"
