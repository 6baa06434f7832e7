package supervisor

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/rbee/rbee-hive/internal/workerstore"
	"github.com/rbee/rbee-hive/procfs"
)

// The durable registry (workers.adopt): every change of a worker that a
// restarted hive needs is handed to internal/workerstore, whose calls only
// enqueue (one writer goroutine commits in batches), so nothing here waits
// for the disk, and nothing is written on the heartbeat path (a heartbeat
// changes no persisted field).

// storeFile is the registry's file in the state directory.
const storeFile = "workers.db"

// openStore opens the registry when workers.adopt is on; with it off, an
// earlier hive's registry is removed (its workers are killed as leftovers).
func (s *Supervisor) openStore() error {
	path := filepath.Join(s.cfg.StateDir, storeFile)
	if !s.cfg.Workers.Adopt {
		for _, suffix := range []string{"", "-wal", "-shm"} {
			if err := os.Remove(path + suffix); err != nil && !os.IsNotExist(err) {
				s.log.Warn("removing the worker registry (workers.adopt = false)", slog.Any("err", err))
			}
		}
		return nil
	}
	st, err := workerstore.Open(workerstore.Options{Path: path, CgroupRoot: s.deps.Cgroups.Root(), Logger: s.log})
	if err != nil {
		return err
	}
	if aside := st.MovedAside(); aside != "" {
		s.log.Error("the worker registry was unusable and was moved aside; no worker is adopted", slog.String("moved_to", aside))
	}
	proc, err := procfs.New("")
	if err != nil {
		_ = st.Close(context.Background())
		return err
	}
	s.store, s.proc = st, proc
	return nil
}

// leafPath is w's leaf as the registry names it.
func (s *Supervisor) leafPath(id string) string {
	return filepath.Join(s.deps.Cgroups.Root(), "workers", id)
}

// persist writes w's whole record. Caller holds s.mu.
func (s *Supervisor) persist(w *worker) {
	if s.store == nil {
		return
	}
	if w.state.terminal() {
		_ = s.store.Delete(w.id)
		return
	}
	rec := workerstore.Worker{
		ID: w.id, Backend: w.backend, Model: w.modelRef, Port: w.port, URL: w.url,
		RestartPolicy: string(w.restartPolicy), RestartCount: w.restartCount,
		Failures:    append([]time.Time(nil), w.recentFailures...),
		MemoryLimit: w.memoryLimit, VRAMClaim: int64(w.vramRequested), GPU: w.gpuUUID,
		TokenHash: append([]byte(nil), w.tokenHash[:]...), State: string(w.state), // a copy: the store writes it later
		AdoptedAt: w.adoptedAt, CreatedAt: w.createdAt, Served: w.served, ContextSize: w.contextSize,
	}
	rec.StdoutOffset, rec.StderrOffset = w.outShipped.get()
	if w.iso != nil {
		rec.UID = int(w.iso.UID)
	}
	if r := w.run; r != nil {
		rec.CgroupPath, rec.PID, rec.PIDStart, rec.Argv = s.leafPath(w.id), r.pid, r.pidStart, r.argv
	}
	if err := s.store.Put(rec); err != nil {
		w.log.Warn("worker registry: record not queued", slog.Any("err", err))
	}
}

// persistState writes w's state alone: every transition, cheap enough for
// busy/idle. A terminal worker is dropped from the registry (there is
// nothing left to adopt). Caller holds s.mu.
func (s *Supervisor) persistState(w *worker) {
	if s.store == nil {
		return
	}
	if w.state.terminal() {
		_ = s.store.Delete(w.id)
		return
	}
	_ = s.store.SetState(w.id, string(w.state))
}

// persistOffsets writes how far w's output files are shipped.
func (s *Supervisor) persistOffsets(w *worker) {
	if s.store == nil {
		return
	}
	o, e := w.outShipped.get()
	_ = s.store.SetOutputOffsets(w.id, o, e)
}

// unpersist drops w from the registry. Caller holds s.mu.
func (s *Supervisor) unpersist(w *worker) {
	if s.store != nil {
		_ = s.store.Delete(w.id)
	}
}

// closeStore writes what is pending and closes the registry.
func (s *Supervisor) closeStore(ctx context.Context) {
	if s.store == nil {
		return
	}
	if err := s.store.Close(ctx); err != nil {
		s.log.Warn("closing the worker registry", slog.Any("err", err))
	}
}
