#!/usr/bin/env bash
# The project's test command: build everything, run unit, property and differential tests.
set -euo pipefail
cd "$(dirname "$0")"
# Incremental caches double the target directory and a from-scratch build gains nothing.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
cargo build --workspace --all-targets
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
