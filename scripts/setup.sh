#!/usr/bin/env bash
# Installs the toolchain pieces keyway builds with: the toolchain pinned in rust-toolchain.toml
# with rustfmt, clippy and the wasm32-wasip1 target. Idempotent and quiet when all is there.
set -euo pipefail
cd "$(dirname "$0")/.."
toolchain=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! command -v rustup >/dev/null; then
    echo "setup: rustup is required (the machine's Rust toolchain is managed by rustup)" >&2
    exit 1
fi
installed_targets=$(rustup target list --installed --toolchain "$toolchain" 2>/dev/null || true)
if ! grep -qx wasm32-wasip1 <<<"$installed_targets"; then
    rustup toolchain install "$toolchain" --profile minimal --component rustfmt,clippy --target wasm32-wasip1
fi
installed_components=$(rustup component list --installed --toolchain "$toolchain")
for c in rustfmt clippy; do
    grep -q "^$c" <<<"$installed_components" || rustup component add "$c" --toolchain "$toolchain"
done
