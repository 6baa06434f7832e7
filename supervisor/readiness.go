package supervisor

import (
	"errors"
	"log/slog"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/procfs"
)

// markReady moves a loading worker to idle and arms its stale deadline.
// A run becomes ready only when its port's listener is its own (see
// readyPort). Caller holds s.mu.
func (s *Supervisor) markReady(w *worker, via string) {
	if w.run == nil {
		return
	}
	now := time.Now()
	if !w.run.ready && !s.readyPort(w, w.run, via) {
		return
	}
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

// portHeld checks that every socket listening on w's port belongs to run r:
// by the socket's uid for a worker with a uid of its own (only it runs as
// that uid), else by the socket inodes among the leaf's fds. Costs
// 0.1-0.7 ms (docs/security.md): called at readiness and at the proxy's
// first request, never per token.
func (s *Supervisor) portHeld(w *worker, r *run) error {
	if w.backendCfg.User == userPerWorker && w.iso != nil {
		return s.portCheck.PortHeldBy(w.port, w.iso.UID)
	}
	pids, err := r.leaf.Pids()
	if err != nil {
		return err
	}
	_, err = s.portCheck.PortOwner(w.port, pids)
	return err
}

// readyPort reports whether run r may be marked ready as far as its port
// goes. A squatter (a listener of another process on the worker's port) is
// logged and counted once per run, and the run stays loading: the http
// poller keeps asking, and the load timeout ends it. Nothing listening is
// fine for a READY=1 or callback (the worker may bind later; the proxy
// checks at its first request), but not for an http 200, which someone
// must have answered. Caller holds s.mu.
func (s *Supervisor) readyPort(w *worker, r *run, via string) bool {
	err := s.portHeld(w, r)
	switch {
	case err == nil:
		return true
	case errors.Is(err, procfs.ErrSquatter):
		if !r.squatterLogged {
			r.squatterLogged = true
			s.m.portSquatters.Inc()
			w.log.Error("worker not marked ready: another process listens on its port", slog.String("via", via),
				slog.Int("port", w.port), slog.Any("err", err))
		}
		return false
	case errors.Is(err, procfs.ErrNoListener):
		if w.backendCfg.Health == config.HealthHTTP {
			return false
		}
		w.log.Debug("worker ready before it listens on its port", slog.String("via", via), slog.Int("port", w.port))
		return true
	default:
		w.log.Warn("worker not marked ready: its port's owner could not be checked", slog.Int("port", w.port), slog.Any("err", err))
		return false
	}
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
