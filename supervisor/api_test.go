package supervisor

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httputil"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/config"
)

func TestBadSpawnRequestsChangeNothing(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		b := c.Backends["sim"]
		b.EnvAllow = []string{"RBEE_SIM_LOAD_TIME"}
		c.Backends["sim"] = b
		// Built in code, past config.Load's own check: the spawn still refuses.
		b.EnvAllow = []string{"PYTHONPATH"}
		c.Backends["simpy"] = b
	})
	long := "hf:" + strings.Repeat("a", 520)
	for _, tc := range []struct {
		name  string
		body  string
		code  int
		field string
		msg   string
	}{
		{"empty model_ref", `{"model_ref":"","backend":"sim","device":0,"model_path":""}`, 400, "model_ref", "Invalid model_ref: string is empty"},
		{"too long", `{"model_ref":"` + long + `","backend":"sim","device":0}`, 400, "model_ref", "string too long: 523 chars (max 512)"},
		{"shell", `{"model_ref":"hf:a;rm -rf /","backend":"sim","device":0}`, 400, "model_ref", "shell metacharacter found"},
		{"dollar", `{"model_ref":"hf:$(id)","backend":"sim","device":0}`, 400, "model_ref", "shell metacharacter found"},
		{"null byte", `{"model_ref":"hf:a\u0000b","backend":"sim","device":0}`, 400, "model_ref", "null byte found in string"},
		{"traversal", `{"model_ref":"file:../../etc/passwd","backend":"sim","device":0}`, 400, "model_ref", "path traversal sequence detected"},
		{"bad chars", `{"model_ref":"hf:a b","backend":"sim","device":0}`, 400, "model_ref", "invalid characters found"},
		{"no provider", `{"model_ref":"tinyllama","backend":"sim","device":0}`, 400, "model_ref", "expected 'provider:reference', got 'tinyllama'"},
		{"bad backend chars", `{"model_ref":"hf:a/b","backend":"../sim","device":0}`, 400, "backend", "Invalid backend: invalid characters found"},
		{"unknown backend", `{"model_ref":"hf:a/b","backend":"quantum","device":0}`, 400, "backend", "unknown backend"},
		{"cpu device 1", `{"model_ref":"hf:a/b","backend":"sim","device":1}`, 400, "device", "only device 0"},
		{"cuda device missing", `{"model_ref":"hf:a/b","backend":"gpu","device":5}`, 400, "device", "device 5 not available (available: [0, 1])"},
		{"negative device", `{"model_ref":"hf:a/b","backend":"sim","device":-1}`, 400, "device", "must not be negative"},
		{"device wrong type", `{"model_ref":"hf:a/b","backend":"sim","device":"zero"}`, 422, "device", ""},
		{"device missing", `{"model_ref":"hf:a/b","backend":"sim"}`, 422, "device", "missing field `device`"},
		{"restart policy", `{"model_ref":"hf:a/b","backend":"sim","device":0,"restart":"sometimes"}`, 400, "restart", "not one of"},
		{"memory limit", `{"model_ref":"hf:a/b","backend":"sim","device":0,"memory_limit_bytes":0}`, 400, "memory_limit_bytes", "at least 1MiB"},
		{"vram", `{"model_ref":"hf:a/b","backend":"sim","device":0,"vram_bytes":-5}`, 400, "vram_bytes", "must not be negative"},
		{"env not allowed", `{"model_ref":"hf:a/b","backend":"sim","device":0,"env":{"FOO":"1"}}`, 400, "env", "not allowed"},
		{"env denied", `{"model_ref":"hf:a/b","backend":"sim","device":0,"env":{"LD_PRELOAD":"/x.so"}}`, 400, "env", "LD_PRELOAD is never passed to a worker: LD_PRELOAD changes which shared objects the dynamic linker loads"},
		{"env denied though allowed", `{"model_ref":"hf:a/b","backend":"simpy","device":0,"env":{"PYTHONPATH":"/tmp"}}`, 400, "env", "PYTHONPATH is never passed to a worker"},
		{"env reserved", `{"model_ref":"hf:a/b","backend":"sim","device":0,"env":{"NOTIFY_SOCKET":"/tmp/x"}}`, 400, "env", "not allowed"},
		{"malformed", `{"model_ref":`, 400, "", "malformed JSON"},
		{"empty body", ``, 400, "", "empty"},
		{"trailing data", `{"model_ref":"hf:a/b","backend":"sim","device":0} {}`, 400, "", "trailing"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, out := h.do("POST", "/v1/workers/spawn", tc.body)
			if code != tc.code {
				t.Fatalf("status %d, want %d: %s", code, tc.code, out)
			}
			var env struct {
				Error struct {
					Code    string         `json:"code"`
					Message string         `json:"message"`
					Details map[string]any `json:"details"`
				} `json:"error"`
			}
			if err := json.Unmarshal(out, &env); err != nil || env.Error.Code == "" {
				t.Fatalf("not a JSON error envelope: %s", out)
			}
			if tc.field != "" && env.Error.Details["field"] != tc.field {
				t.Errorf("details.field = %v, want %s (%s)", env.Error.Details["field"], tc.field, out)
			}
			if !strings.Contains(env.Error.Message, tc.msg) {
				t.Errorf("message %q lacks %q", env.Error.Message, tc.msg)
			}
		})
	}
	if n := len(h.s.List()); n != 0 {
		t.Errorf("%d workers registered by bad requests", n)
	}
	if ids, _ := h.cg.List(); len(ids) != 0 {
		t.Errorf("leaves created by bad requests: %v", ids)
	}
	h.s.mu.Lock()
	ports := len(h.s.ports)
	h.s.mu.Unlock()
	if ports != 0 {
		t.Errorf("%d ports held", ports)
	}
	// Unauthenticated spawns are refused before anything else.
	if code, _ := h.do("POST", "/v1/workers/spawn", `{"model_ref":"hf:a/b","backend":"sim","device":0}`, ""); code != 401 {
		t.Errorf("unauthenticated spawn: %d", code)
	}
}

func TestCUDAWorkerGetsItsGPU(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "gpu", "device": 1})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	env, err := os.ReadFile(filepathJoinProc(*wi.PID, "environ"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"CUDA_VISIBLE_DEVICES=GPU-bbbb", "CUDA_DEVICE_ORDER=PCI_BUS_ID"} {
		if !strings.Contains(string(env), want+"\x00") {
			t.Errorf("env lacks %s", want)
		}
	}
	if wi.GPUUUID != "GPU-bbbb" || wi.Device != 1 {
		t.Errorf("info %+v", wi)
	}
}

func filepathJoinProc(pid int, f string) string {
	return filepath.Join("/proc", strconvItoa(pid), f)
}

func TestHTTPHealthMode(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "simhttp"})
	if wi := h.get(res.WorkerID); wi.State != StateLoading {
		t.Fatalf("state %s right after spawn", wi.State)
	}
	time.Sleep(100 * time.Millisecond)
	if wi := h.get(res.WorkerID); wi.State != StateLoading {
		t.Fatalf("ready before --load-time (300ms): %s", wi.State)
	}
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	if !strings.Contains(wi.StateReason, "GET /health") {
		t.Errorf("ready via %q, want the http probe", wi.StateReason)
	}
}

func TestCallbackMode(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "simcb"})
	wi := h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	if !strings.Contains(wi.StateReason, "POST /v1/workers/ready") {
		t.Errorf("ready via %q", wi.StateReason)
	}
	env, _ := os.ReadFile(filepathJoinProc(*wi.PID, "environ"))
	if strings.Contains(string(env), "NOTIFY_SOCKET=") {
		t.Error("callback worker got a notify socket")
	}
	// The documented body; an unknown id is a JSON 404.
	ready := map[string]any{"worker_id": "w-nosuchworker9", "url": "http://localhost:1", "model_ref": "hf:a/b", "backend": "cpu", "device": 0}
	if code, out := h.do("POST", "/v1/workers/ready", ready); code != 404 || !strings.Contains(string(out), "NOT_FOUND") {
		t.Errorf("unknown ready: %d %s", code, out)
	}
	ready["worker_id"] = res.WorkerID
	if code, out := h.do("POST", "/v1/workers/ready", ready); code != 200 || string(out) != "{\"message\":\"Worker registered as ready\"}\n" {
		t.Errorf("ready: %d %s", code, out)
	}
	ready["model_ref"] = "hf:a;b"
	if code, _ := h.do("POST", "/v1/workers/ready", ready); code != 400 {
		t.Errorf("bad model_ref in ready: %d", code)
	}
}

func TestWorkerLogs(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	var out []byte
	h.waitFor("worker output", 5*time.Second, func() bool {
		var code int
		code, out = h.do("GET", "/v1/workers/"+res.WorkerID+"/logs", nil)
		return code == 200 && len(out) > 0
	})
	if code, _ := h.do("GET", "/v1/workers/"+res.WorkerID+"/logs?stream=bogus", nil); code != 400 {
		t.Errorf("bad stream: %d", code)
	}
	if code, _ := h.do("GET", "/v1/workers/w-unknown/logs", nil); code != 404 {
		t.Errorf("unknown worker logs: %d", code)
	}
	data, err := os.ReadFile(filepath.Join(h.cfg.StateDir, "workers", res.WorkerID+".log"))
	if err != nil || len(data) == 0 {
		t.Errorf("log file: %v (%d bytes)", err, len(data))
	}
}

func TestLogSinkRotatesAndBounds(t *testing.T) {
	dir := t.TempDir()
	l := newLogSink("w-test", dir, 4096, 2, nil)
	line := []byte(strings.Repeat("x", 99))
	for i := 0; i < 2000; i++ { // 200 KB through a 4 KiB file, 64 KiB tail
		l.write("stdout", line)
	}
	l.write("stderr", []byte("last"))
	if tail := l.tail(""); len(tail) > tailBytes || !strings.HasSuffix(string(tail), "last\n") {
		t.Errorf("tail %d bytes", len(tail))
	}
	if tail := l.tail("stderr"); string(tail) != "last\n" {
		t.Errorf("stderr tail %q", tail)
	}
	l.close()
	for _, name := range []string{"w-test.log", "w-test.log.1", "w-test.log.2"} {
		st, err := os.Stat(filepath.Join(dir, name))
		if err != nil || st.Size() > 4096 {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "w-test.log.3")); err == nil {
		t.Error("more rotated files than log_files")
	}
	// A fast writer through a pipe never blocks on the hive: the pump drains.
	r, w, _ := os.Pipe()
	l2 := newLogSink("w-pipe", dir, 1<<20, 1, nil)
	done := make(chan struct{})
	go func() { l2.pump("stdout", r); close(done) }()
	start := time.Now()
	chunk := []byte(strings.Repeat("y", 1023) + "\n")
	for i := 0; i < 8192; i++ { // 8 MiB
		if _, err := w.Write(chunk); err != nil {
			t.Fatal(err)
		}
	}
	w.Close()
	<-done
	t.Logf("8 MiB of output drained in %s", time.Since(start))
}

// proxyFunc is a real reverse proxy standing in for the proxy package.
type proxyFunc struct{}

func (proxyFunc) Forward(w http.ResponseWriter, r *http.Request, t ProxyTarget) {
	t.OnStart()
	defer t.OnEnd()
	rp := &httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(t.URL)
		pr.Out.URL.Path = "/v1/inference"
		pr.Out.Header.Del("Authorization")
	}}
	rp.ServeHTTP(w, r)
}

func TestInferenceMarksBusy(t *testing.T) {
	h := newHarness(t)
	h.s.deps.Proxy = proxyFunc{}
	res := h.spawn(map[string]any{"backend": "sim", "env": map[string]string{"RBEE_SIM_LOAD_TIME": "500ms"}})
	body := `{"job_id":"j1","prompt":"hello","max_tokens":40}`
	if code, out := h.do("POST", "/v1/workers/"+res.WorkerID+"/inference", body); code != 409 {
		t.Errorf("inference while loading: %d %s", code, out)
	}
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	req, _ := http.NewRequest("POST", h.srv.URL+"/v1/workers/"+res.WorkerID+"/inference", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+h.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	out, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(out), "data:") {
		t.Errorf("inference: %d %s", resp.StatusCode, out)
	}
	if wi := h.get(res.WorkerID); wi.State != StateIdle || wi.InFlight != 0 {
		t.Errorf("after inference: %s, %d in flight", wi.State, wi.InFlight)
	}
	if !strings.Contains(h.logs.String(), "to=busy") {
		t.Error("worker never went busy")
	}
}

func TestAliveAndWedgedLoop(t *testing.T) {
	h := newHarness(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if err := h.s.Alive(ctx); err != nil {
		t.Fatalf("Alive: %v", err)
	}
	release := make(chan struct{})
	if err := h.s.WedgeLoop(ctx, release); err != nil {
		t.Fatal(err)
	}
	short, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if err := h.s.Alive(short); err == nil {
		t.Error("Alive passed with a wedged loop")
	}
	close(release)
	if err := h.s.Alive(ctx); err != nil {
		t.Errorf("Alive after release: %v", err)
	}
}

func TestMetricsLintAndSeries(t *testing.T) {
	h := newHarness(t, func(c *config.Config) { c.Resources.SampleInterval = config.Duration(100 * time.Millisecond) })
	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	problems, err := testutil.GatherAndLint(h.reg)
	if err != nil || len(problems) > 0 {
		t.Fatalf("lint: %v %v", problems, err)
	}
	if problems, err := testutil.CollectAndLint(h.s.m); err != nil || len(problems) > 0 {
		t.Fatalf("collector lint: %v %v", problems, err)
	}
	if got := counter(t, h.reg, "rbee_hive_workers", map[string]string{"state": "idle", "backend": "sim", "device": "0"}); got != 1 {
		t.Errorf("workers{idle,sim,0} = %v", got)
	}
	h.waitFor("a health report", 5*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_workers_by_health", map[string]string{"health": "healthy", "backend": "sim", "device": "0"}) == 1
	})
	// Series exist at 0 for every state and known pair, GPUs included.
	if got := counter(t, h.reg, "rbee_hive_workers", map[string]string{"state": "failed", "backend": "gpu", "device": "1"}); got != 0 {
		t.Errorf("workers{failed,gpu,1} = %v", got)
	}
	// Memory comes from the monitor's samples, so it shows after the first pass.
	h.waitFor("a memory sample", 5*time.Second, func() bool {
		return counter(t, h.reg, "rbee_hive_worker_memory_bytes", map[string]string{"backend": "sim", "device": "0"}) > 0
	})
	for _, name := range []string{"rbee_hive_worker_spawn_failures_total", "rbee_hive_worker_restarts_total", "rbee_hive_worker_exits_total",
		"rbee_hive_worker_oom_kills_total", "rbee_hive_workers_stale_total", "rbee_hive_heartbeats_total",
		"rbee_hive_heartbeats_rejected_total", "rbee_hive_worker_health_check_failures_total"} {
		if counter(t, h.reg, name, nil) < 0 {
			t.Errorf("%s has no series", name)
		}
	}
	wi, _ := h.s.Get(res.WorkerID)
	if wi.Resources == nil || wi.Resources.MemoryCurrentBytes == 0 {
		t.Errorf("resources %+v", wi.Resources)
	}
	// Scrapes do not grow anything.
	a, _ := h.reg.Gather()
	b, _ := h.reg.Gather()
	if len(a) != len(b) {
		t.Error("metric families changed between scrapes")
	}
}

// The tail is bounded in memory, not only in output bytes: a worker that
// prints empty lines must not make its tail (kept for up to 256 terminal
// workers) cost megabytes of per-line bookkeeping.
func TestLogTailMemoryBounded(t *testing.T) {
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	l := newLogSink("w-mem", t.TempDir(), 1<<20, 1, nil)
	l.close() // tail only
	for i := 0; i < 200000; i++ {
		l.write("stdout", nil)
	}
	l.write("stderr", []byte("last"))
	runtime.GC()
	runtime.ReadMemStats(&after)
	if grown := int64(after.HeapAlloc) - int64(before.HeapAlloc); grown > 1<<20 {
		t.Errorf("a 64 KiB tail of empty lines holds %d KiB of heap", grown>>10)
	}
	if tail := l.tail(""); len(tail) != tailBytes || !strings.HasSuffix(string(tail), "\n\nlast\n") {
		t.Errorf("tail %d bytes, ends %q", len(tail), tail[len(tail)-8:])
	}
	if tail := l.tail("stderr"); string(tail) != "last\n" {
		t.Errorf("stderr tail %q", tail)
	}
	runtime.KeepAlive(l)
}

// brokenProxy calls OnStart and then panics, or calls OnEnd twice.
type brokenProxy struct{ panics bool }

func (p brokenProxy) Forward(w http.ResponseWriter, r *http.Request, t ProxyTarget) {
	t.OnStart()
	if p.panics {
		panic("proxy bug")
	}
	t.OnEnd()
	t.OnEnd()
}

// A proxy that panics after OnStart must not leave the worker busy for good,
// and a second OnEnd must not end another request's count.
func TestInferenceBusyAccountingSurvivesProxyBugs(t *testing.T) {
	h := newHarness(t)
	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	h.s.deps.Proxy = brokenProxy{panics: true}
	if code, out := h.do("POST", "/v1/workers/"+res.WorkerID+"/inference", `{}`); code != 500 {
		t.Errorf("panicking proxy: %d %s", code, out)
	}
	if wi := h.get(res.WorkerID); wi.State != StateIdle || wi.InFlight != 0 {
		t.Errorf("after a proxy panic: %s, %d in flight", wi.State, wi.InFlight)
	}
	if !strings.Contains(h.logs.String(), `msg="panic in HTTP handler"`) || !strings.Contains(h.logs.String(), "goroutine") {
		t.Error("the panic and its stack are not in the hive's log")
	}
	// Another request is in flight while a buggy one ends twice.
	h.s.mu.Lock()
	w := h.s.workers[res.WorkerID]
	w.inFlight++
	h.s.setState(w, StateBusy, "test")
	h.s.mu.Unlock()
	h.s.deps.Proxy = brokenProxy{}
	h.do("POST", "/v1/workers/"+res.WorkerID+"/inference", `{}`)
	if wi := h.get(res.WorkerID); wi.State != StateBusy || wi.InFlight != 1 {
		t.Errorf("a double OnEnd: %s, %d in flight, want busy with 1", wi.State, wi.InFlight)
	}
}
