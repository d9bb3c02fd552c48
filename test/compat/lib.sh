# Shared by run.sh and bench.sh (sourced, not executed): prepares the host and
# runs bin/envd on 127.0.0.1:49983, where the e2b SDK looks for it when
# E2B_DEBUG=true. Callers use `set -euo pipefail`.

COMPAT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$COMPAT_DIR/../.." && pwd)
ENVD_BIN=$REPO_ROOT/bin/envd
# The SDK's debug mode hard-codes http://localhost:49983; the port is not a knob.
ENVD_PORT=49983
ENVD_PID=
# LOG_DIR holds envd.log and the logs of envds that tests start themselves
# (exported as WARREN_COMPAT_LOG_DIR); created by start_envd.
LOG_DIR=
ENVD_LOG=

die() {
	echo "compat: $*" >&2
	exit 1
}

# ensure_root: envd must run as root to act as `user` and `root` per request.
ensure_root() {
	[[ $EUID -eq 0 ]] || die "run as root: envd switches to the request's user (make test runs as root in CI)"
}

# ensure_node_modules installs the pinned SDK when node_modules is missing or
# older than package-lock.json (npm keeps its own copy of the lock inside).
ensure_node_modules() {
	command -v npm >/dev/null || die "npm not found; run ./scripts/setup.sh"
	if [[ ! -f $COMPAT_DIR/node_modules/.package-lock.json ||
		$COMPAT_DIR/package-lock.json -nt $COMPAT_DIR/node_modules/.package-lock.json ]]; then
		echo "compat: npm ci (node_modules missing or stale)"
		(cd "$COMPAT_DIR" && npm ci --no-audit --no-fund)
	fi
}

# ensure_user creates the E2B template account `user` (uid 1000 when free,
# home /home/user, bash) that the SDK acts as by default.
ensure_user() {
	id user >/dev/null 2>&1 && return 0
	local args=(--create-home --home-dir /home/user --shell /bin/bash)
	getent passwd 1000 >/dev/null || args+=(--uid 1000)
	echo "compat: useradd ${args[*]} user"
	useradd "${args[@]}" user
}

# start_envd runs bin/envd in the background on 127.0.0.1:49983 and waits for
# GET /health to answer 204. Sets ENVD_PID and ENVD_LOG.
start_envd() {
	[[ -x $ENVD_BIN ]] || die "$ENVD_BIN is missing; run 'make build' first"
	if (exec 3<>"/dev/tcp/127.0.0.1/$ENVD_PORT") 2>/dev/null; then
		die "port $ENVD_PORT is already in use (another envd?); the SDK's debug mode needs it free"
	fi
	LOG_DIR=$(mktemp -d /tmp/warren-compat.XXXXXX)
	export WARREN_COMPAT_LOG_DIR=$LOG_DIR
	ENVD_LOG=$LOG_DIR/envd.log
	"$ENVD_BIN" --port "$ENVD_PORT" --host 127.0.0.1 >"$ENVD_LOG" 2>&1 &
	ENVD_PID=$!
	local i
	for ((i = 0; i < 100; i++)); do
		if ! kill -0 "$ENVD_PID" 2>/dev/null; then
			cat "$ENVD_LOG" >&2
			ENVD_PID=
			die "envd exited during start (log above)"
		fi
		if [[ $(curl_health) == 204 ]]; then
			echo "compat: envd pid $ENVD_PID on 127.0.0.1:$ENVD_PORT (log $ENVD_LOG)"
			return 0
		fi
		sleep 0.1
	done
	cat "$ENVD_LOG" >&2
	die "envd did not answer GET /health with 204 within 10 s"
}

# curl_health prints the status of GET /health, using bash's /dev/tcp so the
# host needs no curl.
curl_health() {
	local status
	status=$(
		exec 2>/dev/null
		exec 3<>"/dev/tcp/127.0.0.1/$ENVD_PORT" || exit 0
		printf 'GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n' >&3
		head -n1 <&3
	) || true
	status=${status#HTTP/1.1 }
	echo "${status%% *}"
}

# stop_envd stops the envd this script started, by PID: SIGTERM, then SIGKILL
# after 5 s. Safe to call twice.
stop_envd() {
	[[ -n $ENVD_PID ]] || return 0
	kill "$ENVD_PID" 2>/dev/null || true
	local i
	for ((i = 0; i < 50; i++)); do
		kill -0 "$ENVD_PID" 2>/dev/null || break
		sleep 0.1
	done
	kill -9 "$ENVD_PID" 2>/dev/null || true
	wait "$ENVD_PID" 2>/dev/null || true
	ENVD_PID=
}

# stop_test_envds kills, by the PIDs they recorded in LOG_DIR, envds that
# tests started themselves and could not stop (the test runner was killed).
stop_test_envds() {
	[[ -n $LOG_DIR && -d $LOG_DIR ]] || return 0
	local f pid
	for f in "$LOG_DIR"/*.pid; do
		[[ -f $f ]] || continue
		pid=$(<"$f")
		# Only if that PID still runs our envd binary, never a reused PID.
		if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == "$ENVD_BIN"* ]]; then # " (deleted)" after a rebuild
			kill "$pid" 2>/dev/null || true
		fi
	done
}

# print_logs shows every envd log in LOG_DIR, for failures.
print_logs() {
	[[ -n $LOG_DIR && -d $LOG_DIR ]] || return 0
	local f
	for f in "$LOG_DIR"/*.log; do
		[[ -f $f ]] || continue
		echo "----- $f -----" >&2
		cat "$f" >&2
	done
	echo "----- end of envd logs -----" >&2
}

# remove_logs deletes LOG_DIR.
remove_logs() {
	if [[ -n $LOG_DIR ]]; then
		rm -rf "$LOG_DIR"
	fi
	LOG_DIR=
}

# on_exit is the EXIT trap of run.sh and bench.sh: stop envd, print the logs
# if the script failed, remove them, keep the exit code. A closed stdout (say,
# `./run.sh | head`) must not stop the cleanup, so SIGPIPE is ignored here.
on_exit() {
	local rc=$?
	trap '' PIPE
	stop_envd
	stop_test_envds
	if [[ $rc -ne 0 ]]; then
		print_logs || true
	fi
	remove_logs
	exit "$rc"
}
