package supervisor

import (
	"bytes"
	"log/slog"
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
	// rejectUIDMismatch: the sender's pid lives in a worker's leaf but its
	// uid is not the worker's.
	rejectUIDMismatch = "uid_mismatch"
)

var rejectReasons = []string{rejectUnknownSender, rejectUnknownWorker, rejectUnauthorized, rejectInvalid, rejectUIDMismatch}

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
func (s *Supervisor) HandleNotify(msg notify.Message) {
	s.handleDatagram(msg.PID, msg.UID, &msg.Fields)
}

// handleDatagram takes one sd_notify datagram whose sender the kernel vouched
// for (SO_PASSCRED). The sender must live in a worker's cgroup leaf and run
// as the worker's uid; a worker id in the payload is never trusted. A sender
// in no leaf (gone before we looked: systemd-notify's own short-lived pid)
// is attributed by its uid alone when that uid is a worker's own. Without
// CAP_SYS_ADMIN and CAP_SETUID a worker can name neither another pid nor
// another uid (docs/worker-protocol.md). A heartbeat from a run's main pid
// takes one lock section and allocates nothing (fields views the receive
// buffer; strings are made only for a STATUS or figure that changed).
func (s *Supervisor) handleDatagram(pid int32, uid uint32, fields *notify.Fields) {
	if onlyBarrier(fields) {
		// systemd-notify (without --no-block) follows each message with
		// BARRIER=1 from its own short-lived pid, not --pid's; it often exits
		// before we look its cgroup up. The barrier carries no state, so it
		// is neither attributed nor counted as unknown_sender.
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	// A run's main pid is exact until we reap it (the zombie pins the
	// number), so it is a map lookup; anything else (a child of the worker)
	// is looked up in the cgroup tree each time, never cached, because pids
	// are reused. The lookup reads /proc: not under s.mu.
	var w *worker
	if pid > 0 {
		w = s.mainPID[int(pid)]
		if w == nil {
			s.mu.Unlock()
			id, err := s.deps.Cgroups.LeafOf(int(pid))
			s.mu.Lock()
			if err == nil {
				w = s.workers[id]
			}
		}
	}
	switch {
	case w != nil && w.iso != nil && w.iso.UID != uid:
		s.m.heartbeatsRejected.WithLabelValues(rejectUIDMismatch).Inc()
		w.log.Debug("notify datagram from the worker's cgroup with another uid", slog.Int("pid", int(pid)), slog.Uint64("uid", uint64(uid)))
		return
	case w == nil:
		if at, late := s.exited[int(pid)]; pid > 0 && late && time.Since(at) <= exitedGrace {
			// A worker's last words, read after its exit: nothing to do.
			// A newer process with that pid would have been found above.
			return
		}
		if w = s.workerOfUID(uid); w == nil {
			s.m.heartbeatsRejected.WithLabelValues(rejectUnknownSender).Inc()
			s.log.Debug("notify datagram from a process outside every worker cgroup", slog.Int("pid", int(pid)), slog.Uint64("uid", uint64(uid)))
			return
		}
	}
	if w.run == nil {
		if w.startInFlight {
			// The worker spoke before Start returned; its run is being
			// registered. Keep the fields and apply them then.
			s.keepEarly(w, fields)
			return
		}
		s.m.heartbeatsRejected.WithLabelValues(rejectUnknownSender).Inc()
		return
	}
	s.applyFields(w, fields)
}

// workerOfUID is the worker that runs under uid as a uid of its own (never
// a shared system user or root). Caller holds s.mu.
func (s *Supervisor) workerOfUID(uid uint32) *worker {
	id, ok := s.ids.alloc.WorkerOf(uid)
	if !ok {
		return nil
	}
	w := s.workers[id]
	if w == nil || w.iso == nil || w.iso.UID != uid || w.backendCfg.User != userPerWorker {
		return nil
	}
	return w
}

// onlyBarrier reports whether every assignment is a non-empty BARRIER.
func onlyBarrier(f *notify.Fields) bool {
	for i := range f.Len() {
		if string(f.Key(i)) != workerproto.KeyBarrier {
			return false
		}
	}
	v, ok := f.Lookup(workerproto.KeyBarrier)
	return ok && len(v) > 0
}

// keepEarly stores what applyFields will need from a datagram that beat its
// run's registration. Caller holds s.mu.
func (s *Supervisor) keepEarly(w *worker, fields *notify.Fields) {
	if w.earlyFields == nil {
		w.earlyFields = make(map[string]string)
	}
	for i := range fields.Len() {
		k := fields.Key(i)
		switch {
		case string(k) == workerproto.KeyReady || string(k) == workerproto.KeyWatchdog || string(k) == workerproto.KeyStatus || string(k) == workerproto.KeyStopping:
		case bytes.HasPrefix(k, []byte(workerproto.FigurePrefix)):
			// Bounded like figures: a worker may not grow the hive's
			// memory by naming new keys before its run is registered.
			if _, ok := w.earlyFields[string(k)]; !ok && len(w.earlyFields) >= maxEarly {
				continue
			}
		default:
			continue // applyFields ignores it
		}
		w.earlyFields[string(k)] = string(fields.Value(i))
	}
}

// applyEarly applies the fields kept by keepEarly. Caller holds s.mu.
func (s *Supervisor) applyEarly(w *worker) {
	var b []byte
	for k, v := range w.earlyFields {
		b = append(append(append(append(b, k...), '='), v...), '\n')
	}
	var f notify.Fields
	if len(b) > 0 && f.Parse(b) == nil { // they were parsed once already
		s.applyFields(w, &f)
	}
}

// applyFields acts on a datagram from w's current run. Caller holds s.mu.
func (s *Supervisor) applyFields(w *worker, fields *notify.Fields) {
	if v, ok := fields.Lookup(workerproto.KeyStatus); ok {
		if v = truncate(v, maxStatus); string(v) != w.statusLine {
			w.statusLine = string(v)
		}
	}
	if fields.Is(workerproto.KeyStopping, "1") && !w.stoppingLogged {
		w.stoppingLogged = true
		w.log.Info("worker says it is stopping")
	}
	if v, ok := fields.Lookup(workerproto.KeyHealth); ok {
		// The constants, not string(v): a heartbeat must not allocate.
		switch workerproto.HealthStatus(v) {
		case workerproto.Healthy:
			w.reportedHealth = string(workerproto.Healthy)
		case workerproto.Degraded:
			w.reportedHealth = string(workerproto.Degraded)
		}
	}
	// In order, so a repeated figure ends with its last value.
	for i := range fields.Len() {
		k := fields.Key(i)
		if !bytes.HasPrefix(k, []byte(workerproto.FigurePrefix)) || string(k) == workerproto.KeyHealth {
			continue
		}
		v := truncate(fields.Value(i), maxFigureValue)
		old, ok := w.figures[string(k)]
		switch {
		case ok && old == string(v):
		case ok || len(w.figures) < maxFigures:
			if w.figures == nil {
				w.figures = make(map[string]string)
			}
			w.figures[string(k)] = string(v)
		}
	}
	// In http mode the health probe alone decides readiness.
	if fields.Is(workerproto.KeyReady, "1") && w.backendCfg.Health != config.HealthHTTP {
		via := "READY=1"
		if w.earlyReadyVia != "" {
			via, w.earlyReadyVia = w.earlyReadyVia, ""
		}
		s.markReady(w, via)
	}
	if fields.Is(workerproto.KeyWatchdog, "1") {
		s.heartbeat(w)
	}
}

// truncate cuts b to at most n bytes at a rune boundary: the datagram was
// valid UTF-8 and the API's JSON should stay so.
func truncate(b []byte, n int) []byte {
	if len(b) <= n {
		return b
	}
	for n > 0 && !utf8.RuneStart(b[n]) {
		n--
	}
	return b[:n]
}
