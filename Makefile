# rbee-hive — see README.md. `make run` and `make test` work on a fresh machine.
GO       ?= go
BIN      := bin
GOFLAGS  ?=
PKGS     := ./...

.PHONY: all build run test unit lint vmtest bench bench-peers dashboards deps clean

all: build

build:
	$(GO) build -o $(BIN)/rbee-hive ./cmd/rbee-hive
	@if [ -d cmd/rbee-simworker ]; then $(GO) build -o $(BIN)/rbee-simworker ./cmd/rbee-simworker; fi

deps:
	bash scripts/install-deps.sh

# Starts the hive in the foreground with the built-in default config and one
# demo worker (the `sim` backend). Ctrl-C stops it and its worker.
run: deps build
	$(BIN)/rbee-hive daemon --demo

# Everything CI runs: lint, unit/integration tests on this host (real cgroups
# v1, journald, Prometheus), then the cgroup v2 suite inside a VM.
test: deps lint unit vmtest

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

unit: build
	$(GO) test -count=1 -timeout 15m $(PKGS)

vmtest:
	bash test/vm/run.sh ./cgroup ./supervisor

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

# The hive against supervisord and a raw notify receiver, one ratio per line
# (bench/peers.sh; root; installs Debian's supervisor package if missing).
bench-peers:
	sh bench/peers.sh

dashboards:
	$(GO) run ./dashboards/gen

clean:
	rm -rf $(BIN) .cache

-include install.mk
