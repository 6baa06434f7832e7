package supervisor

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"strconv"
	"time"
)

// RestartPolicy says which exits a worker is restarted after.
type RestartPolicy string

// Restart policies.
const (
	RestartNever     RestartPolicy = "never"
	RestartOnFailure RestartPolicy = "on-failure"
	RestartAlways    RestartPolicy = "always"
)

// restartsAfter reports whether the policy restarts a run that ended as a
// failure (or, with failure false, cleanly).
func (p RestartPolicy) restartsAfter(failure bool) bool {
	return p == RestartAlways || (p == RestartOnFailure && failure)
}

// backoff is min(base·2^(n-1), max) with ±jitter, for the n-th consecutive
// failure (n ≥ 1).
func backoff(base, max time.Duration, jitter float64, n int) time.Duration {
	if base <= 0 {
		return 0
	}
	d := base
	for i := 1; i < n && d < max; i++ {
		d *= 2
	}
	if d > max {
		d = max
	}
	if jitter > 0 {
		d = time.Duration(float64(d) * (1 + jitter*(2*rand.Float64()-1)))
	}
	return d
}

// afterFailure applies the restart policy's timing to a run that ended (or
// failed to start) and should be restarted: reset after a stable run,
// circuit breaker, then a backoff. OOM exits go through the same backoff,
// so a worker whose limit is too small never hot-loops. Caller holds s.mu.
func (s *Supervisor) afterFailure(w *worker, reason ExitReason, started, now time.Time, why string) {
	rc := s.cfg.Workers.Restart
	if now.Sub(started) >= rc.StableAfter.D() {
		w.consecutiveFailures = 0
		w.recentFailures = w.recentFailures[:0]
	}
	w.consecutiveFailures++
	keep := w.recentFailures[:0]
	for _, t := range w.recentFailures {
		if now.Sub(t) < rc.FailureWindow.D() {
			keep = append(keep, t)
		}
	}
	w.recentFailures = append(keep, now)
	if len(w.recentFailures) >= rc.MaxFailures {
		// finish logs the move to failed at error level, with this reason.
		s.finish(w, StateFailed, fmt.Sprintf("circuit breaker: %d failures within %s (last: %s)", len(w.recentFailures), rc.FailureWindow.D(), why))
		return
	}
	delay := backoff(rc.BackoffBase.D(), rc.BackoffMax.D(), rc.Jitter, w.consecutiveFailures)
	w.killReason = reason // the restart's reason, for the metric
	s.setState(w, StateRestarting, fmt.Sprintf("%s; restart in %s", why, delay.Round(time.Millisecond)))
	s.setDeadline(w, dlRestart, now.Add(delay))
}

// restartWorker starts the next run of a worker whose backoff ended.
func (s *Supervisor) restartWorker(w *worker) {
	defer s.wg.Done()
	s.mu.Lock()
	if w.state != StateRestarting || s.closing {
		s.mu.Unlock()
		return
	}
	reason := w.killReason
	w.restartCount++
	w.lastRestart = time.Now()
	n := w.restartCount
	s.mu.Unlock()
	s.m.restarts.WithLabelValues(string(reason)).Inc()
	w.log.Info("restarting worker", slog.Int("restart_count", n), slog.String("reason", string(reason)))
	if s.deps.Admitter != nil {
		// Bounded: the ledger may wait for VRAM freed by the dead run to show.
		ctx, cancel := context.WithTimeout(context.Background(), restartAdmitTimeout)
		err := s.admitAgain(ctx, w)
		cancel()
		if err != nil {
			// A refusal is a failed start: backoff and the circuit breaker apply.
			s.startFailed(w, &spawnError{reason: failAdmission, err: fmt.Errorf("admission for the restart: %w", err)})
			return
		}
	}
	if err := s.ensurePort(w); err != nil {
		s.startFailed(w, &spawnError{reason: failPorts, err: err})
		return
	}
	if err := s.startRun(w, "restart after "+string(reason)); err != nil {
		s.startFailed(w, err)
	}
}

// ensurePort checks, before a restart, that the worker's port can still be
// bound. Another process may have taken it while the worker was down; the
// worker would then fail to bind on every restart until the circuit breaker
// gave up. A taken port is replaced by a fresh one, which changes the
// worker's URL (logged; the API shows the new one).
func (s *Supervisor) ensurePort(w *worker) error {
	s.mu.Lock()
	old := w.port
	s.mu.Unlock()
	if s.portFree(s.cfg.WorkerHost, old) {
		return nil
	}
	port, err := s.allocPort(w.id)
	if err != nil {
		return fmt.Errorf("port %d is taken and no other is free: %w", old, err)
	}
	s.mu.Lock()
	if s.ports[old] == w.id {
		delete(s.ports, old)
	}
	w.port = port
	w.url = "http://" + net.JoinHostPort(s.cfg.WorkerHost, strconv.Itoa(port))
	s.mu.Unlock()
	w.log.Warn("worker port taken while it was down; restarting on another", slog.Int("old_port", old), slog.Int("port", port))
	return nil
}

// restartAdmitTimeout bounds a restart's admission.
const restartAdmitTimeout = 30 * time.Second
