#!/usr/bin/env bash
# The project's test command: build everything, run unit, property and differential tests.
set -euo pipefail
cd "$(dirname "$0")"
cargo build --workspace --all-targets
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace
