// Package sim is rbee-simworker: a synthetic LLM worker that speaks the
// llm-worker-rbee HTTP API and the rbee worker protocol (package
// worker), and can be told to misbehave so the hive's supervision paths
// can be exercised without a GPU or a model.
package sim

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/worker"
)

// Exit codes, chosen so a test can tell a crash from a usage error.
const (
	ExitOK    = 0 // clean shutdown on SIGTERM/SIGINT or ctx end
	ExitCrash = 1 // --crash-after fired: what a crashing worker looks like (no STOPPING=1)
	ExitUsage = 2 // bad flags or environment, bind failure
)

// Config is everything the simulated worker does. Zero durations disable
// the corresponding fault.
type Config struct {
	Port            int // -1: no HTTP server; 0: ephemeral (address is logged)
	WorkerID        string
	Model           string // informative only
	ModelRef        string
	Backend         string
	Device          uint
	APIToken        string // Bearer token for /v1/*; empty: no auth
	LoadTime        time.Duration
	TokensPerSecond float64 // 0: as fast as possible
	AllocMiB        int
	CrashAfter      time.Duration
	HangAfter       time.Duration
	NoHeartbeat     bool
	LeakMiBPerSec   float64
	Chatter         int // stdout lines per second after load
	IgnoreSIGTERM   bool
}

// envPrefix: every flag --foo-bar can also come from RBEE_SIM_FOO_BAR; a
// flag on the command line wins.
const envPrefix = "RBEE_SIM_"

// Parse reads args (without the program name) and the RBEE_SIM_* variables
// through lookup. Usage text goes to out.
func Parse(args []string, lookup func(string) (string, bool), out io.Writer) (Config, error) {
	c := Config{Port: -1}
	fs := flag.NewFlagSet("rbee-simworker", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.IntVar(&c.Port, "port", -1, "HTTP port on 127.0.0.1 (0: any free port, logged as addr=); without it no HTTP server runs")
	fs.StringVar(&c.WorkerID, "worker-id", "", "worker id (default $RBEE_WORKER_ID)")
	fs.StringVar(&c.Model, "model", "", "model path (informative; reported as the SSE model)")
	fs.StringVar(&c.ModelRef, "model-ref", "", "model reference for the HTTP ready callback")
	fs.StringVar(&c.Backend, "backend", "cpu", "backend name for the ready callback")
	fs.UintVar(&c.Device, "device", 0, "device index for the ready callback")
	fs.StringVar(&c.APIToken, "api-token", "", "require Authorization: Bearer <token> on /v1/* (default $LLORCH_API_TOKEN)")
	fs.DurationVar(&c.LoadTime, "load-time", 0, "simulated model load time; /health answers 503 meanwhile")
	fs.Float64Var(&c.TokensPerSecond, "tokens-per-second", 50, "token streaming rate (0: no pacing)")
	fs.IntVar(&c.AllocMiB, "alloc-mib", 0, "allocate and touch this many MiB while loading (RSS grows)")
	fs.DurationVar(&c.CrashAfter, "crash-after", 0, "exit 1 abruptly this long after start (no STOPPING=1)")
	fs.DurationVar(&c.HangAfter, "hang-after", 0, "this long after start, stop answering HTTP and stop heartbeats (wedged)")
	fs.BoolVar(&c.NoHeartbeat, "no-heartbeat", false, "send READY=1 and serve, but never WATCHDOG=1")
	fs.Float64Var(&c.LeakMiBPerSec, "leak-mib-per-sec", 0, "after load, grow memory without bound at this rate, touching pages")
	fs.IntVar(&c.Chatter, "chatter", 0, "after load, write this many numbered lines per second to stdout (\"chatter seq=N ...\", 154 bytes each)")
	fs.BoolVar(&c.IgnoreSIGTERM, "ignore-sigterm", false, "log and ignore SIGTERM (SIGINT still stops)")
	var callback string
	fs.StringVar(&callback, "callback-url", "", "accepted for llm-worker-rbee compatibility and ignored: the hive is reached via NOTIFY_SOCKET or RBEE_HIVE_URL")

	// Environment first, so flags given on the command line override it.
	var envErrs []error
	fs.VisitAll(func(f *flag.Flag) {
		if v, ok := lookup(envPrefix + strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_"))); ok {
			if err := fs.Set(f.Name, v); err != nil {
				envErrs = append(envErrs, fmt.Errorf("%s%s=%q: %w", envPrefix, strings.ToUpper(strings.ReplaceAll(f.Name, "-", "_")), v, err))
			}
		}
	})
	if err := errors.Join(envErrs...); err != nil {
		return c, err
	}
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	if fs.NArg() > 0 {
		return c, fmt.Errorf("unexpected arguments: %q", fs.Args())
	}
	if c.WorkerID == "" {
		c.WorkerID, _ = lookup(worker.EnvWorkerID)
	}
	if c.APIToken == "" {
		c.APIToken, _ = lookup("LLORCH_API_TOKEN")
	}
	if c.ModelRef == "" {
		c.ModelRef = c.Model
	}
	var errs []error
	if c.Port < -1 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("--port %d out of range", c.Port))
	}
	if c.Device > 1<<31 {
		errs = append(errs, fmt.Errorf("--device %d out of range", c.Device))
	}
	for name, d := range map[string]time.Duration{"load-time": c.LoadTime, "crash-after": c.CrashAfter, "hang-after": c.HangAfter} {
		if d < 0 {
			errs = append(errs, fmt.Errorf("--%s must not be negative", name))
		}
	}
	// Negated ranges so that NaN (which ParseFloat accepts) fails them: a
	// NaN leak rate made the leak's make() panic.
	if !(c.TokensPerSecond >= 0 && c.TokensPerSecond <= 1e6) {
		errs = append(errs, fmt.Errorf("--tokens-per-second %v out of range 0..1e6", c.TokensPerSecond))
	}
	if c.AllocMiB < 0 || c.AllocMiB > 1<<20 {
		errs = append(errs, fmt.Errorf("--alloc-mib %d out of range 0..%d", c.AllocMiB, 1<<20))
	}
	if c.Chatter < 0 || c.Chatter > 1_000_000 {
		errs = append(errs, fmt.Errorf("--chatter %d out of range", c.Chatter))
	}
	if !(c.LeakMiBPerSec >= 0 && c.LeakMiBPerSec <= 1<<16) {
		errs = append(errs, fmt.Errorf("--leak-mib-per-sec %v out of range", c.LeakMiBPerSec))
	}
	return c, errors.Join(errs...)
}

func (c Config) modelName() string {
	if c.Model == "" {
		return "model"
	}
	return c.Model
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
