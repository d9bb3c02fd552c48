#!/usr/bin/env bash
# Host setup for building and testing warren on Debian 12, as root. Idempotent:
# installs only what is missing (apt-get update only when something is) and
# says what it does. Go is not installed here: it is checked, with directions.
set -euo pipefail

GO_MIN=1.26
NODE_MIN=20.18.1 # npm e2b 2.51.0 engines: >=20.18.1 <21 || >=22

# --test also sets up what the tests need beyond running warren: Node.js and npm
# for the SDK compatibility tests. `make up` runs without it, `.ci/run` with it.
with_tests=false
case "${1:-}" in
--test) with_tests=true ;;
"") ;;
*)
	echo "usage: $0 [--test]" >&2
	exit 2
	;;
esac

say() { echo "setup: $*"; }
die() {
	echo "setup: $*" >&2
	exit 1
}

# version_ge A B: A >= B for dotted versions.
version_ge() { [[ $(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1) == "$2" ]]; }

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'; }

[[ $EUID -eq 0 ]] || die "run as root (it installs Debian packages)"
command -v apt-get >/dev/null || die "apt-get not found: this script supports Debian 12"

# Packages the build and warren need:
#   make, git        build (Makefile, version stamp)
#   protobuf-compiler  make generate
#   ca-certificates  Go module proxy and npm registry over TLS
#   qemu-system-x86, qemu-utils  the microVM runtime (QEMU microvm machine, qemu-img overlays)
#   debootstrap, e2fsprogs       the Debian base template (rootfs tree → ext4 with mkfs.ext4 -d, debugfs)
#   iproute2, nftables           network slots (the code uses netlink/nftables directly; ip/nft for diagnosis)
want=(make git protobuf-compiler ca-certificates qemu-system-x86 qemu-utils debootstrap e2fsprogs iproute2 nftables)
# and with --test, what the tests need too:
#   passwd           useradd, for the test account `user`
#   coreutils, bash, procps  commands the tests run inside envd (stty, tty, whoami, sleep, pkill)
#   busybox-static   tiny root images in the VM boot tests
#   gcc, libc6-dev   static test programs built for x86-64-v2 and v3 (the guest CPU tests)
#   postgresql       the Postgres store's tests start a private server with its binaries
#   python3, python3-matplotlib  the code interpreter server's tests run it on the host (figures too)
if [[ $with_tests == true ]]; then
	want+=(passwd coreutils bash procps busybox-static gcc libc6-dev postgresql python3 python3-matplotlib)
fi

# Node.js: the SDK tests need >= $NODE_MIN. Debian 12's nodejs (18) is too old,
# so it is only installed from apt when the configured repositories offer a
# new enough version (for example NodeSource's, which bundles npm).
node_ok=true
if [[ $with_tests == true ]]; then
	node_ok=false
fi
if [[ $with_tests == true ]] && command -v node >/dev/null && version_ge "$(node --version | tr -d v)" "$NODE_MIN"; then
	node_ok=true
	say "node $(node --version) present"
fi

missing=()
for pkg in "${want[@]}"; do
	installed "$pkg" || missing+=("$pkg")
done

if [[ ${#missing[@]} -gt 0 || $node_ok == false ]]; then
	say "apt-get update"
	apt-get update -qq
fi

if [[ $node_ok == false ]]; then
	candidate=$(apt-cache policy nodejs | awk '/Candidate:/ {print $2}')
	if [[ -n $candidate && $candidate != "(none)" ]] && version_ge "${candidate#*:}" "$NODE_MIN"; then
		missing+=(nodejs)
	else
		die "Node.js >= $NODE_MIN is required (apt offers '${candidate:-none}').
  Add NodeSource's repository (https://github.com/nodesource/distributions) for Node 20 or 22,
  or install a release from https://nodejs.org/en/download, then rerun this script."
	fi
fi

if [[ ${#missing[@]} -gt 0 ]]; then
	say "apt-get install ${missing[*]}"
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
	say "Debian packages present: ${want[*]}"
fi

# npm ships with NodeSource's nodejs; Debian's own nodejs needs the npm package.
if [[ $with_tests == true ]]; then
	if ! command -v npm >/dev/null; then
		say "apt-get install npm"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends npm
	fi
	say "npm $(npm --version) present"
fi

# Go >= $GO_MIN: from PATH or the usual /usr/local/go.
go_bin=$(command -v go || true)
[[ -z $go_bin && -x /usr/local/go/bin/go ]] && go_bin=/usr/local/go/bin/go
if [[ -z $go_bin ]]; then
	die "Go >= $GO_MIN not found. Install it from https://go.dev/dl/:
  curl -fsSL https://go.dev/dl/go${GO_MIN}.0.linux-amd64.tar.gz | tar -C /usr/local -xz
  export PATH=\$PATH:/usr/local/go/bin"
fi
go_version=$("$go_bin" env GOVERSION)
go_version=${go_version#go}
version_ge "$go_version" "$GO_MIN" ||
	die "Go $go_version at $go_bin is older than $GO_MIN; get a newer one from https://go.dev/dl/"
say "go $go_version present ($go_bin)"
if ! command -v go >/dev/null; then
	say "note: $(dirname "$go_bin") is not on PATH; add it before running make"
fi
say "done"
