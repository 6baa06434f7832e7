# rbee-hive — see README.md. `make run` and `make test` work on a fresh machine.
GO       ?= go
BIN      := bin
GOFLAGS  ?=
PKGS     := ./...
# Installed (pinned) by scripts/install-deps.sh test.
STATICCHECK ?= $(or $(shell $(GO) env GOBIN),$(shell $(GO) env GOPATH)/bin)/staticcheck

.PHONY: all build run test unit race fuzz soak lint vmtest systemdtest enginetest bench bench-peers dashboards deps deps-run clean

all: build

build:
	$(GO) build -o $(BIN)/rbee-hive ./cmd/rbee-hive
	CGO_ENABLED=0 $(GO) build -o $(BIN)/rbee-gate ./cmd/rbee-gate
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
# v1, journald, Prometheus), the race detector, fuzzing, a chaos soak, then
# the cgroup v2 suite inside a VM, the shipped units under systemd as PID 1
# inside a VM, and the genuine llama-server behind the hive.
test: deps lint unit race fuzz soak vmtest systemdtest enginetest

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(STATICCHECK) $(PKGS)

# testsum prints one line per package, failed tests in full, every skip
# with its reason, and the count of passed, failed and skipped tests.
# test/engine needs the llama-server that `enginetest` builds; it runs there.
unit: build
	@bash -o pipefail -c '$(GO) test -json -count=1 -timeout 15m $$($(GO) list $(PKGS) | grep -v "/test/engine$$") | $(GO) run ./internal/testsum'

# The packages with concurrency, under the race detector.
RACE_PKGS := ./supervisor/... ./proxy ./model ./admission
race: build
	@bash -o pipefail -c '$(GO) test -json -race -count=1 -timeout 20m $(RACE_PKGS) | $(GO) run ./internal/testsum'

# Every fuzz target for FUZZTIME each (package:Target); corpora live in
# <package>/testdata/fuzz/<Target>, and a crasher found lands there too.
# A count, not a duration: with -fuzztime=5s Go 1.26's coordinator fails a
# target with "context deadline exceeded" and no crasher on a busy machine
# (golang/go#75804, fixed in Go 1.27). 10000 runs take 2-30 s per target.
FUZZTIME ?= 10000x
FUZZ := ./supervisor/notify:FuzzParse ./supervisor:FuzzSpawnBody ./supervisor:FuzzHeartbeatBody \
	./supervisor:FuzzReadyBody ./model:FuzzParseRef ./model:FuzzDownloadBody ./config:FuzzLoad ./proxy:FuzzStream
fuzz:
	@for t in $(FUZZ); do echo "fuzz $$t $(FUZZTIME)"; \
		bash -o pipefail -c "$(GO) test -run '^\$$' -fuzz '^$${t#*:}\$$' -fuzztime $(FUZZTIME) $${t%%:*} 2>&1 | grep -v '^fuzz: elapsed'" || exit 1; done

# A chaos run against a real hive (test/soak): SOAK_DURATION=2m in CI.
SOAK_DURATION ?= 2m
soak: build
	SOAK_DURATION=$(SOAK_DURATION) $(GO) test -count=1 -timeout 30m -v -run '^TestSoak$$' ./test/soak

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
