#!/usr/bin/env bash
# Compatibility tests: the official npm `e2b` SDK (pinned in package.json) in
# debug mode (E2B_DEBUG=true) against bin/envd on 127.0.0.1:49983.
#
#   ./run.sh                       every *.test.mjs
#   ./run.sh files.test.mjs        some of them
#
# secured.test.mjs starts its own envd on a free port (it sets an access token
# through /init, which cannot be undone on the shared one). Needs root and
# `make build`. Exit code: the test runner's.
set -euo pipefail
cd "$(dirname "$0")"
source ./lib.sh

ensure_root
ensure_node_modules
ensure_user

trap on_exit EXIT
trap 'exit 130' INT TERM

start_envd

tests=("$@")
if [[ ${#tests[@]} -eq 0 ]]; then
	tests=(*.test.mjs)
fi
E2B_DEBUG=true node --test --test-concurrency=1 --test-reporter=spec "${tests[@]}"
