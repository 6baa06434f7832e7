package supervisor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"sync"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// terminateRun stops one run: SIGTERM to the main process (through Go's
// pidfd, so a recycled pid is never signalled), the grace period, then a
// kill of the whole leaf. It returns true when the worker exited within the
// grace period. ctx bounds the wait after the kill.
func (s *Supervisor) terminateRun(ctx context.Context, w *worker, r *run, grace time.Duration) bool {
	if err := r.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		w.log.Debug("SIGTERM not delivered", slog.Any("err", err))
	}
	t := time.NewTimer(grace)
	defer t.Stop()
	select {
	case <-r.done:
		return true
	case <-t.C:
		w.log.Warn("worker still running after the grace period; killing its cgroup", slog.Duration("grace", grace))
	case <-ctx.Done():
		// The shutdown budget (or the caller) ran out before the grace did.
		w.log.Warn("stop deadline reached before the worker exited; killing its cgroup", slog.Any("cause", context.Cause(ctx)))
	}
	kctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	if err := r.leaf.Kill(kctx); err != nil {
		w.log.Error("killing the worker's cgroup failed", slog.Any("err", err))
	}
	cancel()
	select {
	case <-r.done:
	case <-ctx.Done():
	case <-time.After(15 * time.Second):
		w.log.Error("worker exit not seen 15s after the kill")
	}
	return false
}

// stopRunAsync stops a run (SIGTERM, grace, kill) in the background.
func (s *Supervisor) stopRunAsync(w *worker, r *run) {
	go s.terminateRun(context.Background(), w, r, s.cfg.Workers.GracePeriod.D())
}

// Stop stops a worker and removes it from the registry: SIGTERM, the grace
// period, a kill of its whole cgroup, wait until it is empty, delete the
// leaf. A worker that is already stopped or failed is just removed.
func (s *Supervisor) Stop(ctx context.Context, id string) (WorkerInfo, error) {
	s.mu.Lock()
	w := s.workers[id]
	if w == nil {
		s.mu.Unlock()
		return WorkerInfo{}, workerNotFound(id)
	}
	w.removeWhenStopped = true
	r := w.run
	if r == nil {
		if !w.state.terminal() {
			w.noRestart = true
			s.finish(w, StateStopped, "stopped by request")
		} else {
			s.removeLocked(w)
		}
		info := s.info(w)
		s.unlock()
		return info, nil
	}
	w.killReason, w.noRestart = ReasonStopped, true
	s.clearDeadline(w)
	s.setState(w, StateStopping, "stop requested")
	s.mu.Unlock()

	s.terminateRun(ctx, w, r, s.cfg.Workers.GracePeriod.D())
	select {
	case <-r.done:
	case <-ctx.Done():
		return WorkerInfo{}, api.Errorf(http.StatusGatewayTimeout, api.CodeUnavailable, "worker %s is still stopping", id)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info(w), nil
}

func workerNotFound(id string) *api.Error {
	return api.Errorf(http.StatusNotFound, api.CodeNotFound, "Worker %s not found in registry", id).
		WithDetails(map[string]any{"worker_id": id})
}

// ShutdownReport summarises a hive shutdown.
type ShutdownReport struct {
	Total    int
	Graceful int
	Forced   int
	Duration time.Duration
}

// Shutdown stops every worker in parallel within workers.shutdown_budget
// (and ctx), refuses new spawns and restarts, and logs one summary line.
func (s *Supervisor) Shutdown(ctx context.Context) ShutdownReport {
	start := time.Now()
	budget := s.cfg.Workers.ShutdownBudget.D()
	ctx, cancel := context.WithTimeout(ctx, budget)
	defer cancel()
	s.mu.Lock()
	s.closing = true
	s.mu.Unlock()
	s.starting.Wait() // a start in flight registers its run before we look

	type victim struct {
		w *worker
		r *run
	}
	var victims []victim
	s.mu.Lock()
	for _, w := range s.workers {
		if w.run != nil {
			w.killReason, w.noRestart = ReasonStopped, true
			s.clearDeadline(w)
			s.setState(w, StateStopping, "hive shutdown")
			victims = append(victims, victim{w, w.run})
		} else if !w.state.terminal() {
			s.finish(w, StateStopped, "hive shutdown")
		}
	}
	s.unlock()

	// Leave a slice of the budget for the kills after the grace period.
	grace := s.cfg.Workers.GracePeriod.D()
	if reserve := budget / 4; grace > budget-reserve {
		grace = budget - reserve
	}
	var graceful, forced int
	var mu sync.Mutex
	var wg sync.WaitGroup
	for _, v := range victims {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ok := s.terminateRun(ctx, v.w, v.r, grace)
			mu.Lock()
			if ok {
				graceful++
			} else {
				forced++
			}
			mu.Unlock()
		}()
	}
	wg.Wait()
	// Waiters and starters end promptly once their processes are gone.
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
	// Runs still watched (past the budget) fall back to waiting for
	// themselves once the reaper closes.
	s.reaperOnce.Do(func() {})
	if s.reaper != nil {
		_ = s.reaper.Close()
	}
	rep := ShutdownReport{Total: len(victims), Graceful: graceful, Forced: forced, Duration: time.Since(start)}
	s.log.Info("workers shut down", slog.Int("total", rep.Total), slog.Int("graceful", rep.Graceful),
		slog.Int("forced", rep.Forced), slog.Duration("duration", rep.Duration))
	return rep
}

// CleanLeftovers kills and removes every worker leaf that a previous hive
// left behind. Call it before serving spawns. It returns how many it removed.
func (s *Supervisor) CleanLeftovers(ctx context.Context) (int, error) {
	ids, err := s.deps.Cgroups.List()
	if err != nil {
		return 0, fmt.Errorf("listing worker cgroups: %w", err)
	}
	var errs []error
	n := 0
	for _, id := range ids {
		s.mu.Lock()
		_, ours := s.workers[id]
		s.mu.Unlock()
		if ours {
			continue
		}
		leaf, err := s.deps.Cgroups.Load(id)
		if err != nil {
			errs = append(errs, fmt.Errorf("leftover %s: %w", id, err))
			continue
		}
		pids, _ := leaf.Pids()
		if err := leaf.Kill(ctx); err != nil {
			errs = append(errs, fmt.Errorf("leftover %s: kill: %w", id, err))
			continue
		}
		if err := leaf.Delete(); err != nil {
			errs = append(errs, fmt.Errorf("leftover %s: delete: %w", id, err))
			continue
		}
		n++
		s.log.Warn("removed a worker cgroup left by a previous hive", slog.String("worker_id", id), slog.Int("processes_killed", len(pids)))
	}
	return n, errors.Join(errs...)
}
