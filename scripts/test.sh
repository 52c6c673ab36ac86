#!/usr/bin/env bash
# The test command of README.md (and of CI, through .ci/run): bring up the local
# services (PostgreSQL clusters and the broker, installing what is missing), then
# check formatting and lints, run every test against those real services, and run the
# demo in short mode.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/services.sh up
eval "$(scripts/services.sh env)"

cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
# The README's first command, in short mode: its verify must pass.
DEMO_DURATION=10s scripts/demo.sh --ci
