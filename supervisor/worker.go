package supervisor

import (
	"context"
	"log/slog"
	"os/exec"
	"sync"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
)

// worker is one registered worker. The fields under "guarded by s.mu" are
// read and written only with Supervisor.mu held.
type worker struct {
	// fixed at spawn
	id            string
	backend       string
	backendCfg    config.Backend
	device        int
	gpuUUID       string
	modelRef      string
	modelPath     string // set when a download ends, under s.mu
	served        string // the served model it was started for ("": none)
	contextSize   int    // for memory estimates: the served model's or the backend's
	port          int
	url           string
	token         string   // "" for an adopted worker (its row holds only the hash) until its next run
	tokenHash     [32]byte // tokenKey(token): the key in Supervisor.tokens
	restartPolicy RestartPolicy
	memoryLimit   int64 // bytes; the cgroup's memory.max
	// vramRequested is the request's vram_bytes (0: let the admitter
	// estimate); vramExpected is what the worker should need (the request's
	// figure, else the admitter's estimate; 0: unknown, no limit).
	vramRequested uint64
	vramExpected  uint64
	requestEnv    map[string]string
	createdAt     time.Time
	adoptedAt     time.Time // a restarted hive took this worker over (guarded by s.mu)
	claim         Claim
	releaseModel  func() // ends the model store's in-use mark
	logs          *logSink
	outShipped    outputOffsets // how far its output files are shipped
	log           *slog.Logger
	// iso is who the worker runs as, set at its first start (under s.mu)
	// and kept across restarts; home is its HOME.
	iso  *cgroup.Isolation
	home string

	// guarded by s.mu
	state          State
	stateReason    string // why the last transition happened
	exitReason     ExitReason
	exitCode       *int
	exitSignaled   bool   // exitCode is a signal number
	reportedHealth string // RBEE_HEALTH or health_status: healthy, degraded
	statusLine     string // the last STATUS=
	figures        map[string]string
	stoppingLogged bool // the run's STOPPING=1 was logged
	lastActivity   time.Time
	lastHeartbeat  time.Time
	lastRestart    time.Time
	restartCount   int
	// consecutiveFailures sets the backoff; recentFailures (within
	// workers.restart.failure_window) trips the circuit breaker.
	consecutiveFailures int
	recentFailures      []time.Time
	deadlineAt          time.Time
	deadlineFor         deadlineKind
	inFlight            int // inference requests being proxied
	failedHealthChecks  int
	run                 *run
	startInFlight       bool              // a process is being started for w
	earlyFields         map[string]string // datagram fields that beat the run's registration
	earlyReadyVia       string            // how an early READY came in, for the log
	// killReason is the reason a kill was ordered for (stale,
	// load_timeout, stopped, vram_limit); noRestart says the kill is final.
	killReason        ExitReason
	noRestart         bool
	removeWhenStopped bool // DELETE: drop from the registry once stopped
	terminalAt        time.Time
	cancelDownload    context.CancelFunc // download in progress
}

// run is one process of a worker.
type run struct {
	leaf    cgroup.Leaf
	cmd     *exec.Cmd
	pid     int
	started time.Time
	ready   bool
	// portOwned: the proxy found the port held by this run (checked at the
	// first request after readiness, again after a failed health check);
	// squatterLogged: a squatter on the port was logged and counted once.
	portOwned      bool
	squatterLogged bool
	cancel         context.CancelFunc // health poller
	done           chan struct{}      // closed after the exit was handled
	output         sync.WaitGroup     // the stdout and stderr readers (pipes)
	tailed         [2]*tailedFile     // stdout and stderr files (nil: pipes)
	// pidStart (clock ticks since boot) and pid name the process across a
	// hive restart; argv is what it was started with. For the registry.
	pidStart uint64
	argv     []string
	// adopted: the process was started by an earlier hive and is not our
	// child (no exit status); oomBase is its leaf's OOM count at adoption.
	adopted bool
	oomBase uint64
	// monitor results, guarded by Supervisor.mu
	sample   *resourceSample
	overVRAM bool // over the VRAM limit at the last sample (one log per crossing)
}
