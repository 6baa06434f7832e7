package supervisor

import (
	"context"
	"encoding/json"
	"errors"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
)

func TestSpawnFailureLeavesNothing(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		c.Backends["missing"] = config.Backend{Command: []string{"/nonexistent/worker", "--port", "{port}"}, Health: "notify",
			LoadTimeout: config.Duration(time.Minute), MemoryLimit: 64 << 20}
	})
	code, out := h.do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "hf:a/b", "backend": "missing", "device": 0, "model_path": ""})
	if code != 500 || !strings.Contains(string(out), "Failed to spawn worker") {
		t.Fatalf("spawn of a missing binary: %d %s", code, out)
	}
	var env struct {
		Error struct {
			Details map[string]any `json:"details"`
		} `json:"error"`
	}
	_ = json.Unmarshal(out, &env)
	if env.Error.Details["reason"] != "exec" {
		t.Errorf("reason %v", env.Error.Details["reason"])
	}
	if got := counter(t, h.reg, "rbee_hive_worker_spawn_failures_total", map[string]string{"reason": "exec"}); got != 1 {
		t.Errorf("spawn_failures{exec} = %v", got)
	}
	if len(h.s.List()) != 0 {
		t.Error("failed spawn left a worker")
	}
	if ids, _ := h.cg.List(); len(ids) != 0 {
		t.Errorf("failed spawn left leaves %v", ids)
	}
}

// dirStore is a minimal model store: hf:<name> is "downloaded" when release
// is closed; file: references are local; hf:full/* does not fit on disk.
type dirStore struct {
	release chan struct{}
	fail    bool

	mu    sync.Mutex
	inUse map[string]int
}

func (d *dirStore) Acquire(ref string) func() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.inUse == nil {
		d.inUse = map[string]int{}
	}
	d.inUse[ref]++
	var once sync.Once
	return func() {
		once.Do(func() {
			d.mu.Lock()
			d.inUse[ref]--
			d.mu.Unlock()
		})
	}
}

func (d *dirStore) used(ref string) int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.inUse[ref]
}

func (d *dirStore) Ensure(ctx context.Context, ref string) (string, <-chan ModelResult, error) {
	if p, ok := strings.CutPrefix(ref, "file:"); ok {
		return p, nil, nil
	}
	if strings.HasPrefix(ref, "hf:full/") {
		return "", nil, api.Errorf(507, api.CodeInsufficientDisk, "not enough disk").WithDetails(map[string]any{"needed_bytes": 1})
	}
	ch := make(chan ModelResult, 1)
	go func() {
		<-d.release
		if d.fail {
			ch <- ModelResult{Err: errors.New("HTTP 404 from the hub")}
			return
		}
		ch <- ModelResult{Path: "/models/" + strings.TrimPrefix(ref, "hf:")}
	}()
	return "", ch, nil
}

func TestDownloadingThenLoading(t *testing.T) {
	for _, fail := range []bool{false, true} {
		t.Run(map[bool]string{false: "ok", true: "fails"}[fail], func(t *testing.T) {
			h := newHarness(t)
			store := &dirStore{release: make(chan struct{}), fail: fail}
			h.s.deps.Models = store
			res := h.spawn(map[string]any{"backend": "sim", "model_ref": "hf:org/model-GGUF"})
			if res.State != StateDownloading {
				t.Fatalf("state %s", res.State)
			}
			if wi := h.get(res.WorkerID); wi.State != StateDownloading || wi.PID != nil {
				t.Fatalf("while downloading: %+v", wi)
			}
			close(store.release)
			if fail {
				wi := h.waitState(res.WorkerID, StateFailed, 10*time.Second)
				if wi.ExitReason != ReasonSpawnFailed || !strings.Contains(wi.StateReason, "404") {
					t.Errorf("failed download: %+v", wi)
				}
				// A worker that ends failed is an incident: logged at error.
				if !regexp.MustCompile(`level=ERROR msg="worker state".*to=failed`).MatchString(h.logs.String()) {
					t.Errorf("no error-level entry for the move to failed")
				}
				return
			}
			h.waitState(res.WorkerID, StateIdle, 10*time.Second)
			if n := store.used("hf:org/model-GGUF"); n != 1 {
				t.Errorf("model in use by %d workers, want 1", n)
			}
			if code, out := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
				t.Fatalf("delete: %d %s", code, out)
			}
			if n := store.used("hf:org/model-GGUF"); n != 0 {
				t.Errorf("model still in use by %d after the worker stopped", n)
			}
		})
	}
}

func TestSpawnDiskRefusedAtOnce(t *testing.T) {
	h := newHarness(t)
	store := &dirStore{release: make(chan struct{})}
	h.s.deps.Models = store
	code, out := h.do("POST", "/v1/workers/spawn", map[string]any{"backend": "sim", "model_ref": "hf:full/model", "device": 0, "model_path": ""})
	if code != 507 || !strings.Contains(string(out), api.CodeInsufficientDisk) {
		t.Fatalf("spawn: %d %s", code, out)
	}
	if len(h.s.List()) != 0 || store.used("hf:full/model") != 0 {
		t.Errorf("a refused spawn left a worker or an in-use mark")
	}
}

func TestStopWhileDownloading(t *testing.T) {
	h := newHarness(t)
	h.s.deps.Models = &dirStore{release: make(chan struct{})}
	res := h.spawn(map[string]any{"backend": "sim", "model_ref": "hf:org/model"})
	if code, out := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
		t.Fatalf("delete: %d %s", code, out)
	}
	if _, err := h.s.Get(res.WorkerID); err == nil {
		t.Error("worker still registered")
	}
}

func TestWorkerIDs(t *testing.T) {
	seen := map[string]bool{}
	for i := 0; i < 1000; i++ {
		id, err := newWorkerID()
		if err != nil {
			t.Fatal(err)
		}
		if len(id) != 14 || !strings.HasPrefix(id, "w-") || strings.Trim(id[2:], "abcdefghijklmnopqrstuvwxyz0123456789") != "" || seen[id] {
			t.Fatalf("bad or repeated id %q", id)
		}
		seen[id] = true
	}
}

// A restart or a finished download starts the next run after letting go of
// the lock; a DELETE in between must leave no process behind, and the
// non-start is no spawn failure.
func TestStartRunRefusesStoppedWorker(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim", "restart": "never", "env": map[string]string{"RBEE_SIM_CRASH_AFTER": "50ms"}})
	h.waitState(res.WorkerID, StateFailed, 10*time.Second)
	h.s.mu.Lock()
	w := h.s.workers[res.WorkerID]
	h.s.mu.Unlock()
	if err := h.s.startRun(w, "test"); !errors.Is(err, errNotStarted) {
		t.Errorf("startRun of a failed worker: %v, want errNotStarted", err)
	}
	h.s.startFailed(w, errNotStarted)
	if wi := h.get(res.WorkerID); wi.State != StateFailed || wi.PID != nil || wi.ExitReason != ReasonExited {
		t.Errorf("after a refused start: %+v", wi)
	}
	if ids, _ := h.cg.List(); len(ids) != 0 {
		t.Errorf("leaves %v for a stopped worker", ids)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_spawn_failures_total", map[string]string{"reason": "exec"}); got != 0 {
		t.Errorf("spawn_failures{exec} = %v", got)
	}
}

// slowRelease is a model store whose release stalls, as model.Store's does
// while it writes its catalog.
type slowRelease struct {
	dirStore
	entered chan struct{}
	gate    chan struct{}
}

func (s *slowRelease) Acquire(ref string) func() {
	rel := s.dirStore.Acquire(ref)
	return func() {
		close(s.entered)
		<-s.gate
		rel()
	}
}

// The model store's release does disk I/O: it must run outside s.mu, or a
// slow catalog stalls every request, datagram and deadline of the hive.
func TestModelReleaseOutsideLock(t *testing.T) {
	h := newHarness(t)
	store := &slowRelease{entered: make(chan struct{}), gate: make(chan struct{})}
	h.s.deps.Models = store
	t.Cleanup(func() {
		select {
		case <-store.gate:
		default:
			close(store.gate)
		}
	})
	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	stopped := make(chan error, 1)
	go func() { _, err := h.s.Stop(context.Background(), res.WorkerID); stopped <- err }()
	select {
	case <-store.entered:
	case <-time.After(10 * time.Second):
		t.Fatal("the model was never released")
	}
	listed := make(chan struct{})
	go func() { h.s.List(); close(listed) }()
	select {
	case <-listed:
	case <-time.After(2 * time.Second):
		t.Error("the registry is locked while the model store releases")
	}
	close(store.gate)
	if err := <-stopped; err != nil {
		t.Fatal(err)
	}
	if n := store.used("file:/models/tiny.gguf"); n != 0 {
		t.Errorf("model still in use by %d after the stop", n)
	}
}

// The port scan's bind probes run without s.mu (a nearly full range is a
// thousand binds), and two spawns probing at once still get distinct ports.
func TestPortProbeOutsideLock(t *testing.T) {
	h := newHarness(t)
	entered, gate := make(chan struct{}), make(chan struct{})
	var once sync.Once
	h.s.portFree = func(host string, port int) bool {
		first := false
		once.Do(func() { first = true })
		if first {
			close(entered)
			<-gate
		}
		return portFree(host, port)
	}
	type result struct {
		res SpawnResult
		err error
	}
	spawned := make(chan result, 2)
	spawn := func() {
		dev := int64(0)
		res, err := h.s.Spawn(context.Background(), SpawnRequest{ModelRef: "file:/models/tiny.gguf", Backend: "sim", Device: &dev})
		spawned <- result{res, err}
	}
	go spawn()
	<-entered
	listed := make(chan struct{})
	go func() { h.s.List(); close(listed) }()
	select {
	case <-listed:
	case <-time.After(2 * time.Second):
		close(gate)
		t.Fatal("the registry is locked while a port is probed")
	}
	go spawn() // probes past the port the first spawn holds
	second := <-spawned
	close(gate)
	first := <-spawned
	if first.err != nil || second.err != nil {
		t.Fatalf("spawns: %v, %v", first.err, second.err)
	}
	if first.res.URL == second.res.URL {
		t.Errorf("two workers got %s", first.res.URL)
	}
}

// brokenStore fails Ensure with an internal error (not an *api.Error).
type brokenStore struct{ dirStore }

func (b *brokenStore) Ensure(ctx context.Context, ref string) (string, <-chan ModelResult, error) {
	return "", nil, errors.New("catalog: database is locked")
}

// An internal error is answered as a bare "internal error" (its text is not
// leaked), so the hive must log it, with what it was doing.
func TestInternalSpawnErrorIsLogged(t *testing.T) {
	h := newHarness(t)
	h.s.deps.Models = &brokenStore{}
	code, out := h.do("POST", "/v1/workers/spawn", map[string]any{"backend": "sim", "model_ref": "hf:org/model", "device": 0, "model_path": ""})
	if code != 500 || strings.Contains(string(out), "database") {
		t.Fatalf("spawn: %d %s", code, out)
	}
	if !regexp.MustCompile(`level=ERROR msg="request failed".*path=/v1/workers/spawn.*model hf:org/model: catalog: database is locked`).MatchString(h.logs.String()) {
		t.Error("the internal error is not logged with its context")
	}
}

// recordingAdmitter admits everything except requests naming a model path
// in refuse, and remembers what it was asked and what was released.
type recordingAdmitter struct {
	mu          sync.Mutex
	refuse      map[string]bool
	refuseAfter int // > 0: refuse every request after this many
	requests    []AdmitRequest
	released    int
}

type recordedClaim struct {
	a    *recordingAdmitter
	vram uint64
	once sync.Once
}

func (c *recordedClaim) Loaded(...int)     {}
func (c *recordedClaim) VRAMBytes() uint64 { return c.vram }
func (c *recordedClaim) Release() {
	c.once.Do(func() {
		c.a.mu.Lock()
		c.a.released++
		c.a.mu.Unlock()
	})
}

func (a *recordingAdmitter) Admit(_ context.Context, req AdmitRequest) (Claim, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.requests = append(a.requests, req)
	if a.refuse[req.ModelPath] || (a.refuseAfter > 0 && len(a.requests) > a.refuseAfter) {
		return nil, api.Errorf(507, api.CodeInsufficientVRAM, "model needs more VRAM than GPU 0 has free")
	}
	vram := uint64(0)
	if req.ModelPath != "" {
		vram = 3 << 30 // what an estimate of the downloaded file would say
	}
	return &recordedClaim{a: a, vram: vram}, nil
}

func (a *recordingAdmitter) snapshot() ([]AdmitRequest, int) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]AdmitRequest(nil), a.requests...), a.released
}

// TestGPUWorkerReadmittedAfterDownload: a GPU worker spawned before its
// model exists is admitted again with the file once it is downloaded, so
// its VRAM estimate counts; if it no longer fits, the worker fails with the
// 507's message instead of starting.
func TestGPUWorkerReadmittedAfterDownload(t *testing.T) {
	for _, refuse := range []bool{false, true} {
		t.Run(map[bool]string{false: "fits", true: "does not fit"}[refuse], func(t *testing.T) {
			h := newHarness(t)
			store := &dirStore{release: make(chan struct{})}
			adm := &recordingAdmitter{refuse: map[string]bool{"/models/org/big-GGUF": refuse}}
			h.s.deps.Models = store
			h.s.deps.Admitter = adm
			res := h.spawn(map[string]any{"backend": "gpu", "device": 0, "model_ref": "hf:org/big-GGUF"})
			if res.State != StateDownloading {
				t.Fatalf("state %s", res.State)
			}
			close(store.release)
			if refuse {
				wi := h.waitState(res.WorkerID, StateFailed, 10*time.Second)
				if wi.ExitReason != ReasonSpawnFailed || !strings.Contains(wi.StateReason, "more VRAM") {
					t.Errorf("refused after download: %+v", wi)
				}
				if got := counter(t, h.reg, "rbee_hive_worker_spawn_failures_total", map[string]string{"reason": "admission"}); got != 1 {
					t.Errorf("spawn_failures{admission} = %v", got)
				}
				if wi.PID != nil {
					t.Errorf("a refused worker was started: pid %d", *wi.PID)
				}
			} else {
				h.waitState(res.WorkerID, StateIdle, 10*time.Second)
			}
			reqs, released := adm.snapshot()
			if len(reqs) != 2 || reqs[0].ModelPath != "" || reqs[1].ModelPath != "/models/org/big-GGUF" || !reqs[1].CUDA || reqs[1].GPUUUID == "" {
				t.Fatalf("admissions %+v", reqs)
			}
			if released < 1 {
				t.Errorf("the spawn-time claim was not released before re-admission")
			}
			if !refuse {
				h.s.mu.Lock()
				got := h.s.workers[res.WorkerID].vramExpected
				h.s.mu.Unlock()
				if got != 3<<30 {
					t.Errorf("expected VRAM %d, want the downloaded model's estimate", got)
				}
			}
		})
	}
}

// TestRestartIsAdmittedAgain: a crashed worker's memory went back to the
// host, so its restart is admitted again; a refusal counts as a failed start
// (backoff, then the circuit breaker), never as a start without a claim.
func TestRestartIsAdmittedAgain(t *testing.T) {
	h := newHarness(t)
	adm := &recordingAdmitter{refuseAfter: 1}
	h.s.deps.Admitter = adm
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_CRASH_AFTER": "300ms"}})
	wi := h.waitState(res.WorkerID, StateFailed, 20*time.Second)
	if !strings.Contains(wi.StateReason, "circuit breaker") || !strings.Contains(wi.StateReason, "admission") {
		t.Errorf("state reason %q", wi.StateReason)
	}
	reqs, released := adm.snapshot()
	if len(reqs) < 2 || reqs[1].WorkerID != res.WorkerID || reqs[1].MemoryBytes != reqs[0].MemoryBytes || reqs[1].ModelPath == "" {
		t.Errorf("restart admissions %+v", reqs)
	}
	if released != 1 {
		t.Errorf("released %d claims, want the first run's one", released)
	}
	if got := counter(t, h.reg, "rbee_hive_worker_spawn_failures_total", map[string]string{"reason": "admission"}); got < 1 {
		t.Errorf("spawn_failures{admission} = %v", got)
	}
	if wi.RestartCount < 1 {
		t.Errorf("restart_count %d", wi.RestartCount)
	}
}
