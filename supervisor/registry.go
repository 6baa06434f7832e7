package supervisor

import (
	"context"
	"log/slog"
	"os/exec"
	"sort"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
)

// State is a worker's lifecycle state.
type State string

// States. downloading and restarting have no process; stopped and failed are
// terminal.
const (
	StateDownloading State = "downloading"
	StateLoading     State = "loading"
	StateIdle        State = "idle"
	StateBusy        State = "busy"
	StateStale       State = "stale"
	StateStopping    State = "stopping"
	StateStopped     State = "stopped"
	StateFailed      State = "failed"
	StateRestarting  State = "restarting"
)

// AllStates lists every state, in the order Summary and metrics use.
var allStates = []State{StateDownloading, StateLoading, StateIdle, StateBusy, StateStale,
	StateStopping, StateRestarting, StateStopped, StateFailed}

func (s State) terminal() bool { return s == StateStopped || s == StateFailed }

// Exit reasons.
const (
	ReasonExited      = "exited"
	ReasonSignaled    = "signaled"
	ReasonOOM         = "oom"
	ReasonStale       = "stale"
	ReasonLoadTimeout = "load_timeout"
	ReasonSpawnFailed = "spawn_failed"
	ReasonStopped     = "stopped"
	// ReasonVRAMLimit: stopped by the monitor for using more VRAM than
	// expected × resources.vram_limit_factor (vram_limit_action = "kill").
	ReasonVRAMLimit = "vram_limit"
)

var exitReasons = []string{ReasonExited, ReasonSignaled, ReasonOOM, ReasonStale, ReasonLoadTimeout, ReasonSpawnFailed,
	ReasonVRAMLimit, ReasonStopped}

// Restart policies.
const (
	RestartNever     = "never"
	RestartOnFailure = "on-failure"
	RestartAlways    = "always"
)

// deadline kinds, driven by the Run loop.
type deadlineKind int

const (
	dlNone deadlineKind = iota
	dlLoad
	dlStale
	dlRestart
)

// maxTerminal bounds how many stopped/failed workers stay listed.
const maxTerminal = 256

// worker is one registered worker. Fields after mu-guarded are guarded by
// Supervisor.mu.
type worker struct {
	// fixed at spawn
	id        string
	backend   string
	be        config.Backend
	device    int
	gpuUUID   string
	modelRef  string
	modelPath string
	port      int
	url       string
	token     string
	policy    string
	memLimit  int64
	vram      int64
	// vramExpected is the VRAM the worker should need (the request's
	// vram_bytes, else the admitter's estimate); 0: unknown, no limit.
	vramExpected uint64
	reqEnv       map[string]string
	created      time.Time
	claim        Claim
	modelRel     func() // releases the model store's in-use mark
	logs         *logSink
	log          *slog.Logger

	// mu-guarded
	state         State
	reason        string // why the last transition happened
	exitReason    string
	exitCode      *int
	exitSignaled  bool // exitCode is a signal number
	health        string
	status        string
	figures       map[string]string
	notedStopping bool
	lastActivity  time.Time
	lastHeartbeat time.Time
	lastRestart   time.Time
	restartCount  int
	consecutive   int
	failures      []time.Time
	deadline      time.Time
	dlKind        deadlineKind
	inflight      int
	healthFails   int
	run           *run
	starting      bool              // a process is being started for w
	early         map[string]string // datagram fields that beat the run's registration
	earlyVia      string            // how an early READY came in, for the log
	// pending is the reason a kill was ordered for (stale, load_timeout,
	// stopped); noRestart says the kill is final.
	pending     string
	noRestart   bool
	removeAfter bool // DELETE: drop from the registry once stopped
	terminalAt  time.Time
	cancelPre   context.CancelFunc // download in progress
}

// run is one process of a worker.
type run struct {
	leaf    cgroup.Leaf
	cmd     *exec.Cmd
	pid     int
	started time.Time
	ready   bool
	cancel  context.CancelFunc // health poller, OOM watch
	done    chan struct{}      // closed after the exit was handled
	// monitor results, guarded by Supervisor.mu
	sample   *resourceSample
	overVRAM bool // over the VRAM limit at the last sample (one log per crossing)
}

// setState moves w to a new state and logs the transition. Caller holds s.mu.
func (s *Supervisor) setState(w *worker, to State, reason string) {
	from := w.state
	if from == to {
		w.reason = reason
		return
	}
	w.state = to
	w.reason = reason
	w.lastActivity = time.Now()
	if to.terminal() {
		w.terminalAt = w.lastActivity
	}
	// failed is an incident (breaker open, model not to be had, a crash
	// with nothing to restart it): it belongs in `journalctl -p err`.
	level := slog.LevelInfo
	if to == StateFailed {
		level = slog.LevelError
	}
	w.log.LogAttrs(context.Background(), level, "worker state",
		slog.String("from", string(from)), slog.String("to", string(to)), slog.String("reason", reason))
}

// setDeadline arms w's single deadline and wakes the loop if it may now sleep
// too long. Caller holds s.mu.
func (s *Supervisor) setDeadline(w *worker, kind deadlineKind, at time.Time) {
	earlier := w.dlKind == dlNone || at.Before(w.deadline)
	w.deadline, w.dlKind = at, kind
	if earlier {
		s.kickLoop()
	}
}

func (s *Supervisor) clearDeadline(w *worker) { w.dlKind = dlNone; w.deadline = time.Time{} }

// pruneTerminal drops the oldest terminal workers beyond maxTerminal. Caller holds s.mu.
func (s *Supervisor) pruneTerminal() {
	var term []*worker
	for _, w := range s.workers {
		if w.state.terminal() {
			term = append(term, w)
		}
	}
	if len(term) <= maxTerminal {
		return
	}
	sort.Slice(term, func(i, j int) bool { return term[i].terminalAt.Before(term[j].terminalAt) })
	for _, w := range term[:len(term)-maxTerminal] {
		s.removeLocked(w)
	}
}

// removeLocked drops w from the registry. Caller holds s.mu and ends with
// s.unlock, which deletes the log files.
func (s *Supervisor) removeLocked(w *worker) {
	delete(s.workers, w.id)
	delete(s.tokens, tokenKey(w.token))
	if s.ports[w.port] == w.id {
		delete(s.ports, w.port)
	}
	s.afterUnlock = append(s.afterUnlock, w.logs.remove)
}
