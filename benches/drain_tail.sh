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
# The setup, workload, anchor and cleanup are shared with drain_kafka.sh (lib.sh).
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
# shellcheck source=benches/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

bench_init pgferry-drain-tail
build_pgferry
setup_bench
run_workload

# -------------------------------------------------------------------- measuring --
declare -a FERRY_SECS=() FERRY_RSS=() FERRY_CPU=() FERRY_LAST=()

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

run_repeats run_pgferry

# ----------------------------------------------------------------------- report --
report_head drain_tail
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
((REPEAT > 1)) && echo "best of ${REPEAT}: pg_recvlogical ${RECV_BEST} s, pgferry ${FERRY_BEST} s"
echo "ratio pgferry/pg_recvlogical (changes/s): $(ratio "$FERRY_BEST" "$RECV_BEST")  (>1 means pgferry is faster)"
LAST_BEST=$(best "${FERRY_LAST[@]}")
echo "ratio to pgferry's last line instead of its exit: $(ratio "$LAST_BEST" "$RECV_BEST")"
echo "pgferry wrote ${FERRY_OUT_MB} MB of JSON; first line: ${FERRY_SAMPLE}"
[[ -n $TIME_V ]] || echo "peak RSS: skipped, /usr/bin/time is not installed (apt-get install time)"
