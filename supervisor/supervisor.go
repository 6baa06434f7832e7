package supervisor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/reaper"
	"github.com/rbee/rbee-hive/internal/workerstore"
	"github.com/rbee/rbee-hive/procfs"
)

// Supervisor runs the workers of one host.
type Supervisor struct {
	cfg     *config.Config
	deps    Deps
	log     *slog.Logger
	m       *metrics
	logDir  string
	client  *http.Client // health polls
	devices []GPUDevice  // GPUs known at start, for metric series
	// portFree probes whether a port can be bound (a seam for tests).
	portFree func(host string, port int) bool
	ids      *identities
	// noIsolation starts workers as the hive's own root with every
	// capability, as before isolation: only BenchmarkSpawnIsolation's
	// baseline sets it (guarded by mu).
	noIsolation bool
	portCheck   PortChecker

	mu       sync.Mutex
	workers  map[string]*worker
	tokens   map[[32]byte]string // sha256(token) → worker id
	mainPID  map[int]*worker     // main pid of each live run: exact until reaped
	exited   map[int]time.Time   // main pids reaped lately (see exitedGrace)
	ports    map[int]string      // port → worker id holding it
	closing  bool                // Shutdown started: no spawns, no restarts
	nextPort int                 // where the next port scan starts
	starting sync.WaitGroup      // startRun calls in flight (Shutdown waits)
	// afterUnlock is work that finish and removeLocked hand to unlock: the
	// model store's release writes its catalog and a removal unlinks log
	// files, disk I/O that must not stall everything else behind s.mu.
	afterUnlock []func()
	// changed is closed and replaced at every worker state change
	// (StateChanged).
	changed chan struct{}

	out    outputPoller // every run's stdout and stderr pipes (the fallback)
	tail   outputTailer // every run's stdout and stderr files
	outDir string       // the output files
	// store is the durable registry (nil: workers.adopt is off); proc
	// reads process identities for it.
	store *workerstore.Store
	proc  *procfs.Reader
	// reaper reports every run's exit (exitReaper starts it; nil if it
	// could not start); Shutdown closes it.
	reaperOnce sync.Once
	reaper     *reaper.Reaper

	kick  chan struct{}
	probe chan chan struct{}
	wedge chan (<-chan struct{})

	wg sync.WaitGroup // goroutines that outlive a request (waiters, starters)
}

// New builds a Supervisor. Call Run to drive its deadlines.
func New(cfg *config.Config, deps Deps) (*Supervisor, error) {
	if cfg == nil {
		return nil, errors.New("supervisor: nil config")
	}
	if deps.Cgroups == nil {
		return nil, errors.New("supervisor: a cgroup manager is required")
	}
	if deps.Logger == nil {
		deps.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	s := &Supervisor{
		cfg:      cfg,
		deps:     deps,
		log:      deps.Logger.With(slog.String("component", "supervisor")),
		logDir:   filepath.Join(cfg.StateDir, "workers"),
		outDir:   filepath.Join(cfg.StateDir, "output"),
		client:   &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true, Proxy: nil}},
		portFree: portFree,
		workers:  make(map[string]*worker),
		tokens:   make(map[[32]byte]string),
		mainPID:  make(map[int]*worker),
		exited:   make(map[int]time.Time),
		ports:    make(map[int]string),
		changed:  make(chan struct{}),
		kick:     make(chan struct{}, 1),
		probe:    make(chan chan struct{}),
		wedge:    make(chan (<-chan struct{})),
	}
	ids, err := newIdentities(cfg, deps.HostFiles)
	if err != nil {
		return nil, fmt.Errorf("supervisor: %w", err)
	}
	s.ids = ids
	s.portCheck = deps.Ports
	if s.portCheck == nil {
		r, err := procfs.New("")
		if err != nil {
			return nil, fmt.Errorf("supervisor: %w", err)
		}
		s.portCheck = r
	}
	// Worker logs stay root's: workers are in the state dir's group, not
	// in this dir's.
	if err := os.MkdirAll(s.logDir, 0o750); err != nil {
		return nil, fmt.Errorf("supervisor: worker log dir: %w", err)
	}
	if err := os.Chmod(s.logDir, 0o750); err != nil {
		return nil, fmt.Errorf("supervisor: worker log dir: %w", err)
	}
	s.tail.log, s.tail.punchEvery = s.log, int64(cfg.Workers.LogMaxBytes)
	if err := os.MkdirAll(s.outDir, 0o700); err != nil {
		return nil, fmt.Errorf("supervisor: worker output dir: %w", err)
	}
	if err := s.openStore(); err != nil {
		return nil, fmt.Errorf("supervisor: %w", err)
	}
	if s.store == nil {
		// Nothing will be adopted: earlier workers' files go now (with a
		// registry, Adopt keeps those of the workers it takes over).
		s.removeStaleFiles(nil)
	}
	if deps.GPUs != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		devs, err := deps.GPUs.GPUDevices(ctx)
		cancel()
		if err != nil {
			s.log.Warn("listing GPUs for metrics failed", slog.Any("err", err))
		}
		s.devices = devs
	}
	m, err := newMetrics(s, deps.Registry)
	if err != nil {
		return nil, err
	}
	s.m = m
	return s, nil
}

// Run drives deadlines (load timeouts, stale workers, restart backoffs),
// samples the workers' resources and answers Alive probes until ctx ends.
// Call Shutdown afterwards.
func (s *Supervisor) Run(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	// The resource monitor runs beside the deadline loop: a slow cgroup or
	// GPU read must not delay a deadline or an Alive probe.
	var mon sync.WaitGroup
	mon.Add(1)
	go func() { defer mon.Done(); newMonitor(s).run(ctx) }()
	defer mon.Wait()
	for {
		next := s.fireDeadlines(ctx, time.Now())
		timer.Reset(time.Until(next))
		select {
		case <-ctx.Done():
			return nil
		case <-s.kick:
		case <-timer.C:
		case p := <-s.probe:
			close(p)
		case release := <-s.wedge:
			// Test hook: the loop is stuck until release closes (or ctx ends).
			select {
			case <-release:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

func (s *Supervisor) kickLoop() {
	select {
	case s.kick <- struct{}{}:
	default:
	}
}

// Alive reports whether the Run loop answers within ctx: the systemd
// watchdog ping is sent only when it does.
func (s *Supervisor) Alive(ctx context.Context) error {
	p := make(chan struct{})
	select {
	case s.probe <- p:
	case <-ctx.Done():
		return fmt.Errorf("supervisor loop not responding: %w", ctx.Err())
	}
	select {
	case <-p:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("supervisor loop not responding: %w", ctx.Err())
	}
}

// Summary is one line for systemd's STATUS=, e.g. "3 workers: 2 idle, 1 loading".
func (s *Supervisor) Summary() string {
	s.mu.Lock()
	counts := make(map[State]int)
	for _, w := range s.workers {
		counts[w.state]++
	}
	n := len(s.workers)
	s.mu.Unlock()
	if n == 0 {
		return "0 workers"
	}
	var parts []string
	for _, st := range allStates {
		if c := counts[st]; c > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", c, st))
		}
	}
	noun := "workers"
	if n == 1 {
		noun = "worker"
	}
	return fmt.Sprintf("%d %s: %s", n, noun, strings.Join(parts, ", "))
}

// unlock releases s.mu, then runs the work queued by finish and
// removeLocked in this critical section. Every section that may call them
// ends with unlock instead of s.mu.Unlock.
func (s *Supervisor) unlock() {
	fns := s.afterUnlock
	s.afterUnlock = nil
	s.mu.Unlock()
	for _, f := range fns {
		f()
	}
}

// removeStaleFiles deletes the log and output files of earlier workers that
// keep does not want (nil: all): they belong to workers that no longer
// exist, and nothing else ever deletes them.
func (s *Supervisor) removeStaleFiles(keep func(id string) bool) {
	if n, err := removeStaleLogs(s.logDir, keep); err != nil {
		s.log.Warn("removing earlier workers' log files", slog.Any("err", err))
	} else if n > 0 {
		s.log.Info("removed earlier workers' log files", slog.Int("files", n), slog.String("dir", s.logDir))
	}
	if err := s.ids.removeStaleHomes(keep); err != nil {
		s.log.Warn("removing earlier workers' homes", slog.Any("err", err))
	}
	if n, err := removeStaleOutput(s.outDir, keep); err != nil {
		s.log.Warn("removing earlier workers' output files", slog.Any("err", err))
	} else if n > 0 {
		s.log.Info("removed earlier workers' output files", slog.Int("files", n), slog.String("dir", s.outDir))
	}
}
