#!/usr/bin/env bash
# The pgferry demo, from a fresh machine: local services, the EHR and hospital
# schemas, an EHR preloaded with years of history, `pgferry run` (whose initial
# snapshot brings that history over), a bounded burst of realistic EHR activity, then
# `pgferry verify` once the lag has drained.
#
#   scripts/demo.sh                 # 60 s of activity; pgferry keeps running afterwards
#   DEMO_DURATION=10s scripts/demo.sh --ci    # short mode: stops pgferry, drops its slot
#
# It recreates the `ehr` and `hospital` databases of scripts/services.sh (the tests
# use databases of their own) and uses a fresh topic prefix, so every run starts clean.
set -euo pipefail
cd "$(dirname "$0")/.."
# The demo log goes to target/, which a build with CARGO_TARGET_DIR set elsewhere does not create.
mkdir -p target

ci=0
[[ ${1:-} == --ci ]] && ci=1
duration=${DEMO_DURATION:-60s}
rate=${DEMO_RATE:-50}
preload=${DEMO_PRELOAD:-5000}
say() { printf '\n\033[1mdemo: %s\033[0m\n' "$*" >&2; }

say "1/8 starting the local services (PostgreSQL x2, Kafka-compatible broker)"
scripts/services.sh up
eval "$(scripts/services.sh env)"
export PGFERRY_TOPIC_PREFIX="ehr_$(date +%s)"

if [[ $ci == 1 ]]; then
    # Short mode reuses the test build: a release build would double CI's compile time.
    say "2/8 building pgferry (debug, short mode)"
    cargo build --locked --quiet
    bin=${CARGO_TARGET_DIR:-target}/debug/pgferry
else
    say "2/8 building pgferry (release)"
    cargo build --release --locked --quiet
    bin=${CARGO_TARGET_DIR:-target}/release/pgferry
fi

say "3/8 loading the EHR schema (source) and the hospital schema (target)"
admin_src="${PGFERRY_SOURCE_URL%/*}/postgres"
admin_tgt="${PGFERRY_TARGET_URL%/*}/postgres"
psql "$PGFERRY_SOURCE_URL" -qAtc "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                                  where slot_name = 'pgferry' and not active" >/dev/null
export PGOPTIONS='-c client_min_messages=warning'
psql "$admin_src" -qc "drop database if exists ehr with (force)" -c "create database ehr"
psql "$admin_tgt" -qc "drop database if exists hospital with (force)" -c "create database hospital"
psql "$PGFERRY_SOURCE_URL" -q -v ON_ERROR_STOP=1 -f sql/ehr_schema.sql
psql "$PGFERRY_SOURCE_URL" -q -v ON_ERROR_STOP=1 -v password="'demo'" -f sql/source_setup.sql
psql "$PGFERRY_TARGET_URL" -q -v ON_ERROR_STOP=1 -f sql/hospital_schema.sql
unset PGOPTIONS
"$bin" check --config config/pgferry.toml

say "4/8 preloading the EHR with the history of $preload patients (before pgferry starts)"
"$bin" generate --url "$PGFERRY_SOURCE_URL" --preload "$preload" --duration 0s --seed 1

say "5/8 starting pgferry run: its initial snapshot copies that history (log: target/demo-pgferry.log)"
"$bin" run --config config/pgferry.toml > target/demo-pgferry.log 2>&1 &
pid=$!
trap '[[ $ci == 1 ]] && kill "$pid" 2>/dev/null || true' EXIT
for ((i = 0; i < 120; i++)); do
    if curl -fs http://127.0.0.1:9187/readyz >/dev/null 2>&1; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then tail -n 20 target/demo-pgferry.log >&2; exit 1; fi
    sleep 0.5
done
curl -fs http://127.0.0.1:9187/readyz >/dev/null || { tail -n 20 target/demo-pgferry.log >&2; echo "demo: pgferry is not ready" >&2; exit 1; }
# The snapshot's progress, as `pgferry status` shows it, until every table is done.
for ((i = 0; i < 240; i++)); do
    progress=$("$bin" status --config config/pgferry.toml 2>/dev/null | grep '^snapshot ' || true)
    printf '%s\n' "$progress" >&2
    if [[ -n $progress ]] && ! grep -qv ': done' <<<"$progress"; then break; fi
    if ! kill -0 "$pid" 2>/dev/null; then tail -n 20 target/demo-pgferry.log >&2; exit 1; fi
    sleep 1
done

say "6/8 generating EHR activity: $rate changes/s for $duration"
"$bin" generate --url "$PGFERRY_SOURCE_URL" --rate "$rate" --duration "$duration" --seed 1

say "7/8 waiting for the replication lag to drain"
ok=0
for ((i = 0; i < 240; i++)); do
    if "$bin" verify --config config/pgferry.toml >/dev/null 2>&1; then ok=1; break; fi
    lag=$(curl -fs http://127.0.0.1:9187/metrics | awk '/^pgferry_replication_lag_seconds/ {print $2}')
    printf 'demo: target not caught up yet (last apply lag %ss)\r' "${lag:-?}" >&2
    sleep 0.5
done
echo >&2

say "8/8 pgferry verify: the history and the new activity arrived"
"$bin" verify --config config/pgferry.toml || ok=0
echo
echo "metrics:   http://127.0.0.1:9187/metrics   (readiness: /readyz)"
echo "log:       target/demo-pgferry.log"
echo "status:    $bin status --config config/pgferry.toml"
if [[ $ci == 1 ]]; then
    kill -TERM "$pid"
    wait "$pid"
    echo "pgferry stopped (exit code $?)"
    # Nothing reads the demo's slot any more: left behind, it would keep the EHR's WAL
    # (gigabytes on a dev machine) until the next demo drops it. The walsender lets go
    # of it a moment after pgferry is gone.
    for ((i = 0; i < 50; i++)); do
        left=$(psql "$PGFERRY_SOURCE_URL" -qAtc "select count(*) from pg_replication_slots where slot_name = 'pgferry'")
        [[ $left == 0 ]] && break
        psql "$PGFERRY_SOURCE_URL" -qAtc "select pg_drop_replication_slot('pgferry')" >/dev/null 2>&1 || sleep 0.1
    done
else
    echo "pgferry keeps running (pid $pid); stop it with: kill $pid"
    trap - EXIT
fi
[[ $ok == 1 ]] || { echo "demo: verify found a difference" >&2; exit 1; }
