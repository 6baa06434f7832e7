// Command rbee-simworker is a synthetic LLM worker for tests, demos and
// benchmarks: the llm-worker-rbee HTTP API, the rbee worker protocol, and
// fault modes. See internal/sim and README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/rbee/rbee-hive/cmd/rbee-simworker/internal/sim"
	"github.com/rbee/rbee-hive/worker"
)

func main() {
	os.Exit(run())
}

func run() int {
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := sim.Parse(os.Args[1:], os.LookupEnv, os.Stderr)
	if errors.Is(err, flag.ErrHelp) {
		return sim.ExitOK
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "rbee-simworker:", err)
		return sim.ExitUsage
	}
	n, err := worker.FromEnv()
	if err != nil {
		fmt.Fprintln(os.Stderr, "rbee-simworker:", err)
		return sim.ExitUsage
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)
	return sim.Run(context.Background(), cfg, n, sigs, log)
}
