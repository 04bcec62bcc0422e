#!/usr/bin/env bash
# Runs each decoder fuzz target of keyway-policy (tokens, tickets, flow headers) for N seconds (default 60) over the committed
# seed corpus. New corpus entries go to a scratch directory, so the committed corpus stays as is.
# Needs the nightly toolchain (cargo-fuzz builds with sanitizers) and installs cargo-fuzz.
set -euo pipefail
cd "$(dirname "$0")/../policy"
seconds=${1:-60}
rustup run nightly rustc --version >/dev/null 2>&1 || rustup toolchain install nightly --profile minimal
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --version =0.13.2 --locked
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for target in token_decode ticket_decode flow_decode; do
    mkdir -p "$scratch/$target"
    echo "== fuzz $target for ${seconds}s"
    cargo +nightly fuzz run "$target" "$scratch/$target" "fuzz/corpus/$target" -- -max_total_time="$seconds"
done
