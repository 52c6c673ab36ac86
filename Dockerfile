# pgferry container image: one static-ish binary on debian:bookworm-slim.
#
#   docker build -t pgferry:local .
#   docker run --rm pgferry:local check --config /etc/pgferry/pgferry.toml
#
# docker-compose.yml builds this image for its `pgferry` and `generator` services.
# The configuration of config/ is baked in at /etc/pgferry; mount your own over it
# (e.g. -v ./my-config:/etc/pgferry:ro) and pass secrets as environment variables:
# every string of the TOML may use ${VAR} / ${VAR:-default}.

# ------------------------------------------------------------------ build --
FROM rust:1-bookworm AS build

# librdkafka is built from source by the rdkafka crate (its mklove `configure`
# script: needs a C toolchain, make, perl and python3); zlib is linked from the
# system (libz-sys finds it with pkg-config). The rust image already has most of
# these; installing them again is a no-op that keeps the build explicit.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        build-essential perl python3 pkg-config zlib1g-dev libssl-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Dependency layer: with only the manifest and lock file (plus stub sources, since
# Cargo.toml names the bin and the `decode`/`encode`/`latency`/`drain`/`snapshot`/`tail`
# benches), build every
# dependency, librdkafka included. This layer is reused as long as Cargo.toml and
# Cargo.lock do not change, so editing src/ rebuilds pgferry only.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > benches/decode.rs \
    && echo 'fn main() {}' > benches/encode.rs \
    && echo 'fn main() {}' > benches/latency.rs \
    && echo 'fn main() {}' > benches/drain.rs \
    && echo 'fn main() {}' > benches/snapshot.rs \
    && echo 'fn main() {}' > benches/tail.rs \
    && cargo build --release --locked \
    # Forget the stub crate, so the real sources are always compiled (COPY keeps
    # the files' mtimes, which may be older than the stub's build).
    && rm -rf src benches target/release/pgferry target/release/pgferry.d \
        target/release/deps/pgferry-* target/release/.fingerprint/pgferry-*

COPY src/ src/
COPY benches/ benches/
# The release profile keeps line tables (debug = 1) for profiling; the image drops
# them (function symbols stay, so backtraces still name functions): ~90 MB -> ~16 MB.
RUN cargo build --release --locked \
    && strip --strip-debug target/release/pgferry \
    && target/release/pgferry --version

# ---------------------------------------------------------------- runtime --
FROM debian:bookworm-slim AS runtime

# The binary links libc, libm, libgcc_s, libz and OpenSSL (libssl3, librdkafka's TLS
# and SASL/SCRAM to Kafka) dynamically; TLS to PostgreSQL is rustls.
# ca-certificates: for sslrootcert=/etc/ssl/certs/ca-certificates.crt with
# sslmode=verify-full against servers with publicly signed certificates.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates zlib1g libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 pgferry \
    && useradd --system --uid 10001 --gid pgferry --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin pgferry

COPY --from=build /src/target/release/pgferry /usr/local/bin/pgferry
COPY config/ /etc/pgferry/

USER pgferry

# /metrics, /healthz and /readyz ([http].listen; inside a container it must listen
# on 0.0.0.0, e.g. PGFERRY_HTTP_LISTEN=0.0.0.0:9187 as docker-compose.yml sets).
EXPOSE 9187

# No HEALTHCHECK here: the image has no curl/wget, and the same image also runs
# one-shot commands (generate, verify, check) that serve no HTTP, which a
# built-in check would mark unhealthy. docker-compose.yml gives the `pgferry`
# daemon service its own healthcheck (GET /healthz through bash's /dev/tcp).

# SIGTERM (docker stop) stops pgferry gracefully: what was sent or applied is
# confirmed, and the process exits 0.
ENTRYPOINT ["pgferry"]
CMD ["run", "--config", "/etc/pgferry/pgferry.toml"]
