package supervisor

import (
	"context"
	"log/slog"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// oomJoinWindow bounds the wait for the leaf's OOM event when its counters
// cannot be read. The kernel counts an OOM kill before the victim dies (the
// v1 eventfd fires ~10 ms before Wait returns), so after Wait the counter is
// the joined evidence; the event stream is only the fallback.
const oomJoinWindow = 100 * time.Millisecond

// wait is the one goroutine that calls cmd.Wait for a run. After the main
// process exits it kills whatever is left in the leaf (forked children),
// removes the leaf and reports the exit.
func (s *Supervisor) wait(w *worker, r *run, oom *oomWatch, readers *sync.WaitGroup) {
	defer s.wg.Done()
	// The main pid stays in mainPID only while its zombie pins the number:
	// wait for the exit without reaping, forget the pid, then reap. Reaping
	// first would leave a window (the tree kill, the readers, the leaf
	// removal) in which a new process with the recycled pid is taken for w.
	waitExited(r.pid)
	s.mu.Lock()
	if s.mainPID[r.pid] == w {
		delete(s.mainPID, r.pid)
	}
	s.noteExited(r.pid, time.Now())
	s.mu.Unlock()
	_ = r.cmd.Wait() // the exit status is in ProcessState
	st := r.cmd.ProcessState
	oomed := false
	if sigkilled(st) {
		oomed = s.oomEvidence(r, oom)
	}
	kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := r.leaf.Kill(kctx); err != nil {
		// Error, like terminateRun's: processes may live on unsupervised.
		w.log.Error("emptying the worker's cgroup after its exit failed", slog.Any("err", err))
	}
	cancel()
	// Readers end when every writer (grandchildren included) is gone; after
	// the tree kill that is at once, but never let a stuck fd hold us.
	done := make(chan struct{})
	go func() { readers.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		w.log.Warn("worker output readers still open after exit")
	}
	r.cancel()
	if err := r.leaf.Delete(); err != nil {
		w.log.Warn("removing the worker's cgroup failed", slog.Any("err", err))
	}
	s.onExit(w, r, st, oomed)
	close(r.done)
}

// exitedGrace is how long a reaped main pid's datagrams (sent before it
// died, read after it was reaped) are dropped quietly instead of counted as
// unknown_sender: a worker that says STOPPING=1 and exits must not trip the
// rejected-heartbeats alert when the hive reads its socket late.
const exitedGrace = 5 * time.Second

// noteExited remembers a reaped main pid and forgets those past
// exitedGrace, so the map holds at most the exits of the last few seconds.
// Caller holds s.mu.
func (s *Supervisor) noteExited(pid int, now time.Time) {
	for p, at := range s.exited {
		if now.Sub(at) > exitedGrace {
			delete(s.exited, p)
		}
	}
	s.exited[pid] = now
}

// waitExited blocks until child pid has exited, leaving it unreaped
// (WNOWAIT). On an error (none expected for our own child) it returns at
// once and cmd.Wait does the waiting.
func waitExited(pid int) {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return
		}
	}
}

// sigOrCode reports whether the process ended by a signal.
func sigOrCode(st *os.ProcessState) bool {
	ws, ok := st.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled()
}

func sigkilled(st *os.ProcessState) bool {
	ws, ok := st.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// oomEvidence joins the leaf's OOM counter and its event stream.
func (s *Supervisor) oomEvidence(r *run, oom *oomWatch) bool {
	if oom.n.Load() > 0 {
		return true
	}
	if st, err := r.leaf.Stats(); err == nil {
		return st.OOMKills > 0
	}
	select {
	case <-oom.seen:
		return true
	case <-time.After(oomJoinWindow):
		return false
	}
}

// classify turns a wait status into an exit reason and code.
func classify(st *os.ProcessState, oomed bool) (ExitReason, *int) {
	if oomed {
		return ReasonOOM, nil
	}
	ws, ok := st.Sys().(syscall.WaitStatus)
	if ok && ws.Signaled() {
		sig := int(ws.Signal())
		return ReasonSignaled, &sig
	}
	code := st.ExitCode()
	return ReasonExited, &code
}

// onExit records a run's end and applies the restart policy.
func (s *Supervisor) onExit(w *worker, r *run, st *os.ProcessState, oomed bool) {
	reason, code := classify(st, oomed)
	if reason == ReasonOOM {
		s.m.oomKills.Inc()
	}
	now := time.Now()
	s.mu.Lock()
	defer s.unlock()
	w.run = nil
	w.inFlight = 0
	s.clearDeadline(w)
	attrs := []slog.Attr{slog.String("exit_reason", string(reason)), slog.Int("pid", r.pid),
		slog.Duration("ran", now.Sub(r.started))}
	if code != nil {
		if reason == ReasonSignaled {
			attrs = append(attrs, slog.Int("signal", *code))
		} else {
			attrs = append(attrs, slog.Int("exit_code", *code))
		}
	}
	if w.killReason != "" {
		attrs = append(attrs, slog.String("ordered", string(w.killReason)))
	}
	// Priorities for `journalctl -p warning`: an exit we ordered is routine,
	// a crash is a warning, the OOM killer is an error.
	level, msg := slog.LevelWarn, "worker exited"
	switch {
	case reason == ReasonOOM:
		level, msg = slog.LevelError, "worker killed by the OOM killer"
	case w.killReason == ReasonStopped:
		level = slog.LevelInfo
	}
	w.log.LogAttrs(context.Background(), level, msg, attrs...)
	// A kill we ordered names the reason (stale, load_timeout, stopped), but
	// an OOM that beat it is still an OOM.
	if w.killReason != "" && reason != ReasonOOM {
		reason = w.killReason
	}
	s.m.exits.WithLabelValues(string(reason)).Inc()
	w.exitReason, w.exitCode = reason, code
	w.exitSignaled = code != nil && sigOrCode(st)
	if w.killReason == ReasonStopped || w.noRestart || s.closing {
		s.finish(w, StateStopped, string(reason))
		return
	}
	failure := !(reason == ReasonExited && code != nil && *code == 0)
	if !w.restartPolicy.restartsAfter(failure) {
		if failure {
			s.finish(w, StateFailed, string(reason))
		} else {
			s.finish(w, StateStopped, string(reason))
		}
		return
	}
	s.afterFailure(w, reason, r.started, now, string(reason))
}

// finish makes w terminal: resources released, port freed, kept for
// inspection (or removed if a DELETE asked). Caller holds s.mu and ends
// with s.unlock, which releases the model.
func (s *Supervisor) finish(w *worker, to State, why string) {
	s.clearDeadline(w)
	s.setState(w, to, why)
	releaseClaim(w.claim)
	if w.releaseModel != nil {
		s.afterUnlock = append(s.afterUnlock, w.releaseModel)
		w.releaseModel = nil
	}
	if s.ports[w.port] == w.id {
		delete(s.ports, w.port)
	}
	delete(s.tokens, tokenKey(w.token))
	if w.cancelDownload != nil {
		w.cancelDownload()
		w.cancelDownload = nil
	}
	if w.removeWhenStopped {
		s.removeLocked(w)
		return
	}
	w.logs.close()
	s.pruneTerminal()
}
