package supervisor

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/workerstore"
)

// loadStore flushes the harness's registry and reads it back through a
// second handle on the same file, as a restarted hive would.
func loadStore(t *testing.T, h *harness) []workerstore.Worker {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := h.s.store.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	st, err := workerstore.Open(workerstore.Options{Path: filepath.Join(h.cfg.StateDir, storeFile), CgroupRoot: h.s.deps.Cgroups.Root()})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close(ctx)
	ws, dropped, err := st.Load(ctx)
	if err != nil || len(dropped) != 0 {
		t.Fatalf("load: %v, dropped %v", err, dropped)
	}
	return ws
}

// TestRegistryFollowsWorker: a running worker's row holds what adoption
// needs (pid with its start time, leaf, url, port, the token's hash,
// state, output offsets); a state change reaches it; DELETE removes it.
func TestRegistryFollowsWorker(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "restart": "always"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	h.s.mu.Lock()
	tok := h.s.workers[res.WorkerID].token
	h.s.mu.Unlock()
	var ws []workerstore.Worker
	h.waitFor("worker output shipped and persisted", 10*time.Second, func() bool {
		ws = loadStore(t, h)
		return len(ws) == 1 && ws[0].StdoutOffset+ws[0].StderrOffset > 0
	})
	w := ws[0]
	switch {
	case w.ID != res.WorkerID || w.PID != *wi.PID || w.PIDStart == 0 || w.URL != wi.URL || w.Port != wi.Port:
		t.Errorf("row %+v does not name worker %+v", w, wi)
	case w.State != string(StateIdle) || w.RestartPolicy != "always" || w.Backend != "sim":
		t.Errorf("row state %q policy %q backend %q", w.State, w.RestartPolicy, w.Backend)
	case !w.TokenMatches(tok) || w.TokenMatches(tok+"x"):
		t.Error("row's token hash does not match the worker's token")
	case w.CgroupPath != h.s.leafPath(w.ID):
		t.Errorf("cgroup path %q", w.CgroupPath)
	}
	if same, err := h.s.proc.SameProcess(w.PID, w.PIDStart); err != nil || !same {
		t.Errorf("stored pid start does not name the live process: %v %v", same, err)
	}
	if code, _ := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 && code != 202 && code != 204 {
		t.Fatalf("delete: %d", code)
	}
	h.waitFor("row removed", 10*time.Second, func() bool { return len(loadStore(t, h)) == 0 })
}

// TestAdoptOffRemovesRegistry: with workers.adopt = false no registry is
// kept and an earlier one is removed.
func TestAdoptOffRemovesRegistry(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, storeFile), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	h := newHarness(t, func(c *config.Config) { c.StateDir = dir; c.Workers.Adopt = false })
	if h.s.store != nil {
		t.Fatal("registry opened with workers.adopt = false")
	}
	if _, err := os.Stat(filepath.Join(dir, storeFile)); !os.IsNotExist(err) {
		t.Errorf("earlier registry still there: %v", err)
	}
}
