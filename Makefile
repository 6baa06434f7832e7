# rbee-hive — see README.md. `make run` and `make test` work on a fresh machine.
GO       ?= go
BIN      := bin
GOFLAGS  ?=
PKGS     := ./...

.PHONY: all build run test unit lint vmtest systemdtest bench dashboards deps clean

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
# v1, journald, Prometheus), then the cgroup v2 suite inside a VM, then the
# shipped units under systemd as PID 1 inside a VM.
test: deps lint unit vmtest systemdtest

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)

unit: build
	$(GO) test -count=1 -timeout 15m $(PKGS)

vmtest:
	bash test/vm/run.sh ./cgroup ./supervisor

# Boots this host's systemd in qemu, installs the hive with `make install`
# and checks it as an operator would (test/systemd-vm/run.sh).
systemdtest:
	bash test/systemd-vm/run.sh

bench: build
	$(GO) test -run '^$$' -bench . -benchtime 2s ./...

dashboards:
	$(GO) run ./dashboards/gen

clean:
	rm -rf $(BIN) .cache

-include install.mk
