package supervisor

import (
	"log/slog"
	"time"
)

// markReady moves a loading worker to idle and arms its stale deadline.
// Caller holds s.mu.
func (s *Supervisor) markReady(w *worker, via string) {
	if w.run == nil {
		return
	}
	now := time.Now()
	if !w.run.ready {
		w.run.ready = true
		w.lastHeartbeat = now
		if w.claim != nil {
			w.claim.Loaded(w.run.pid)
		}
		w.log.Info("worker ready", slog.String("via", via), slog.Duration("load_time", now.Sub(w.run.started)))
	}
	if w.state == StateLoading || w.state == StateStale {
		s.setState(w, StateIdle, "ready ("+via+")")
	}
	s.setDeadline(w, dlStale, now.Add(s.cfg.Heartbeat.StaleThreshold.D()))
}

// heartbeat records a sign of life. Before READY only the time is kept (the
// load timeout applies); after it, the stale deadline moves. setDeadline
// wakes the loop only when the worker had no deadline (a marked-stale worker
// whose heartbeats resume): otherwise the loop finds the later deadline when
// the old one comes due. Caller holds s.mu.
func (s *Supervisor) heartbeat(w *worker) {
	s.m.heartbeats.Inc()
	now := time.Now()
	w.lastHeartbeat = now
	if w.run == nil || !w.run.ready {
		return
	}
	if w.state == StateStale {
		s.setState(w, StateIdle, "heartbeat resumed")
	}
	if w.state == StateStopping {
		return
	}
	s.setDeadline(w, dlStale, now.Add(s.cfg.Heartbeat.StaleThreshold.D()))
}
