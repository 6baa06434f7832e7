package supervisor

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/workerstore"
	workerproto "github.com/rbee/rbee-hive/worker"
)

// ReasonLost is the exit of a worker whose process ended while no hive
// watched it: the exit status is unknown.
const ReasonLost ExitReason = "lost"

// AdoptReport is what Adopt did.
type AdoptReport struct {
	Adopted  int // running workers taken over
	Lost     int // persisted workers whose process was gone
	Dropped  int // rows that could not be used (bad row, unknown backend)
	Duration time.Duration
}

// Adopt takes over the workers an earlier hive left running, from the
// registry (docs/adoption.md, section 6). Call it once, after New and
// before CleanLeftovers (which then kills what was not adopted) and before
// serving. Without a registry (workers.adopt = false) it does nothing.
func (s *Supervisor) Adopt(ctx context.Context) (AdoptReport, error) {
	var rep AdoptReport
	if s.store == nil {
		s.removeStaleFiles(nil)
		return rep, nil
	}
	start := time.Now()
	ws, dropped, err := s.store.Load(ctx)
	rep.Dropped = len(dropped)
	if err != nil {
		s.removeStaleFiles(nil)
		return rep, fmt.Errorf("reading the worker registry: %w", err)
	}
	kept := make(map[string]bool, len(ws))
	for i := range ws {
		row := &ws[i]
		switch outcome, err := s.adoptOne(ctx, row); {
		case err != nil:
			rep.Dropped++
			_ = s.store.Delete(row.ID)
			s.log.Warn("worker from the registry not adopted; its leftovers are killed", slog.String("worker_id", row.ID), slog.Any("err", err))
		case outcome == adoptedRunning:
			rep.Adopted++
			kept[row.ID] = true
		default:
			rep.Lost++
			kept[row.ID] = true
		}
	}
	s.removeStaleFiles(func(id string) bool { return kept[id] })
	rep.Duration = time.Since(start)
	s.m.adopted.Add(float64(rep.Adopted))
	s.m.adoptSeconds.Set(rep.Duration.Seconds())
	s.log.Info("workers adopted from the registry", slog.Int("adopted", rep.Adopted), slog.Int("lost", rep.Lost),
		slog.Int("dropped", rep.Dropped), slog.Duration("duration", rep.Duration))
	s.kickLoop()
	return rep, nil
}

type adoptOutcome int

const (
	adoptedRunning adoptOutcome = iota
	adoptedLost
)

// adoptOne registers the worker of one row: its process running (adopted)
// or gone (lost, handed to its restart policy).
func (s *Supervisor) adoptOne(ctx context.Context, row *workerstore.Worker) (adoptOutcome, error) {
	alive := false
	if row.PID > 0 {
		same, err := s.proc.SameProcess(row.PID, row.PIDStart)
		if err != nil {
			return 0, err
		}
		if same {
			// The leaf must be the worker's own: a pid moved out of it (or
			// reused into another) is not adopted.
			id, err := s.deps.Cgroups.LeafOf(row.PID)
			alive = err == nil && id == row.ID
		}
	}
	env := map[string]string{}
	if alive {
		env = readEnviron(row.PID)
	}
	req := SpawnRequest{ModelRef: row.Model, Backend: row.Backend, Restart: RestartPolicy(row.RestartPolicy),
		Served: row.Served, ContextSize: row.ContextSize}
	dev := int64(0)
	if row.GPU != "" {
		dev = -1
		for _, d := range s.devices {
			if d.UUID == row.GPU {
				dev = int64(d.Index)
			}
		}
		if dev < 0 {
			return 0, fmt.Errorf("GPU %s no longer present", row.GPU)
		}
	}
	req.Device = &dev
	if row.MemoryLimit > 0 {
		req.MemoryLimitBytes = &row.MemoryLimit
	}
	if row.VRAMClaim > 0 {
		req.VRAMBytes = &row.VRAMClaim
	}
	be := s.cfg.Backends[row.Backend]
	req.Env = make(map[string]string)
	for _, k := range be.EnvAllow {
		if v, ok := env[k]; ok && !config.ReservedEnv(k) {
			req.Env[k] = v
		}
	}
	p, err := s.validateSpawn(ctx, &req)
	if err != nil {
		return 0, err
	}
	modelPath, wait, modelRel, err := s.resolveModel(ctx, p)
	if err != nil {
		return 0, err
	}
	claim, err := s.admit(ctx, row.ID, p, modelPath)
	if err != nil {
		// The worker exists whatever the ledger says; it runs unclaimed.
		s.log.Warn("adopted worker not admitted again; its resources are not reserved", slog.String("worker_id", row.ID), slog.Any("err", err))
		claim = nil
	}
	w := s.newWorker(row.ID, p, modelPath, row.Port, "", claim, modelRel)
	copy(w.tokenHash[:], row.TokenHash)
	w.url, w.createdAt = row.URL, row.CreatedAt
	w.restartCount = row.RestartCount
	w.recentFailures = append([]time.Time(nil), row.Failures...)
	w.consecutiveFailures = len(w.recentFailures)
	w.outShipped.out.Store(row.StdoutOffset)
	w.outShipped.err.Store(row.StderrOffset)
	if wait != nil {
		// Not on disk any more: a restart waits for it.
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			if res := <-wait; res.Err == nil {
				s.mu.Lock()
				w.modelPath = res.Path
				s.mu.Unlock()
			}
		}()
	}

	var r *run
	if alive {
		// Same uid as before, reserved so that no new worker gets it.
		if err := s.ids.adopt(w, row.UID); err != nil {
			releaseClaim(claim)
			modelRel()
			return 0, err
		}
		if r, err = s.adoptRun(w, row); err != nil {
			w.log.Warn("worker alive but not adoptable; handled as lost", slog.Any("err", err))
			r = nil
		}
	}
	now := time.Now()
	s.mu.Lock()
	defer s.unlock()
	if s.closing {
		releaseClaim(claim)
		modelRel()
		return 0, errShuttingDown()
	}
	s.workers[w.id] = w
	s.tokens[w.tokenHash] = w.id
	s.ports[w.port] = w.id
	w.state = State(row.State)
	w.lastActivity = now
	if r == nil {
		s.lostLocked(w, now)
		return adoptedLost, nil
	}
	w.adoptedAt = now
	w.run = r
	s.mainPID[r.pid] = w
	if claim != nil {
		claim.Loaded(r.pid)
	}
	switch {
	case w.state == StateLoading || w.backendCfg.Health == config.HealthHTTP && w.state != StateStale:
		// Readiness is checked again: http mode by its probe (loading
		// until it answers), the others keep their load timeout from now.
		w.state = StateLoading
		s.setDeadline(w, dlLoad, now.Add(w.backendCfg.LoadTimeout.D()))
	default: // idle, busy (its streams ended with the old hive), stale, stopping
		r.ready = true
		w.lastHeartbeat = now
		w.state = StateIdle
		if row.State == string(StateStale) {
			w.state = StateStale
		}
		s.setDeadline(w, dlStale, now.Add(s.cfg.Heartbeat.StaleThreshold.D()))
	}
	w.stateReason = "adopted"
	s.persist(w)
	w.log.Info("worker adopted", slog.Int("pid", r.pid), slog.String("state", string(w.state)), slog.String("url", w.url))
	if w.backendCfg.Health == config.HealthHTTP {
		rctx, cancel := context.WithCancel(context.Background())
		r.cancel = cancel
		go s.pollHealth(rctx, w, r)
	}
	s.watchAdopted(w, r)
	return adoptedRunning, nil
}

// adoptRun builds the run of a live adopted process: its leaf, a handle
// that signals by pidfd, its output files tailed from the stored offsets,
// the OOM counter's baseline.
func (s *Supervisor) adoptRun(w *worker, row *workerstore.Worker) (*run, error) {
	leaf, err := s.deps.Cgroups.Load(w.id)
	if err != nil {
		return nil, fmt.Errorf("load leaf: %w", err)
	}
	proc, err := os.FindProcess(row.PID)
	if err != nil {
		return nil, err
	}
	r := &run{leaf: leaf, cmd: &exec.Cmd{Process: proc}, pid: row.PID, pidStart: row.PIDStart, argv: row.Argv,
		started: time.Now(), cancel: func() {}, done: make(chan struct{}), adopted: true}
	if st, err := leaf.Stats(); err == nil {
		r.oomBase = st.OOMKills
	}
	// After the handle: a pid reused in between is caught here.
	if same, err := s.proc.SameProcess(row.PID, row.PIDStart); err != nil || !same {
		_ = proc.Release()
		return nil, errors.New("the process ended while being adopted")
	}
	for i, path := range outputPaths(s.outDir, w.id) {
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			w.log.Warn("adopted worker's output file missing; its output is not shipped", slog.String("path", path), slog.Any("err", err))
			continue
		}
		shipped := [2]*atomic.Int64{&w.outShipped.out, &w.outShipped.err}[i]
		off := shipped.Load()
		if st, err := f.Stat(); err == nil && st.Size() < off {
			off = 0
		}
		tf, err := s.tail.add(f, off, outStream{sink: w.logs, stream: [2]string{streamStdout, streamStderr}[i]}, shipped, func() { s.persistOffsets(w) })
		if err != nil {
			w.log.Warn("adopted worker's output is read at its exit only", slog.Any("err", err))
		}
		r.tailed[i] = tf
	}
	return r, nil
}

// watchAdopted waits for an adopted process's exit through a pidfd (it is
// not our child: no status) and classifies it from the leaf's evidence.
func (s *Supervisor) watchAdopted(w *worker, r *run) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		rp := s.exitReaper(w)
		waited := false
		if rp != nil {
			if exits, err := rp.Watch(r.pid, false); err == nil {
				<-exits
				waited = true
			} else {
				w.log.Warn("cannot watch the adopted worker by pidfd; polling it", slog.Any("err", err))
			}
		}
		for !waited {
			if same, _ := s.proc.SameProcess(r.pid, r.pidStart); !same {
				break
			}
			time.Sleep(500 * time.Millisecond)
		}
		s.forgetMainPID(w, r)
		_ = r.cmd.Process.Release()
		oomed := false
		if st, err := r.leaf.Stats(); err == nil {
			oomed = st.OOMKills > r.oomBase
		}
		s.endRun(w, r)
		s.recordAdoptedExit(w, r, oomed)
		close(r.done)
	}()
}

// endRun is the part of onExit every run shares: the leaf emptied, the
// output read to its end, the leaf removed.
func (s *Supervisor) endRun(w *worker, r *run) {
	kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := r.leaf.Kill(kctx); err != nil {
		w.log.Error("emptying the worker's cgroup after its exit failed", slog.Any("err", err))
	}
	cancel()
	for _, tf := range r.tailed {
		if tf != nil {
			s.tail.finish(tf)
		}
	}
	r.cancel()
	if err := r.leaf.Delete(); err != nil {
		w.log.Warn("removing the worker's cgroup failed", slog.Any("err", err))
	}
}

// recordAdoptedExit is recordExit for a process whose status the hive
// cannot know: oom from the leaf's counter, else exited with no code.
func (s *Supervisor) recordAdoptedExit(w *worker, r *run, oomed bool) {
	reason := ReasonExited
	if oomed {
		reason = ReasonOOM
		s.m.oomKills.Inc()
	}
	now := time.Now()
	s.mu.Lock()
	defer s.unlock()
	w.run = nil
	w.inFlight = 0
	s.clearDeadline(w)
	level := slog.LevelWarn
	if oomed {
		level = slog.LevelError
	}
	w.log.LogAttrs(context.Background(), level, "adopted worker exited", slog.String("exit_reason", string(reason)),
		slog.Int("pid", r.pid), slog.String("exit_code", "unknown"), slog.String("ordered", string(w.killReason)))
	if w.killReason != "" && !oomed {
		reason = w.killReason
	}
	s.m.exits.WithLabelValues(string(reason)).Inc()
	w.exitReason, w.exitCode, w.exitSignaled = reason, nil, false
	if w.killReason == ReasonStopped || w.noRestart || s.closing {
		s.finish(w, StateStopped, string(reason))
		return
	}
	if !w.restartPolicy.restartsAfter(true) {
		s.finish(w, StateFailed, string(reason))
		return
	}
	s.afterFailure(w, reason, r.started, now, string(reason))
}

// lostLocked handles a persisted worker whose process ended while no hive
// watched it: reason lost (oom if its leaf counted an OOM kill), whatever is
// left in its leaf killed, the restart policy applied with the stored
// failure history; a row that was in its backoff resumes it. Caller holds
// s.mu.
func (s *Supervisor) lostLocked(w *worker, now time.Time) {
	reason := ReasonLost
	if leaf, err := s.deps.Cgroups.Load(w.id); err == nil {
		if st, err := leaf.Stats(); err == nil && st.OOMKills > 0 {
			reason = ReasonOOM
		}
		s.afterUnlock = append(s.afterUnlock, func() {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			_ = leaf.Kill(ctx)
			_ = leaf.Delete()
		})
	}
	if w.state == StateRestarting {
		// It was waiting for its next run: the backoff resumes.
		w.log.Info("worker was in its restart backoff; resuming it")
		s.setDeadline(w, dlRestart, now.Add(backoff(s.cfg.Workers.Restart.BackoffBase.D(), s.cfg.Workers.Restart.BackoffMax.D(),
			s.cfg.Workers.Restart.Jitter, max(w.consecutiveFailures, 1))))
		s.persist(w)
		return
	}
	if reason == ReasonOOM {
		s.m.oomKills.Inc()
	}
	s.m.exits.WithLabelValues(string(reason)).Inc()
	w.exitReason, w.exitCode = reason, nil
	w.log.Warn("worker's process ended while no hive watched it", slog.String("exit_reason", string(reason)),
		slog.String("restart", string(w.restartPolicy)))
	switch {
	case w.state == StateStopping: // a stop was under way
		s.finish(w, StateStopped, string(reason))
		return
	case !w.restartPolicy.restartsAfter(true):
		s.finish(w, StateFailed, string(reason))
		return
	}
	s.afterFailure(w, reason, now, now, string(reason))
}

// readEnviron reads a process's environment (to keep its request env for
// later restarts). Unreadable: empty.
func readEnviron(pid int) map[string]string {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/environ")
	env := map[string]string{}
	if err != nil {
		return env
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if k, v, ok := bytes.Cut(kv, []byte("=")); ok && string(k) != workerproto.EnvWorkerToken {
			env[string(k)] = string(v)
		}
	}
	return env
}
