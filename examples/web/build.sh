#!/usr/bin/env bash
# Builds the page into examples/web/pkg (wasm-bindgen's JS glue and the .wasm);
# with `serve`, also serves examples/web on http://localhost:${PORT:-8000}/.
# Needs the wasm32-unknown-unknown target and wasm-bindgen-cli at the version in
# Cargo.lock (README.md, "In the browser").
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --example web --target wasm32-unknown-unknown
wasm-bindgen --target web --no-typescript --out-dir examples/web/pkg \
    target/wasm32-unknown-unknown/release/examples/web.wasm
if [ "${1:-}" = serve ]; then
    exec node examples/web/screenshot.mjs --serve-only
fi
