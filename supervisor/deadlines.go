package supervisor

import (
	"context"
	"log/slog"
	"time"

	"github.com/rbee/rbee-hive/config"
)

// deadlineKind is what a worker's single deadline is for; the Run loop
// fires it.
type deadlineKind int

const (
	dlNone    deadlineKind = iota
	dlLoad                 // not ready within the backend's load_timeout: kill
	dlStale                // no heartbeat within heartbeat.stale_threshold
	dlRestart              // the restart backoff ended
)

// setDeadline arms w's single deadline and wakes the loop if it may now sleep
// too long. Caller holds s.mu.
func (s *Supervisor) setDeadline(w *worker, kind deadlineKind, at time.Time) {
	earlier := w.deadlineFor == dlNone || at.Before(w.deadlineAt)
	w.deadlineAt, w.deadlineFor = at, kind
	if earlier {
		s.kickLoop()
	}
}

func (s *Supervisor) clearDeadline(w *worker) { w.deadlineFor = dlNone; w.deadlineAt = time.Time{} }

// fireDeadlines handles every deadline due at now and returns when the loop
// must wake next.
func (s *Supervisor) fireDeadlines(ctx context.Context, now time.Time) time.Time {
	next := now.Add(time.Hour)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.workers {
		if w.deadlineFor == dlNone {
			continue
		}
		if w.deadlineAt.After(now) {
			if w.deadlineAt.Before(next) {
				next = w.deadlineAt
			}
			continue
		}
		kind := w.deadlineFor
		s.clearDeadline(w)
		switch kind {
		case dlLoad:
			if w.run != nil && !w.run.ready && w.killReason == "" {
				w.log.Error("worker not ready within the load timeout; killing it", slog.Duration("load_timeout", w.backendCfg.LoadTimeout.D()))
				w.killReason = ReasonLoadTimeout
				s.killRun(w.run)
			}
		case dlStale:
			s.stale(w, now)
		case dlRestart:
			if w.state == StateRestarting && !s.closing {
				s.wg.Add(1)
				go s.restartWorker(w)
			}
		}
	}
	return next
}

// stale applies heartbeat.stale_action to a worker whose deadline passed.
// Caller holds s.mu.
func (s *Supervisor) stale(w *worker, now time.Time) {
	if w.run == nil || w.killReason != "" || w.state == StateStopping {
		return
	}
	s.m.stale.Inc()
	action := s.cfg.Heartbeat.StaleAction
	w.log.Warn("worker stale: no heartbeat within the threshold",
		slog.Duration("threshold", s.cfg.Heartbeat.StaleThreshold.D()),
		slog.Duration("since_last_heartbeat", now.Sub(w.lastHeartbeat)), slog.String("action", string(action)))
	switch action {
	case config.StaleMark:
		s.setState(w, StateStale, "no heartbeat")
	case config.StaleKill:
		w.killReason, w.noRestart = ReasonStale, true
		s.setState(w, StateStopping, "stale")
		s.stopRunAsync(w, w.run)
	default: // config.StaleRestart
		w.killReason = ReasonStale
		s.setState(w, StateStopping, "stale")
		s.stopRunAsync(w, w.run)
	}
}

// killRun kills a run's whole tree now, without a grace period.
func (s *Supervisor) killRun(r *run) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = r.leaf.Kill(ctx)
	}()
}
