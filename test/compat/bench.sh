#!/usr/bin/env bash
# envd benchmarks through the official npm e2b SDK (debug mode): command round
# trip and 100 MiB transfers, each beside a baseline without envd. Starts
# bin/envd on 127.0.0.1:49983 like run.sh; prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")"
source ./lib.sh

ensure_root
ensure_node_modules
ensure_user

trap on_exit EXIT
trap 'exit 130' INT TERM

start_envd
echo "compat: bench on $(nproc) CPUs, $(uname -r), node $(node --version)"
E2B_DEBUG=true node bench.mjs
