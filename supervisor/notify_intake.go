package supervisor

import (
	"log/slog"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/supervisor/notify"
	workerproto "github.com/rbee/rbee-hive/worker"
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
func (s *Supervisor) HandleNotify(msg notify.Message) { s.handleDatagram(msg.PID, msg.Fields) }

// handleDatagram takes one sd_notify datagram whose sender the kernel vouched
// for (SO_PASSCRED). The sender must live in a worker's cgroup leaf; a worker
// id in the payload is never trusted.
func (s *Supervisor) handleDatagram(pid int32, fields map[string]string) {
	if len(fields) == 1 && fields[workerproto.KeyBarrier] != "" {
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
		if w.startInFlight {
			// The worker spoke before Start returned; its run is being
			// registered. Keep the fields and apply them then.
			if w.earlyFields == nil {
				w.earlyFields = make(map[string]string)
			}
			for k, v := range fields {
				switch {
				case k == workerproto.KeyReady || k == workerproto.KeyWatchdog || k == workerproto.KeyStatus || k == workerproto.KeyStopping:
				case strings.HasPrefix(k, workerproto.FigurePrefix):
					// Bounded like figures: a worker may not grow the hive's
					// memory by naming new keys before its run is registered.
					if _, ok := w.earlyFields[k]; !ok && len(w.earlyFields) >= maxEarly {
						continue
					}
				default:
					continue // applyFields ignores it
				}
				w.earlyFields[k] = v
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
	if v, ok := fields[workerproto.KeyStatus]; ok {
		w.statusLine = truncate(v, maxStatus)
	}
	if fields[workerproto.KeyStopping] == "1" && !w.stoppingLogged {
		w.stoppingLogged = true
		w.log.Info("worker says it is stopping")
	}
	for k, v := range fields {
		if k == workerproto.KeyHealth {
			if h := workerproto.HealthStatus(v); h == workerproto.Healthy || h == workerproto.Degraded {
				w.reportedHealth = v
			}
			continue
		}
		if !strings.HasPrefix(k, workerproto.FigurePrefix) {
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
	if fields[workerproto.KeyReady] == "1" && w.backendCfg.Health != config.HealthHTTP {
		via := "READY=1"
		if w.earlyReadyVia != "" {
			via, w.earlyReadyVia = w.earlyReadyVia, ""
		}
		s.markReady(w, via)
	}
	if fields[workerproto.KeyWatchdog] == "1" {
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
