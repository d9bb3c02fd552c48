#!/usr/bin/env bash
# Compatibility tests: the official npm `e2b` SDK (pinned in package.json)
# against warren, in three stages:
#
#   debug   E2B_DEBUG=true against bin/envd on 127.0.0.1:49983 (README mode C)
#   api     `bin/warren up` on a free loopback port; E2B_API_URL/E2B_SANDBOX_URL
#           point at it (mode A, header routing): api/*.test.mjs and the
#           commands/files/pty files against real sandboxes
#   domain  `bin/warren up --tls self-signed --domain warren.test` on
#           127.0.0.1:443; E2B_DOMAIN + NODE_EXTRA_CA_CERTS, names under the
#           domain resolved to 127.0.0.1 by resolve-loopback.mjs (mode B)
#
#   ./run.sh                          every stage, every file
#   ./run.sh api domain               some stages
#   ./run.sh files.test.mjs           one file, in every stage that runs it
#   ./run.sh api api/proxy.test.mjs   one file in one stage
#
# Each stage runs even when an earlier one failed. Needs root and `make
# build`. Exit code: 0 when every stage passed.
set -euo pipefail
cd "$(dirname "$0")"
source ./lib.sh

STAGES=(debug api domain)
# The mode B domain: .test is reserved (RFC 6761), so no real name is shadowed.
DOMAIN=warren.test

# stage_files STAGE prints the test files a stage runs by default.
stage_files() {
	case $1 in
	debug) printf '%s\n' *.test.mjs ;;
	api) printf '%s\n' api/*.test.mjs templates/*.test.mjs commands.test.mjs files.test.mjs pty.test.mjs ;;
	domain) printf '%s\n' domain/*.test.mjs ;;
	esac
}

# node_test runs the test runner on its arguments, one file at a time.
node_test() {
	run_node --test --test-concurrency=1 --test-reporter=spec "$@"
}

# Each run_<stage> runs in a subshell of its own: its exports end with it.
run_debug() {
	start_envd
	E2B_DEBUG=true node_test "$@"
}

run_api() {
	local port
	port=$(free_port)
	# templates/pool.test.mjs builds compat-pooled and claims from its pool.
	local pools=(--warm-pool-templates compat-pooled=1)
	start_warren api "127.0.0.1:$port" "${pools[@]}"
	# api/pause.test.mjs restarts warren: SIGUSR1 to this stage, then it
	# waits for a new PID in WARREN_COMPAT_PID_FILE.
	export WARREN_COMPAT_STAGE_PID=$BASHPID WARREN_COMPAT_PID_FILE=$LOG_DIR/warren.pid
	trap 'restart_warren api-restarted "127.0.0.1:$port" "${pools[@]}"' USR1
	unset E2B_DEBUG E2B_DOMAIN
	export E2B_API_URL=http://127.0.0.1:$port E2B_SANDBOX_URL=http://127.0.0.1:$port
	export E2B_API_KEY=$WARREN_API_KEY
	if printf '%s\n' "$@" | grep -q 'oci\.test\.mjs'; then
		WARREN_COMPAT_OCI_ARCHIVE=$(make_oci_archive)
		export WARREN_COMPAT_OCI_ARCHIVE
	fi
	node_test "$@"
}

# make_oci_archive prints the path of a bootable OCI image archive made from
# the base template's root image (test/compat/mkimage), made anew when that
# image changed.
make_oci_archive() {
	local base=$WARREN_DATA/templates/base/rootfs.ext4 out=$WARREN_DATA/compat-oci.tar
	if [[ ! -e $out || $base -nt $out ]]; then
		echo "compat: making the OCI image archive $out from $base" >&2
		(cd ../.. && go run ./test/compat/mkimage -base "$base" -out "$out") >&2
	fi
	echo "$out"
}

run_domain() {
	# The SDK builds https://api.<domain> and https://<port>-<id>.<domain>
	# with no port, so warren listens on 443 (loopback only).
	if port_busy 443; then
		die "127.0.0.1:443 is in use; the domain stage serves https://api.$DOMAIN there"
	fi
	start_warren domain 127.0.0.1:443 --tls self-signed --domain "$DOMAIN"
	local ca=$WARREN_DATA/tls/ca.pem
	[[ -f $ca ]] || die "warren up --tls self-signed made no CA at $ca"
	unset E2B_DEBUG E2B_API_URL E2B_SANDBOX_URL
	export E2B_DOMAIN=$DOMAIN E2B_API_KEY=$WARREN_API_KEY NODE_EXTRA_CA_CERTS=$ca
	export NODE_OPTIONS="${NODE_OPTIONS:+$NODE_OPTIONS }--import=$COMPAT_DIR/resolve-loopback.mjs"
	node_test "$@"
}

# Arguments: stage names select stages, anything else is a test file that
# runs in each selected stage whose default set contains it.
selected=()
files=()
for arg in "$@"; do
	case $arg in
	debug | api | domain) selected+=("$arg") ;;
	all) selected+=("${STAGES[@]}") ;;
	*) files+=("${arg#./}") ;;
	esac
done
[[ ${#selected[@]} -gt 0 ]] || selected=("${STAGES[@]}")

ensure_root
ensure_node_modules
ensure_user

trap on_exit EXIT
# A signal ends the running stage (its own trap cleans up), then the script.
interrupted=
STAGE_PID=
stop_stage() {
	if [[ -n $STAGE_PID ]]; then
		kill -TERM "$STAGE_PID" 2>/dev/null || true
	fi
}
trap 'interrupted=130; stop_stage' INT
trap 'interrupted=143; stop_stage' TERM
ensure_log_dir

failed=()
summary=()
for stage in "${STAGES[@]}"; do
	[[ " ${selected[*]} " == *" $stage "* ]] || continue
	mapfile -t defaults <<<"$(stage_files "$stage")"
	run=()
	if [[ ${#files[@]} -eq 0 ]]; then
		run=("${defaults[@]}")
	else
		for f in "${files[@]}"; do
			if [[ " ${defaults[*]} " == *" $f "* ]]; then
				run+=("$f")
			fi
		done
	fi
	[[ ${#run[@]} -gt 0 ]] || continue
	echo "compat: ===== stage $stage: ${run[*]}"
	started=$SECONDS
	# A subshell, so that die() in a stage ends that stage only; its EXIT
	# trap stops what the stage started and prints the stage's logs. In the
	# background, so that our traps run at once and pass a signal on to it.
	(
		set -e
		LOG_DIR=$LOG_DIR/$stage
		mkdir "$LOG_DIR"
		export WARREN_COMPAT_LOG_DIR=$LOG_DIR
		trap on_stage_exit EXIT
		trap 'exit 143' TERM
		"run_$stage" "${run[@]}"
	) &
	STAGE_PID=$!
	# wait returns early when a trap ran; wait again until the stage is over.
	while :; do
		rc=0
		wait "$STAGE_PID" || rc=$?
		kill -0 "$STAGE_PID" 2>/dev/null || break
	done
	STAGE_PID=
	if [[ -n $interrupted ]]; then
		exit "$interrupted"
	fi
	summary+=("$stage: $([[ $rc -eq 0 ]] && echo passed || echo "FAILED ($rc)") in $((SECONDS - started)) s")
	[[ $rc -eq 0 ]] || failed+=("$stage")
done

echo "compat: ===== summary"
printf 'compat:   %s\n' "${summary[@]}"
if [[ ${#summary[@]} -eq 0 ]]; then
	die "no stage runs any of: ${files[*]}"
fi
# The stages printed their own logs on failure.
[[ ${#failed[@]} -eq 0 ]]
