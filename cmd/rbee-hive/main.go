// Command rbee-hive is the rbee node agent: `rbee-hive daemon` supervises LLM
// inference workers in cgroups; the other subcommands are the operator CLI.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
)

// version is reported by /v1/health and the build-info metric.
var version = "0.1.0" // a release build sets it: -ldflags "-X main.version=..."

const usage = `rbee-hive — the rbee node agent

Usage:
  rbee-hive daemon [--config FILE] [--listen ADDR] [--token-file FILE] [--log-format FMT]
  rbee-hive config [--config FILE]          print the effective configuration
  rbee-hive status                          hive health and worker summary
  rbee-hive upgrade [--pid PID]             re-exec the hive (PID, default $MAINPID) as the binary on disk, keeping its workers
  rbee-hive workers ls|spawn|stop|logs ...  manage workers
  rbee-hive models ls|pull|rm ...           manage models
  rbee-hive detect                          cgroup mode, controllers, GPUs
  rbee-hive version

Client commands take --url (default $RBEE_HIVE_URL or http://127.0.0.1:9200),
--token-file, or $LLORCH_API_TOKEN; without them they read the hive's
<state_dir>/api-token. --json prints machine-readable output.
`

func main() {
	runGate()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// errUsage marks errors that should print the usage text.
var errUsage = errors.New("usage")

// run dispatches a subcommand and returns the process exit code.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	var err error
	switch args[0] {
	case "daemon":
		err = runDaemon(ctx, args[1:], stderr)
	case "config":
		err = runConfig(args[1:], stdout)
	case "status":
		err = runStatus(ctx, args[1:], stdout)
	case "workers", "worker":
		err = runWorkers(ctx, args[1:], stdout)
	case "models", "model":
		err = runModels(ctx, args[1:], stdout, stderr)
	case "upgrade":
		err = runUpgrade(ctx, args[1:], stdout)
	case "detect":
		err = runDetect(ctx, args[1:], stdout)
	case "version", "--version":
		fmt.Fprintln(stdout, "rbee-hive", version)
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "rbee-hive: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	switch {
	case err == nil:
		return 0
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.Is(err, errUsage):
		fmt.Fprintf(stderr, "rbee-hive: %v\n\n%s", err, usage)
		return 2
	default:
		fmt.Fprintf(stderr, "rbee-hive: %v\n", err)
		return 1
	}
}
