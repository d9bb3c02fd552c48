# warren — make targets. `make up` and `make test` are the two commands of the README.
SHELL := /bin/bash
GO    ?= go
BIN   := bin
# The guest agent must run in any rootfs: static, no cgo.
ENVD_FLAGS := CGO_ENABLED=0
VERSION := $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -s -w -X github.com/warren-sh/warren/internal/version.Version=$(VERSION)

.PHONY: all setup setup-test build generate test test-go test-compat up clean bench

all: build

## setup: install the host packages warren needs (Debian, run as root).
setup:
	./scripts/setup.sh

## setup-test: also what the tests need (Node.js >= 20.18.1 and npm, PostgreSQL, busybox-static...).
setup-test:
	./scripts/setup.sh --test

## build: bin/warren (host binary) and bin/envd (static guest agent).
build:
	@mkdir -p $(BIN)
	$(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/warren ./cmd/warren
	$(ENVD_FLAGS) $(GO) build -trimpath -ldflags '$(LDFLAGS)' -o $(BIN)/envd ./cmd/envd

## generate: protobuf and connect code under gen/ (committed; rerun after editing proto/).
generate:
	@mkdir -p $(BIN)
	$(GO) build -o $(BIN)/protoc-gen-go google.golang.org/protobuf/cmd/protoc-gen-go
	$(GO) build -o $(BIN)/protoc-gen-connect-go connectrpc.com/connect/cmd/protoc-gen-connect-go
	rm -rf gen && mkdir -p gen
	protoc -I proto \
	  --plugin=protoc-gen-go=$(BIN)/protoc-gen-go --go_out=gen --go_opt=module=github.com/warren-sh/warren/gen \
	  --plugin=protoc-gen-connect-go=$(BIN)/protoc-gen-connect-go --connect-go_out=gen --connect-go_opt=module=github.com/warren-sh/warren/gen \
	  $$(cd proto && find * -name '*.proto' | sort)

## test: every test: Go unit and integration tests, then the npm SDK compatibility tests.
test: setup-test build test-go test-compat

test-go:
	$(GO) vet ./...
	# One package at a time: the VM packages share the host-wide network-slot lock.
	$(GO) test -p 1 -count=1 -timeout 30m ./...

test-compat: build
	cd test/compat && ./run.sh

## bench: `warren bench` (TTI, commands, files, density, pause through the npm SDK, each beside its floor; needs the
## host's network slots, so no `warren up` or VM tests meanwhile; report, plot and samples in $(BENCH_OUT)), then the
## envd-only SDK benchmarks. Results go into BENCHMARKS.md by hand. Flags through WARREN_BENCH_* (see warren bench --help).
BENCH_OUT ?= /var/tmp/warren-bench/report
bench: build
	$(BIN)/warren bench --out $(BENCH_OUT)
	cd test/compat && ./bench.sh

## up: install what is missing, build, and run warren.
up: setup build
	$(BIN)/warren up

clean:
	rm -rf $(BIN)
