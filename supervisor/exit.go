package supervisor

import (
	"context"
	"log/slog"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/internal/reaper"
)

// watchExit waits for r's main process and hands its status to onExit, on
// a goroutine of r's own that waits on the shared reaper's report (a
// goroutine parked on a channel: no OS thread per run). Should the reaper
// be unavailable, or close before the exit, the goroutine waits in waitid
// itself, as every run did before the reaper.
func (s *Supervisor) watchExit(w *worker, r *run) {
	var exits <-chan reaper.Exit
	if rp := s.exitReaper(w); rp != nil {
		var err error
		// hold: the zombie keeps the pid ours until forgetMainPID ran.
		if exits, err = rp.Watch(r.pid, true); err != nil {
			w.log.Warn("reaper cannot watch the worker; waiting for it with a thread of its own", slog.Any("err", err))
		}
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		if exits != nil {
			if ex, ok := <-exits; ok && ex.Known {
				s.forgetMainPID(w, r)
				if err := ex.Release(); err != nil {
					w.log.Warn("reaping the worker's process failed", slog.Any("err", err))
				}
				_ = r.cmd.Process.Release() // reaped: no cmd.Wait
				s.onExit(w, r, waitStatus(ex))
				return
			}
		}
		// The main pid stays in mainPID only while its zombie pins the
		// number: wait for the exit without reaping, forget the pid, then
		// reap. Reaping first would leave a window (the tree kill, the
		// readers, the leaf removal) in which a new process with the
		// recycled pid is taken for w.
		waitExited(r.pid)
		s.forgetMainPID(w, r)
		_ = r.cmd.Wait() // the exit status is in ProcessState
		ws, _ := r.cmd.ProcessState.Sys().(syscall.WaitStatus)
		s.onExit(w, r, ws)
	}()
}

// exitReaper is the supervisor's reaper, started at the first run; nil
// when it cannot be started (then every run waits for itself).
func (s *Supervisor) exitReaper(w *worker) *reaper.Reaper {
	s.reaperOnce.Do(func() {
		rp, err := reaper.New(context.Background())
		if err != nil {
			w.log.Warn("process reaper unavailable; each worker is waited for by a thread of its own", slog.Any("err", err))
			return
		}
		s.reaper = rp
	})
	return s.reaper
}

// waitStatus is a reaper's report as the kernel's wait status word.
func waitStatus(ex reaper.Exit) syscall.WaitStatus {
	if ex.Exited {
		return syscall.WaitStatus(ex.Code&0xff) << 8
	}
	ws := syscall.WaitStatus(ex.Signal & 0x7f)
	if ex.CoreDumped {
		ws |= 0x80
	}
	return ws
}

// forgetMainPID stops attributing r's pid to w. Whoever reaps r's process
// calls it first, while the zombie still pins the pid.
func (s *Supervisor) forgetMainPID(w *worker, r *run) {
	s.mu.Lock()
	if s.mainPID[r.pid] == w {
		delete(s.mainPID, r.pid)
	}
	s.noteExited(r.pid, time.Now())
	s.mu.Unlock()
}

// onExit handles the end of r's main process, reaped with wait status ws:
// it kills whatever is left in the leaf (forked children), waits for the
// output to drain, removes the leaf and records the exit. It blocks for
// all that (up to the tree kill's 10 s), so it runs on a goroutine that
// s.wg counts, never on a reaper's loop.
func (s *Supervisor) onExit(w *worker, r *run, ws syscall.WaitStatus) {
	oomed := false
	if ws.Signaled() && ws.Signal() == syscall.SIGKILL {
		oomed = s.oomEvidence(w, r)
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
	go func() { r.output.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(2 * time.Second):
		w.log.Warn("worker output readers still open after exit")
	}
	r.cancel()
	if err := r.leaf.Delete(); err != nil {
		w.log.Warn("removing the worker's cgroup failed", slog.Any("err", err))
	}
	s.recordExit(w, r, ws, oomed)
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

// oomEvidence reports whether the OOM killer ended the run: the leaf's OOM
// counter, which the kernel bumps before the victim dies, so it is final by
// the time the exit is seen (no event stream to wait for).
func (s *Supervisor) oomEvidence(w *worker, r *run) bool {
	st, err := r.leaf.Stats()
	if err != nil {
		w.log.Warn("reading the worker's OOM count after a SIGKILL failed; not counted as an OOM kill", slog.Any("err", err))
		return false
	}
	return st.OOMKills > 0
}

// classify turns a wait status into an exit reason and code.
func classify(ws syscall.WaitStatus, oomed bool) (ExitReason, *int) {
	if oomed {
		return ReasonOOM, nil
	}
	if ws.Signaled() {
		sig := int(ws.Signal())
		return ReasonSignaled, &sig
	}
	code := ws.ExitStatus()
	return ReasonExited, &code
}

// recordExit records a run's end and applies the restart policy.
func (s *Supervisor) recordExit(w *worker, r *run, ws syscall.WaitStatus, oomed bool) {
	reason, code := classify(ws, oomed)
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
	w.exitSignaled = code != nil && ws.Signaled()
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
