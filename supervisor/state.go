package supervisor

import (
	"context"
	"log/slog"
	"time"
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

// allStates lists every state, in the order Summary and metrics use.
var allStates = []State{StateDownloading, StateLoading, StateIdle, StateBusy, StateStale,
	StateStopping, StateRestarting, StateStopped, StateFailed}

func (s State) terminal() bool { return s == StateStopped || s == StateFailed }

// ExitReason says why a worker's process ended (or never started).
type ExitReason string

// Exit reasons.
const (
	ReasonExited      ExitReason = "exited"
	ReasonSignaled    ExitReason = "signaled"
	ReasonOOM         ExitReason = "oom"
	ReasonStale       ExitReason = "stale"
	ReasonLoadTimeout ExitReason = "load_timeout"
	ReasonSpawnFailed ExitReason = "spawn_failed"
	ReasonStopped     ExitReason = "stopped"
	// ReasonVRAMLimit: stopped by the monitor for using more VRAM than
	// expected × resources.vram_limit_factor (vram_limit_action = "kill").
	ReasonVRAMLimit ExitReason = "vram_limit"
)

var exitReasons = []ExitReason{ReasonExited, ReasonSignaled, ReasonOOM, ReasonStale, ReasonLoadTimeout, ReasonSpawnFailed,
	ReasonVRAMLimit, ReasonStopped}

// transitions is every state change setState allows, from → to. A move to
// the same state only updates the reason and is always allowed. Nothing
// leaves a terminal state.
var transitions = map[State][]State{
	// the download ends: start (a failed start goes to the backoff), fail,
	// or a stop/shutdown
	StateDownloading: {StateLoading, StateRestarting, StateFailed, StateStopped},
	// ready; a stop, a stale kill or the VRAM monitor; the process ends
	StateLoading: {StateIdle, StateStopping, StateRestarting, StateStopped, StateFailed},
	StateIdle:    {StateBusy, StateStale, StateStopping, StateRestarting, StateStopped, StateFailed},
	StateBusy:    {StateIdle, StateStale, StateStopping, StateRestarting, StateStopped, StateFailed},
	// heartbeats resume; or as for idle
	StateStale: {StateIdle, StateStopping, StateRestarting, StateStopped, StateFailed},
	// the ordered kill ends: restarted (stale restart, VRAM limit) or done
	StateStopping: {StateRestarting, StateStopped, StateFailed},
	// the backoff ends: the next run, or the breaker opens, or a stop
	StateRestarting: {StateLoading, StateFailed, StateStopped},
	StateStopped:    nil,
	StateFailed:     nil,
}

// transitionAllowed reports whether setState may move from → to.
func transitionAllowed(from, to State) bool {
	if from == to {
		return true
	}
	for _, t := range transitions[from] {
		if t == to {
			return true
		}
	}
	return false
}

// StateChanged returns a channel that is closed at the next state change of
// any worker: a caller waiting for one worker to become ready takes it,
// reads the state, and waits on it if that is not the one.
func (s *Supervisor) StateChanged() <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.changed
}

// setState moves w to a new state and logs the transition. A transition
// outside the table is refused: logged at error with both states and
// counted in rbee_hive_worker_illegal_transitions_total, since it means a
// bug, not a worker problem. It reports whether w is now in state to.
// Caller holds s.mu.
func (s *Supervisor) setState(w *worker, to State, reason string) bool {
	from := w.state
	if from == to {
		w.stateReason = reason
		return true
	}
	if !transitionAllowed(from, to) {
		s.m.illegalTransitions.WithLabelValues(string(from), string(to)).Inc()
		w.log.Error("illegal worker state transition refused",
			slog.String("from", string(from)), slog.String("to", string(to)), slog.String("reason", reason))
		return false
	}
	w.state = to
	w.stateReason = reason
	w.lastActivity = time.Now()
	close(s.changed)
	s.changed = make(chan struct{})
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
	return true
}
