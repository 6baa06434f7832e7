// Package soak runs a chaos soak against a real hive: `rbee-hive daemon`
// with its own cgroup root, rbee-simworker and shell workers, and random
// faults (spawn, stop, kill -9 of workers and their children, OOM, silent
// workers, crash loops, inference streams cut by the client, bad requests)
// for SOAK_DURATION (default 10m; `make soak` in CI uses 2m). Invariants
// are checked throughout and at the end; the test prints one summary line.
//
//	SOAK_DURATION=2m go test -v -run TestSoak ./test/soak
//
// It needs root (cgroups) and is skipped (failed in CI) without it; without
// SOAK_DURATION it does not run at all, so `go test ./...` stays quick.
package soak

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/internal/testkit"
)

func TestMain(m *testing.M) {
	cgroup.MaybeRunGate()
	os.Exit(m.Run())
}

const simEnvAllow = `["RBEE_SIM_CRASH_AFTER", "RBEE_SIM_NO_HEARTBEAT", "RBEE_SIM_LEAK_MIB_PER_SEC", "RBEE_SIM_TOKENS_PER_SECOND", "RBEE_SIM_LOAD_TIME"]`

// config is the hive's config; %d/%q are filled by startHive. "shell" is a
// shell that leaves a double-forked child behind and execs the simworker.
const config = `listen = "127.0.0.1:%d"
state_dir = %q
runtime_dir = %q
log_format = "json"
log_level = "warn"

[cgroup]
root = %q

[heartbeat]
interval = "500ms"
stale_threshold = "3s"

[workers]
grace_period = "2s"
shutdown_budget = "30s"
port_min = 40000
port_max = 44999

[workers.restart]
backoff_base = "200ms"
backoff_max = "1s"
max_failures = 3
failure_window = "30s"

[backends.sim]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"]
load_timeout = "20s"
memory_limit = "128MiB"
env_allow = ` + simEnvAllow + `

[backends.small]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"]
load_timeout = "20s"
memory_limit = "48MiB"
env_allow = ` + simEnvAllow + `

[backends.shell]
command = ["/bin/sh", "-c", "(sleep 3600 &) ; sleep 3600 & exec \"$0\" --port \"$1\" --worker-id \"$2\" --model x", "{self_dir}/rbee-simworker", "{port}", "{worker_id}"]
load_timeout = "20s"
memory_limit = "128MiB"
env_allow = ` + simEnvAllow + `
`

// counts is the soak's tally: faults injected, invariants checked, and
// violations (each one a defect, listed in full).
type counts struct {
	mu         sync.Mutex
	n          map[string]int
	violations []string
}

func (c *counts) add(k string) {
	c.mu.Lock()
	c.n[k]++
	c.mu.Unlock()
}

func (c *counts) violate(format string, args ...any) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.n["violations"]++
	if len(c.violations) < 50 {
		c.violations = append(c.violations, time.Now().Format("15:04:05.000")+" "+fmt.Sprintf(format, args...))
	}
}

func (c *counts) line() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	keys := make([]string, 0, len(c.n))
	for k := range c.n {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	parts := make([]string, 0, len(keys))
	for _, k := range keys {
		parts = append(parts, fmt.Sprintf("%s=%d", k, c.n[k]))
	}
	return strings.Join(parts, " ")
}

// hive is the running daemon; its Runtime dir marks this hive's processes
// (the notify socket in every worker's env).
type hive struct {
	*testkit.Hive
	model  string
	dirs   []string // the cgroup root's directories (every v1 hierarchy, or the v2 one)
	client *http.Client
	c      *counts
}

func randomName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

func TestSoak(t *testing.T) {
	dur := os.Getenv("SOAK_DURATION")
	if dur == "" {
		t.Log("SOAK_DURATION unset: the soak runs only when asked for (make soak)")
		return
	}
	d, err := time.ParseDuration(dur)
	if err != nil || d <= 0 {
		t.Fatalf("SOAK_DURATION=%q: want a positive duration like 2m", dur)
	}
	testkit.RequireRoot(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("SOAK_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("soak for %v, SOAK_SEED=%d", d, seed)
	h := startHive(t)
	rng := mrand.New(mrand.NewPCG(seed, seed))

	// Baseline with no workers, after one warm-up of every route.
	h.workers()
	h.metrics()
	base := h.resources()
	t.Logf("baseline: %+v", base)

	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { // the continuous checker
		defer wg.Done()
		for {
			select {
			case <-ctx.Done():
				return
			case <-time.After(2 * time.Second):
			}
			h.checkInvariants()
		}
	}()
	faulted := map[string]bool{} // workers a fault was aimed at: their inference may fail
	silent := map[string]time.Time{}
	for ctx.Err() == nil {
		h.chaosStep(ctx, rng, faulted, silent, &wg)
		time.Sleep(time.Duration(50+rng.IntN(250)) * time.Millisecond)
	}
	wg.Wait()

	// The end: stop every worker, then the invariants and the resources.
	for _, w := range h.workers() {
		h.call("DELETE", "/v1/workers/"+w.ID, nil, "stop")
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		live := 0
		for _, w := range h.workers() {
			if w.PID != nil {
				live++
			}
		}
		if live == 0 {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	time.Sleep(3 * time.Second) // leaves removed, connections closed
	h.checkInvariants()
	h.client.CloseIdleConnections()
	end := h.resources()
	h.c.add("check_resources")
	t.Logf("end: %+v", end)
	if end.fds > base.fds+32 {
		h.c.violate("hive fds %d -> %d", base.fds, end.fds)
	}
	if end.goroutines > base.goroutines+64 {
		h.c.violate("hive goroutines %d -> %d", base.goroutines, end.goroutines)
	}
	if end.rssKiB > 2*base.rssKiB+64<<10 {
		h.c.violate("hive RSS %d KiB -> %d KiB", base.rssKiB, end.rssKiB)
	}
	// What the hive itself saw of the faults, for the summary line.
	for _, line := range strings.Split(h.metrics(), "\n") {
		for _, name := range []string{"rbee_hive_worker_oom_kills_total", "rbee_hive_workers_stale_total", "rbee_hive_worker_restarts_total"} {
			if rest, ok := strings.CutPrefix(line, name); ok && len(rest) > 0 && (rest[0] == ' ' || rest[0] == '{') {
				_, v, _ := strings.Cut(rest, " ")
				n, _ := strconv.ParseFloat(v, 64)
				h.c.mu.Lock()
				h.c.n["hive_"+strings.TrimPrefix(name, "rbee_hive_")] += int(n)
				h.c.mu.Unlock()
			}
		}
	}
	if h.c.n["worker_processes_seen"] == 0 {
		h.c.violate("the stray-process check never found a worker process: its filter is broken")
	}
	fmt.Printf("soak: %v seed=%d %s\n", d, seed, h.c.line())
	for _, v := range h.c.violations {
		t.Errorf("invariant broken: %s", v)
	}
}

func startHive(t *testing.T) *hive {
	root, err := filepath.Abs("../../bin")
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"rbee-hive", "rbee-simworker"} {
		if _, err := os.Stat(filepath.Join(root, name)); err != nil {
			t.Fatalf("%v: run `make build` first (make soak does)", err)
		}
	}
	env := testkit.NewHiveEnv(t, "rbee-soak-")
	model := env.PlaceholderModel(t)
	cfg := fmt.Sprintf(config, env.Port, env.State, env.Runtime, env.CgroupRoot)
	h := testkit.StartHive(t, env, testkit.HiveOptions{Bin: filepath.Join(root, "rbee-hive"), Config: cfg,
		StartTimeout: 30 * time.Second, StopTimeout: 60 * time.Second, MustOutlive: true, LogTail: 20000})
	return &hive{Hive: h, model: "file:" + model, dirs: testkit.CgroupDirs(env.CgroupRoot),
		c: &counts{n: map[string]int{}}, client: &http.Client{Timeout: 30 * time.Second}}
}

// call sends an authenticated request; what is the action's name for the
// tally. A 500 is always a violation; other 5xx are counted by status.
func (h *hive) call(method, path string, body []byte, what string) (int, []byte) {
	return h.callCtx(context.Background(), method, path, body, what, "Bearer "+h.Token)
}

func (h *hive) callCtx(ctx context.Context, method, path string, body []byte, what, auth string) (int, []byte) {
	var r io.Reader
	if body != nil {
		r = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.URL+path, r)
	if err != nil {
		h.c.violate("%s: %v", what, err)
		return 0, nil
	}
	if auth != "" {
		req.Header.Set("Authorization", auth)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := h.client.Do(req)
	if err != nil {
		if ctx.Err() == nil {
			h.c.violate("%s %s %s: %v", what, method, path, err)
		}
		return 0, nil
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode == http.StatusInternalServerError {
		h.c.violate("%s %s %s: 500 %s", what, method, path, b)
	}
	if resp.StatusCode >= 500 {
		h.c.add(fmt.Sprintf("http_%d", resp.StatusCode))
	}
	return resp.StatusCode, b
}

type workerInfo struct {
	ID      string `json:"id"`
	Backend string `json:"backend"`
	State   string `json:"state"`
	PID     *int   `json:"pid"`
}

func (h *hive) workers() []workerInfo {
	code, b := h.call("GET", "/v1/workers/list", nil, "list")
	var res struct {
		Workers []workerInfo `json:"workers"`
	}
	if code != http.StatusOK || json.Unmarshal(b, &res) != nil {
		h.c.violate("list: %d %s", code, b)
	}
	return res.Workers
}

func (h *hive) metrics() string {
	code, b := h.call("GET", "/metrics", nil, "metrics")
	if code != http.StatusOK {
		h.c.violate("/metrics: %d", code)
	}
	return string(b)
}

// spawn asks for a worker; 507 (admission) is an answer, not a fault.
func (h *hive) spawn(backend string, env map[string]string, restart string) string {
	body, _ := json.Marshal(map[string]any{"model_ref": h.model, "backend": backend, "device": 0, "env": env, "restart": restart})
	code, b := h.call("POST", "/v1/workers/spawn", body, "spawn")
	switch code {
	case http.StatusOK:
		var res struct {
			WorkerID string `json:"worker_id"`
		}
		_ = json.Unmarshal(b, &res)
		return res.WorkerID
	case http.StatusInsufficientStorage:
		h.c.add("spawn_rejected_507")
	default:
		h.c.violate("spawn %s %v: %d %s", backend, env, code, b)
	}
	return ""
}

// chaosStep injects one random fault (or a normal action).
func (h *hive) chaosStep(ctx context.Context, rng *mrand.Rand, faulted map[string]bool, silent map[string]time.Time, wg *sync.WaitGroup) {
	ws := h.workers()
	var live []workerInfo
	for _, w := range ws {
		// A silent worker is left alone long enough to go stale (3s
		// threshold after its load), or the fault would never bite.
		if w.PID != nil && time.Since(silent[w.ID]) > 10*time.Second {
			live = append(live, w)
		}
	}
	pick := func() (workerInfo, bool) {
		if len(live) == 0 {
			return workerInfo{}, false
		}
		return live[rng.IntN(len(live))], true
	}
	canSpawn := len(ws) < 8
	switch n := rng.IntN(100); {
	case n < 14 && canSpawn:
		if id := h.spawn("sim", map[string]string{"RBEE_SIM_TOKENS_PER_SECOND": "200"}, ""); id != "" {
			h.c.add("spawn_sim")
		}
	case n < 22 && canSpawn:
		if id := h.spawn("shell", map[string]string{"RBEE_SIM_TOKENS_PER_SECOND": "200"}, ""); id != "" {
			h.c.add("spawn_shell")
		}
	case n < 26 && canSpawn:
		if id := h.spawn("small", map[string]string{"RBEE_SIM_LEAK_MIB_PER_SEC": "64"}, "never"); id != "" {
			faulted[id] = true
			h.c.add("fault_oom")
		}
	case n < 30 && canSpawn:
		if id := h.spawn("sim", map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"}, ""); id != "" {
			faulted[id], silent[id] = true, time.Now()
			h.c.add("fault_silent")
		}
	case n < 34 && canSpawn:
		if id := h.spawn("sim", map[string]string{"RBEE_SIM_CRASH_AFTER": "1s", "RBEE_SIM_LOAD_TIME": "2s"}, "always"); id != "" {
			faulted[id] = true
			h.c.add("fault_crash_loop")
		}
	case n < 44:
		if w, ok := pick(); ok {
			faulted[w.ID] = true
			h.call("DELETE", "/v1/workers/"+w.ID, nil, "stop")
			h.c.add("stop")
		}
	case n < 52:
		if w, ok := pick(); ok {
			faulted[w.ID] = true
			_ = syscall.Kill(*w.PID, syscall.SIGKILL)
			h.c.add("fault_kill_main")
		}
	case n < 58:
		// kill -9 one process of a leaf that is not the main one (a shell
		// worker's sleeps), or the main one when it has none.
		if w, ok := pick(); ok {
			faulted[w.ID] = true
			for _, d := range h.dirs {
				ps := testkit.CgroupPIDs(filepath.Join(d, "workers", w.ID))
				if len(ps) > 0 {
					victim := ps[rng.IntN(len(ps))]
					_ = syscall.Kill(victim, syscall.SIGKILL)
					h.c.add("fault_kill_child")
					break
				}
			}
		}
	case n < 80:
		if w, ok := pick(); ok && (w.State == "idle" || w.State == "busy") {
			cut := rng.IntN(2) == 0
			wg.Add(1)
			go func(id string, expectOK bool) {
				defer wg.Done()
				h.infer(ctx, id, cut, expectOK)
			}(w.ID, !faulted[w.ID])
		}
	default:
		h.badRequest(rng)
	}
}

// infer runs one inference; cut: the client goes away after a few events.
// A worker no fault was aimed at must stream to [DONE].
func (h *hive) infer(ctx context.Context, id string, cut, expectOK bool) {
	ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
	defer cancel()
	body := []byte(`{"job_id":"soak-` + randomName("") + `","prompt":"hello soak","max_tokens":40}`)
	req, _ := http.NewRequestWithContext(ctx, "POST", h.URL+"/v1/workers/"+id+"/inference", bytes.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+h.Token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		if ctx.Err() == nil && expectOK {
			h.c.violate("inference %s: %v", id, err)
		}
		return
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode == http.StatusInternalServerError || (expectOK && resp.StatusCode >= 500) {
			h.c.violate("inference %s: %d %s", id, resp.StatusCode, b)
		}
		h.c.add(fmt.Sprintf("inference_%d", resp.StatusCode))
		return
	}
	sc := bufio.NewScanner(resp.Body)
	events, done := 0, false
	for sc.Scan() {
		if strings.HasPrefix(sc.Text(), "data: ") {
			events++
		}
		if sc.Text() == "data: [DONE]" {
			done = true
		}
		if cut && events == 3 {
			cancel()
			h.c.add("fault_client_disconnect")
			return
		}
	}
	h.c.add("inference_streams")
	if !done && expectOK && ctx.Err() == nil {
		h.c.violate("inference %s: stream ended without [DONE] after %d events", id, events)
	}
}

// badRequest sends one request a hostile client would: each must get a 4xx.
func (h *hive) badRequest(rng *mrand.Rand) {
	type bad struct {
		method, path, body, auth string
	}
	tok := "Bearer " + h.Token
	cases := []bad{
		{"POST", "/v1/workers/spawn", `{"model_ref":`, tok},
		{"POST", "/v1/workers/spawn", `{"model_ref":"hf:a/b","backend":"nope","device":0}`, tok},
		{"POST", "/v1/workers/spawn", `{"model_ref":"file:relative","backend":"sim","device":0}`, tok},
		{"POST", "/v1/workers/spawn", `{"model_ref":"` + h.model + `","backend":"sim","device":0,"env":{"PATH":"/x"}}`, tok},
		{"POST", "/v1/workers/spawn", `{"model_ref":"` + h.model + `","backend":"sim","device":0,"memory_limit_bytes":1}`, tok},
		{"POST", "/v1/workers/spawn", `{}`, "Bearer wrong"},
		{"GET", "/v1/workers/list", "", ""},
		{"GET", "/v1/workers/w-doesnotexist", "", tok},
		{"DELETE", "/v1/workers/w-doesnotexist", "", tok},
		{"POST", "/v1/workers/w-doesnotexist/inference", `{"prompt":"x"}`, tok},
		{"POST", "/v1/heartbeat", `{"worker_id":"w-x","health_status":"healthy"}`, tok},
		{"POST", "/v1/workers/ready", `{"worker_id":"w-x"}`, tok},
		{"POST", "/v1/models/download", `{"model_ref":"hf:../../etc"}`, tok},
		{"GET", "/v1/nothing-here", "", tok},
		{"PUT", "/v1/workers/list", "", tok},
	}
	b := cases[rng.IntN(len(cases))]
	var body []byte
	if b.body != "" {
		body = []byte(b.body)
	}
	code, resp := h.callCtx(context.Background(), b.method, b.path, body, "bad_request", b.auth)
	h.c.add("fault_bad_request")
	if code < 400 || code > 499 {
		h.c.violate("bad request %s %s %s: %d %s, want a 4xx", b.method, b.path, b.body, code, resp)
	}
}

// leafOf names the worker leaf a process is in ("" outside any leaf of
// this hive) and whether the process exists.
func (h *hive) leafOf(pid int) (string, bool) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	if err != nil {
		return "", false
	}
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || (parts[1] != "memory" && parts[1] != "") {
			continue
		}
		for _, d := range h.dirs {
			rel := strings.TrimPrefix(d, "/sys/fs/cgroup")
			rel = strings.TrimPrefix(rel, "/memory")
			if rest, ok := strings.CutPrefix(parts[2], rel+"/workers/"); ok && !strings.Contains(rest, "/") {
				return rest, true
			}
		}
	}
	return "", true
}

// workerEnvProcs finds every process carrying this hive's worker
// environment (NOTIFY_SOCKET in this hive's runtime dir), by worker id.
func (h *hive) workerEnvProcs() map[int]string {
	out := map[int]string{}
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		if err != nil || !bytes.Contains(env, []byte("NOTIFY_SOCKET="+h.Runtime+"/")) {
			continue
		}
		for _, kv := range bytes.Split(env, []byte{0}) {
			if id, ok := bytes.CutPrefix(kv, []byte("RBEE_WORKER_ID=")); ok {
				out[pid] = string(id)
			}
		}
	}
	return out
}

// checkInvariants checks the process, cgroup and metrics invariants. Each
// finding is confirmed once more after a pause, since the hive may be in
// the middle of a restart or a stop.
func (h *hive) checkInvariants() {
	for _, inv := range []struct {
		name  string
		check func() []string
	}{
		{"check_listed_live", h.listedAreLive},
		{"check_no_stray_process", h.noStrayProcess},
		{"check_no_orphan_leaf", h.noOrphanLeaf},
		{"check_metrics_match_api", h.metricsMatchAPI},
	} {
		h.c.add(inv.name)
		if bad := inv.check(); len(bad) > 0 {
			time.Sleep(3 * time.Second)
			if bad = inv.check(); len(bad) > 0 {
				h.c.violate("%s: %s", inv.name, strings.Join(bad, "; "))
			}
		}
	}
}

// listedAreLive: every worker the API lists with a pid has that process
// alive, in its own leaf.
func (h *hive) listedAreLive() []string {
	var bad []string
	for _, w := range h.workers() {
		if w.PID == nil {
			continue
		}
		leaf, alive := h.leafOf(*w.PID)
		if !alive {
			bad = append(bad, fmt.Sprintf("%s (%s) lists pid %d, which is gone", w.ID, w.State, *w.PID))
		} else if leaf != w.ID {
			bad = append(bad, fmt.Sprintf("%s (%s) pid %d is in leaf %q", w.ID, w.State, *w.PID, leaf))
		}
	}
	return bad
}

// noStrayProcess: every process with this hive's worker environment is in
// the leaf of its worker (none escaped its cgroup), and that worker is
// listed.
func (h *hive) noStrayProcess() []string {
	listed := map[string]bool{}
	for _, w := range h.workers() {
		listed[w.ID] = true
	}
	var bad []string
	found := h.workerEnvProcs()
	if len(found) > 0 {
		h.c.add("worker_processes_seen")
	}
	for pid, id := range found {
		leaf, alive := h.leafOf(pid)
		switch {
		case !alive:
		case leaf != id:
			bad = append(bad, fmt.Sprintf("pid %d of worker %s is in leaf %q", pid, id, leaf))
		case !listed[id]:
			bad = append(bad, fmt.Sprintf("pid %d in the leaf of unlisted worker %s", pid, id))
		}
	}
	for _, d := range h.dirs {
		if ps := testkit.CgroupPIDs(filepath.Join(d, "workers")); len(ps) > 0 {
			bad = append(bad, fmt.Sprintf("pids %v in %s/workers itself", ps, d))
		}
	}
	return bad
}

// noOrphanLeaf: every worker leaf belongs to a listed worker.
func (h *hive) noOrphanLeaf() []string {
	listed := map[string]bool{}
	for _, w := range h.workers() {
		listed[w.ID] = true
	}
	var bad []string
	for _, d := range h.dirs {
		leaves, _ := filepath.Glob(filepath.Join(d, "workers", "w-*"))
		for _, l := range leaves {
			if !listed[filepath.Base(l)] {
				bad = append(bad, fmt.Sprintf("leaf %s has no listed worker", l))
			}
		}
	}
	return bad
}

// metricsMatchAPI: rbee_hive_workers by state equals the API's list, read
// between two identical lists (the hive is never quiet during the soak).
func (h *hive) metricsMatchAPI() []string {
	byState := func(ws []workerInfo) map[string]int {
		m := map[string]int{}
		for _, w := range ws {
			m[w.State]++
		}
		return m
	}
	for range 10 {
		before := byState(h.workers())
		m := h.metrics()
		after := byState(h.workers())
		if fmt.Sprint(before) != fmt.Sprint(after) {
			continue
		}
		got := map[string]int{}
		for _, line := range strings.Split(m, "\n") {
			rest, ok := strings.CutPrefix(line, "rbee_hive_workers{")
			if !ok {
				continue
			}
			labels, val, _ := strings.Cut(rest, "} ")
			n, _ := strconv.ParseFloat(val, 64)
			for _, l := range strings.Split(labels, ",") {
				if s, ok := strings.CutPrefix(l, `state="`); ok && n > 0 {
					got[strings.TrimSuffix(s, `"`)] += int(n)
				}
			}
		}
		if fmt.Sprint(got) != fmt.Sprint(after) {
			return []string{fmt.Sprintf("rbee_hive_workers %v, API %v", got, after)}
		}
		return nil
	}
	h.c.add("check_metrics_unsettled")
	return nil
}

type resources struct {
	fds, goroutines int
	rssKiB          int64
}

func (h *hive) resources() resources {
	var r resources
	pid := h.Cmd.Process.Pid
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	r.fds = len(fds)
	status, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			r.rssKiB, _ = strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	for _, line := range strings.Split(h.metrics(), "\n") {
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			r.goroutines, _ = strconv.Atoi(v)
		}
	}
	return r
}
