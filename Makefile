# rbee-hive — see README.md. `make run` and `make test` work on a fresh machine.
GO       ?= go
BIN      := bin
GOFLAGS  ?=
PKGS     := ./...
# Installed (pinned) by scripts/install-deps.sh test.
STATICCHECK ?= $(or $(shell $(GO) env GOBIN),$(shell $(GO) env GOPATH)/bin)/staticcheck

.PHONY: all build run test unit lint vmtest systemdtest enginetest bench bench-peers dashboards deps deps-run clean

all: build

build:
	$(GO) build -o $(BIN)/rbee-hive ./cmd/rbee-hive
	@if [ -d cmd/rbee-simworker ]; then $(GO) build -o $(BIN)/rbee-simworker ./cmd/rbee-simworker; fi

# deps-run: what running needs; deps: also every tool the tests use.
deps-run:
	bash scripts/install-deps.sh run

deps:
	bash scripts/install-deps.sh test

# Starts the hive in the foreground with the built-in default config and one
# demo worker (the `sim` backend). Ctrl-C stops it and its worker.
run: deps-run build
	$(BIN)/rbee-hive daemon --demo

# Everything CI runs: lint, unit/integration tests on this host (real cgroups
# v1, journald, Prometheus), then the cgroup v2 suite inside a VM, then the
# shipped units under systemd as PID 1 inside a VM.
test: deps lint unit vmtest systemdtest enginetest

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(STATICCHECK) $(PKGS)

# test/engine needs the llama-server that `enginetest` builds; it runs there.
unit: build
	$(GO) test -count=1 -timeout 15m $$($(GO) list $(PKGS) | grep -v '/test/engine$$')

vmtest:
	bash test/vm/run.sh ./cgroup ./supervisor

# The genuine llama.cpp llama-server behind the hive (test/engine): built once
# from node-llama-cpp's source bundle into a cache keyed by its commit
# (~25 min on 2 cores the first time), then reused.
enginetest:
	@bin=$$(bash scripts/build-llama-server.sh | tail -n 1) && \
	  RBEE_LLAMA_SERVER="$$bin" $(GO) test -count=1 -timeout 15m -v -run . ./test/engine

# Boots this host's systemd in qemu, installs the hive with `make install`
# and checks it as an operator would (test/systemd-vm/run.sh).
systemdtest:
	bash test/systemd-vm/run.sh

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
