package supervisor

import (
	"context"
	"log/slog"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rbee/rbee-hive/supervisor/notify"
)

// heartbeat-rejection reasons (rbee_hive_heartbeats_rejected_total{reason}).
const (
	rejectUnknownSender = "unknown_sender"
	rejectUnknownWorker = "unknown_worker"
	rejectUnauthorized  = "unauthorized"
	rejectInvalid       = "invalid"
)

var rejectReasons = []string{rejectUnknownSender, rejectUnknownWorker, rejectUnauthorized, rejectInvalid}

// limits on what a datagram may store on a worker.
const (
	maxFigures     = 32
	maxFigureValue = 256
	maxStatus      = 512
	// maxEarly bounds the RBEE_* fields kept from datagrams that beat a
	// run's registration (the figures and RBEE_HEALTH, with room to spare);
	// READY, WATCHDOG, STATUS and STOPPING are always kept.
	maxEarly = maxFigures + 8
)

// HandleNotify is the notify listener's handler (notify.Listener.Serve).
func (s *Supervisor) HandleNotify(msg notify.Message) { s.HandleDatagram(msg.PID, msg.Fields) }

// HandleDatagram takes one sd_notify datagram whose sender the kernel vouched
// for (SO_PASSCRED). The sender must live in a worker's cgroup leaf; a worker
// id in the payload is never trusted.
func (s *Supervisor) HandleDatagram(pid int32, fields map[string]string) {
	if len(fields) == 1 && fields["BARRIER"] != "" {
		// systemd-notify (without --no-block) follows each message with
		// BARRIER=1 from its own short-lived pid, not --pid's; it often exits
		// before we look its cgroup up. The barrier carries no state, so it
		// is neither attributed nor counted as unknown_sender.
		return
	}
	w := s.workerForPID(int(pid))
	if w == nil {
		s.mu.Lock()
		at, late := s.exited[int(pid)]
		s.mu.Unlock()
		if late && time.Since(at) <= exitedGrace {
			// A worker's last words, read after its exit: nothing to do.
			// A newer process with that pid would have been found above.
			return
		}
		s.m.heartbeatsRejected.WithLabelValues(rejectUnknownSender).Inc()
		s.log.Debug("notify datagram from a process outside every worker cgroup", slog.Int("pid", int(pid)))
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if w.run == nil {
		if w.starting {
			// The worker spoke before Start returned; its run is being
			// registered. Keep the fields and apply them then.
			if w.early == nil {
				w.early = make(map[string]string)
			}
			for k, v := range fields {
				switch {
				case k == "READY" || k == "WATCHDOG" || k == "STATUS" || k == "STOPPING":
				case strings.HasPrefix(k, "RBEE_"):
					// Bounded like figures: a worker may not grow the hive's
					// memory by naming new keys before its run is registered.
					if _, ok := w.early[k]; !ok && len(w.early) >= maxEarly {
						continue
					}
				default:
					continue // applyFields ignores it
				}
				w.early[k] = v
			}
			return
		}
		s.m.heartbeatsRejected.WithLabelValues(rejectUnknownSender).Inc()
		return
	}
	s.applyFields(w, fields)
}

// applyFields acts on a datagram from w's current run. Caller holds s.mu.
func (s *Supervisor) applyFields(w *worker, fields map[string]string) {
	if v, ok := fields["STATUS"]; ok {
		w.status = truncate(v, maxStatus)
	}
	if fields["STOPPING"] == "1" && !w.notedStopping {
		w.notedStopping = true
		w.log.Info("worker says it is stopping")
	}
	for k, v := range fields {
		if k == "RBEE_HEALTH" {
			if v == "healthy" || v == "degraded" {
				w.health = v
			}
			continue
		}
		if !strings.HasPrefix(k, "RBEE_") {
			continue
		}
		if w.figures == nil {
			w.figures = make(map[string]string)
		}
		if _, ok := w.figures[k]; ok || len(w.figures) < maxFigures {
			w.figures[k] = truncate(v, maxFigureValue)
		}
	}
	// In http mode the health probe alone decides readiness.
	if fields["READY"] == "1" && w.be.Health != "http" {
		via := "READY=1"
		if w.earlyVia != "" {
			via, w.earlyVia = w.earlyVia, ""
		}
		s.markReady(w, via)
	}
	if fields["WATCHDOG"] == "1" {
		s.heartbeat(w)
	}
}

// truncate cuts s to at most n bytes at a rune boundary: the datagram was
// valid UTF-8 and the API's JSON should stay so.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n]
}

// workerForPID attributes a pid to a worker. A run's main pid is exact
// until we reap it (the zombie pins the number), so it is a map lookup;
// anything else (a child of the worker) is looked up in the cgroup tree
// each time, never cached, because pids are reused.
func (s *Supervisor) workerForPID(pid int) *worker {
	if pid <= 0 {
		return nil
	}
	s.mu.Lock()
	w := s.mainPID[pid]
	s.mu.Unlock()
	if w != nil {
		return w
	}
	id, err := s.deps.Cgroups.LeafOf(pid)
	if err != nil {
		return nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.workers[id]
}

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

// fireDeadlines handles every deadline due at now and returns when the loop
// must wake next.
func (s *Supervisor) fireDeadlines(ctx context.Context, now time.Time) time.Time {
	next := now.Add(time.Hour)
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, w := range s.workers {
		if w.dlKind == dlNone {
			continue
		}
		if w.deadline.After(now) {
			if w.deadline.Before(next) {
				next = w.deadline
			}
			continue
		}
		kind := w.dlKind
		s.clearDeadline(w)
		switch kind {
		case dlLoad:
			if w.run != nil && !w.run.ready && w.pending == "" {
				w.log.Error("worker not ready within the load timeout; killing it", slog.Duration("load_timeout", w.be.LoadTimeout.D()))
				w.pending = ReasonLoadTimeout
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
	if w.run == nil || w.pending != "" || w.state == StateStopping {
		return
	}
	s.m.stale.Inc()
	action := string(s.cfg.Heartbeat.StaleAction)
	w.log.Warn("worker stale: no heartbeat within the threshold",
		slog.Duration("threshold", s.cfg.Heartbeat.StaleThreshold.D()),
		slog.Duration("since_last_heartbeat", now.Sub(w.lastHeartbeat)), slog.String("action", action))
	switch action {
	case "mark":
		s.setState(w, StateStale, "no heartbeat")
	case "kill":
		w.pending, w.noRestart = ReasonStale, true
		s.setState(w, StateStopping, "stale")
		s.stopRunAsync(w, w.run)
	default: // restart
		w.pending = ReasonStale
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
