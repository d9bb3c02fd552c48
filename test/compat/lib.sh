# Shared by run.sh and bench.sh (sourced, not executed): prepares the host,
# runs bin/envd on 127.0.0.1:49983, where the e2b SDK looks for it when
# E2B_DEBUG=true, and runs `bin/warren up` for the API stages. Callers use
# `set -euo pipefail`.

COMPAT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$COMPAT_DIR/../.." && pwd)
ENVD_BIN=$REPO_ROOT/bin/envd
# The SDK's debug mode hard-codes http://localhost:49983; the port is not a knob.
ENVD_PORT=49983
ENVD_PID=
# LOG_DIR holds envd.log, warren-<stage>.log and the logs of envds that tests
# start themselves (exported as WARREN_COMPAT_LOG_DIR); made by ensure_log_dir.
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
	ensure_log_dir
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

# ensure_log_dir makes LOG_DIR once and exports it as WARREN_COMPAT_LOG_DIR.
ensure_log_dir() {
	[[ -n $LOG_DIR ]] && return 0
	LOG_DIR=$(mktemp -d /tmp/warren-compat.XXXXXX)
	export WARREN_COMPAT_LOG_DIR=$LOG_DIR
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

# print_logs shows every log in LOG_DIR, for failures: envd logs whole, the
# last WARREN_LOG_LINES lines of each warren log (its start prints the cold
# base build).
print_logs() {
	[[ -n $LOG_DIR && -d $LOG_DIR ]] || return 0
	local f printed=
	for f in "$LOG_DIR"/*.log; do
		[[ -f $f ]] || continue
		printed=1
		if [[ $(basename "$f") == warren-* ]]; then
			echo "----- $f (last $WARREN_LOG_LINES lines) -----" >&2
			tail -n "$WARREN_LOG_LINES" "$f" >&2
		else
			echo "----- $f -----" >&2
			cat "$f" >&2
		fi
	done
	if [[ -n $printed ]]; then
		echo "----- end of logs -----" >&2
	fi
}

# remove_logs deletes LOG_DIR.
remove_logs() {
	if [[ -n $LOG_DIR ]]; then
		rm -rf "$LOG_DIR"
	fi
	LOG_DIR=
}

# on_exit is the EXIT trap of run.sh and bench.sh: stop envd and warren, print
# the logs if the script failed, remove them, keep the exit code. A closed
# stdout (say, `./run.sh | head`) must not stop the cleanup, so SIGPIPE is
# ignored here.
on_exit() {
	local rc=$?
	trap '' PIPE
	stop_started
	if [[ $rc -ne 0 ]]; then
		print_logs || true
	fi
	remove_logs
	exit "$rc"
}

# on_stage_exit is the EXIT trap of one run.sh stage (a subshell with its own
# LOG_DIR): like on_exit, but the logs stay for the script to remove.
on_stage_exit() {
	local rc=$?
	trap '' PIPE
	stop_started
	if [[ $rc -ne 0 ]]; then
		print_logs || true
	fi
	exit "$rc"
}

# stop_started stops, by PID, every process this shell started.
stop_started() {
	stop_node
	stop_envd
	stop_warren
	stop_test_envds
}

NODE_PID=

# run_node runs `node "$@"` in the background and waits for it: a signal to
# this shell then runs its trap at once (which stops node through stop_node)
# instead of after the whole test run.
run_node() {
	node "$@" &
	NODE_PID=$!
	local rc=0
	# wait returns early when a trap ran (the api stage's SIGUSR1 restart):
	# wait again while node runs.
	while :; do
		rc=0
		wait "$NODE_PID" || rc=$?
		kill -0 "$NODE_PID" 2>/dev/null || break
	done
	NODE_PID=
	return "$rc"
}

# stop_node stops the node run_node started and the test processes it started
# (the test runner does not pass its SIGTERM on), by PID.
stop_node() {
	[[ -n $NODE_PID ]] || return 0
	local pids
	pids="$NODE_PID $(descendants "$NODE_PID" | tr '\n' ' ')"
	# shellcheck disable=SC2086 # a list of PIDs
	kill -TERM $pids 2>/dev/null || true
	wait "$NODE_PID" 2>/dev/null || true
	NODE_PID=
}

# ---- bin/warren up (API stages) ----

WARREN_BIN=$REPO_ROOT/bin/warren
# compat's own data directory, never the Go tests' cache: its warren starts on
# a fresh store each stage and collects template storage at start, so it must
# not share base builds with test binaries that may be restoring them. Its
# store and key file are reset each stage; templates stay for the next run.
# Exported for the tests that run warren commands on it (templates/lib.mjs).
WARREN_DATA=${WARREN_COMPAT_DATA_DIR:-/var/tmp/warren-compat}
export WARREN_COMPAT_DATA_DIR=$WARREN_DATA
# The Go tests' cache of the guest kernel and base root image (their
# cacheDir): seed_warren_data hard-links those from it so that a cold run
# builds only its own base template (a boot and a snapshot), not the image
# (debootstrap: minutes). Empty: no seeding.
WARREN_SEED_FROM=${WARREN_COMPAT_SEED_FROM-/var/tmp/warren-test-cache}
# The first API key of the empty store (WARREN_BOOTSTRAP_API_KEY). Loopback
# only, and the store is new each time, so a fixed value is fine.
WARREN_API_KEY=e2b_0c0ffee00c0ffee00c0ffee00c0ffee00c0ffee0
# A cold base build takes minutes; 15 min leaves room for a slow mirror.
WARREN_READY_TIMEOUT=${WARREN_COMPAT_READY_TIMEOUT:-900}
# SIGTERM makes warren pause its sandboxes with autoPause (within its
# --shutdown-timeout, 2 min by default) and kill the others before it exits.
WARREN_STOP_TIMEOUT=150
WARREN_LOG_LINES=300
WARREN_PID=
WARREN_LOG=
WARREN_LOCK_FD=

# lock_warren_data takes an exclusive lock on the data directory for the rest
# of the script (two runs must not reset each other's store), then seeds it.
lock_warren_data() {
	[[ -n $WARREN_LOCK_FD ]] && return 0
	if [[ -n $WARREN_SEED_FROM && $(realpath -m "$WARREN_DATA") == "$(realpath -m "$WARREN_SEED_FROM")" ]]; then
		die "the compat data dir $WARREN_DATA is the Go tests' cache: its warren would reset the store and collect template storage there; give WARREN_COMPAT_DATA_DIR a directory of its own"
	fi
	mkdir -p "$WARREN_DATA"
	exec {WARREN_LOCK_FD}>"$WARREN_DATA/compat.lock"
	flock -n "$WARREN_LOCK_FD" || die "$WARREN_DATA is in use by another compat run (lock $WARREN_DATA/compat.lock)"
	seed_warren_data
}

# seed_warren_data hard-links the guest kernel (kernels/) and the base root
# image (templates/base/rootfs.ext4, manifest.json) from WARREN_SEED_FROM into
# WARREN_DATA where WARREN_DATA has none, as `warren bench --seed-from` does;
# nothing else, so no base build, store or cache entry is shared. Those files
# are only ever replaced by rename, never written in place, so either side
# replacing its own leaves the other's intact. Without them (nothing to link,
# another file system) warren fetches and builds its own, as on a fresh host.
seed_warren_data() {
	local from=$WARREN_SEED_FROM to=$WARREN_DATA
	[[ -n $from ]] || return 0
	if [[ ! -e $to/kernels && -d $from/kernels ]]; then
		# Whole kernel directories, not .fetch-* (a download under way),
		# into a temporary directory renamed into place: warren takes one
		# kernel (several are an error) and would take a half-linked one.
		local tmp k ok=1
		tmp=$(mktemp -d "$to/.kernels-seed.XXXXXX")
		for k in "$from"/kernels/*/; do
			[[ -d $k ]] || continue
			cp -al "${k%/}" "$tmp/" 2>/dev/null || ok=
		done
		if [[ -n $ok ]] && mv -T "$tmp" "$to/kernels" 2>/dev/null; then
			echo "compat: linked the guest kernel from $from/kernels"
		else
			rm -rf "$tmp"
			echo "compat: could not link the guest kernel from $from (another file system?); warren fetches its own"
		fi
	fi
	local img=$from/templates/base base=$to/templates/base
	if [[ ! -e $base/manifest.json && -f $img/manifest.json ]]; then
		mkdir -p "$base"
		# Under the image's lock (internal/image's .lock, shared): a rebuild
		# there replaces the image, then its manifest, so this links a pair.
		# The manifest last: without it, warren takes the image for a
		# leftover and builds its own.
		if (
			flock -s 9 &&
				ln -f "$img/rootfs.ext4" "$base/rootfs.ext4" &&
				ln -f "$img/manifest.json" "$base/manifest.json"
		) 9>>"$img/.lock" 2>/dev/null; then
			echo "compat: linked the base root image from $img"
		else
			rm -f "$base/manifest.json"
			echo "compat: could not link the base root image from $img (another file system?); warren builds its own"
		fi
	fi
}

# free_port prints a free TCP port on 127.0.0.1.
free_port() {
	node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close() })'
}

# port_busy reports whether something listens on 127.0.0.1:$1.
port_busy() {
	(exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# start_warren NAME ADDR [FLAGS...] runs `bin/warren up --data-dir WARREN_DATA
# --listen ADDR FLAGS` with WARREN_BOOTSTRAP_API_KEY on a fresh store, prints
# its output (prefixed) until it prints `ready`, and fails when it exits first
# or WARREN_READY_TIMEOUT passes. Sets WARREN_PID and WARREN_LOG.
start_warren() {
	local name=$1 addr=$2
	shift 2
	[[ -x $WARREN_BIN ]] || die "$WARREN_BIN is missing; run 'make build' first"
	[[ -z $WARREN_PID ]] || die "start_warren: warren pid $WARREN_PID still runs"
	ensure_log_dir
	lock_warren_data
	# A fresh store per stage: sandboxes, keys and list results of earlier
	# runs must not leak into this one. The template cache stays. A restart
	# (restart_warren) keeps the store.
	if [[ -z ${WARREN_KEEP_STORE:-} ]]; then
		rm -f "$WARREN_DATA"/warren.db "$WARREN_DATA"/warren.db-* "$WARREN_DATA/api-key"
	fi
	WARREN_LOG=$LOG_DIR/warren-$name.log
	echo "compat: bin/warren up --data-dir $WARREN_DATA --listen $addr $* (log $WARREN_LOG)"
	: >"$WARREN_LOG" # before the reads below: the child opens it only once it runs
	WARREN_BOOTSTRAP_API_KEY=$WARREN_API_KEY "$WARREN_BIN" up \
		--data-dir "$WARREN_DATA" --listen "$addr" "$@" \
		>"$WARREN_LOG" 2>&1 {WARREN_LOCK_FD}>&- &
	WARREN_PID=$!
	local started=$SECONDS printed=0 lines
	for (( ; ; )); do
		# Complete lines only, as they come, so CI shows a cold build's progress.
		lines=$(wc -l <"$WARREN_LOG")
		if ((lines > printed)); then
			sed -n "$((printed + 1)),${lines}p" "$WARREN_LOG" | sed 's/^/  warren| /'
			printed=$lines
		fi
		if grep -qx 'ready' "$WARREN_LOG"; then
			break
		fi
		if ! kill -0 "$WARREN_PID" 2>/dev/null; then
			local rc=0
			wait "$WARREN_PID" || rc=$?
			WARREN_PID=
			sed -n "$((printed + 1)),\$p" "$WARREN_LOG" | sed 's/^/  warren| /'
			die "warren exited with status $rc before printing 'ready' (log above)"
		fi
		if ((SECONDS - started > WARREN_READY_TIMEOUT)); then
			die "warren did not print 'ready' within $WARREN_READY_TIMEOUT s (log above)"
		fi
		sleep 0.2
	done
	echo "compat: warren pid $WARREN_PID ready on $addr after $((SECONDS - started)) s"
	echo "$WARREN_PID" >"$LOG_DIR/warren.pid"
}

# restart_warren NAME ADDR [FLAGS...] stops warren and starts it again on the
# same store (tests of state that outlives a restart: paused sandboxes).
# $LOG_DIR/warren.pid is empty in between, then holds the new PID.
restart_warren() {
	: >"$LOG_DIR/warren.pid"
	stop_warren
	WARREN_KEEP_STORE=1 start_warren "$@"
}

# descendants PID prints the PIDs of PID's children, grandchildren, ...
# (QEMU runs in a session of its own but is still warren's child).
descendants() {
	local child
	for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
		echo "$child"
		descendants "$child"
	done
}

# stop_warren stops the warren this script started, by PID: SIGTERM (it pauses
# or kills its sandboxes on the way out), then, after WARREN_STOP_TIMEOUT, SIGKILL to it
# and to every process it had started. Safe to call twice.
stop_warren() {
	[[ -n $WARREN_PID ]] || return 0
	local pid=$WARREN_PID started=$SECONDS
	WARREN_PID=
	kill -TERM "$pid" 2>/dev/null || true
	while kill -0 "$pid" 2>/dev/null && ((SECONDS - started < WARREN_STOP_TIMEOUT)); do
		sleep 0.2
	done
	if kill -0 "$pid" 2>/dev/null; then
		local stray
		stray=$(descendants "$pid" | tr '\n' ' ')
		echo "compat: warren pid $pid still runs $WARREN_STOP_TIMEOUT s after SIGTERM; SIGKILL to it and its processes ${stray:-(none)}" >&2
		# shellcheck disable=SC2086 # a list of PIDs
		kill -KILL "$pid" $stray 2>/dev/null || true
	fi
	local rc=0
	wait "$pid" 2>/dev/null || rc=$?
	echo "compat: warren pid $pid exited with status $rc, $((SECONDS - started)) s after SIGTERM"
}
