package main

import (
	"bufio"
	"bytes"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	_ "modernc.org/sqlite"
)

// adoptConfig has one backend per case of TestKilledHiveWorkersAdopted.
const adoptConfig = `
[heartbeat]
interval = "500ms"
stale_threshold = "2s"
stale_action = "mark"

[workers]
log_max_bytes = "64MiB"

[workers.restart]
backoff_base = "4s"
jitter = 0.0

[backends.chat]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--chatter", "2000"]
health = "notify"
memory_limit = "256MiB"

[backends.slow]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--tokens-per-second", "10"]
health = "notify"
memory_limit = "256MiB"

[backends.loader]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--load-time", "9s", "--leak-mib-per-sec", "40"]
health = "notify"
memory_limit = "96MiB"

[backends.crasher]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--crash-after", "1s"]
health = "notify"
memory_limit = "256MiB"

[backends.hanger]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--hang-after", "1s"]
health = "notify"
memory_limit = "256MiB"

[backends.plain]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}"]
health = "notify"
memory_limit = "256MiB"
`

type apiWorker struct {
	ID           string     `json:"id"`
	URL          string     `json:"url"`
	State        string     `json:"state"`
	PID          *int       `json:"pid"`
	RestartCount int        `json:"restart_count"`
	ExitReason   string     `json:"exit_reason"`
	AdoptedAt    *time.Time `json:"adopted_at"`
}

func (d *daemon) worker(id string) apiWorker {
	d.t.Helper()
	code, b := d.request("GET", "/v1/workers/"+id, "")
	var w apiWorker
	if code != 200 || json.Unmarshal(b, &w) != nil {
		d.t.Fatalf("GET worker %s: %d %s", id, code, b)
	}
	return w
}

func (d *daemon) spawnBackend(backend, model, restart string) string {
	d.t.Helper()
	code, b := d.request("POST", "/v1/workers/spawn", fmt.Sprintf(`{"model_ref":"file:%s","backend":%q,"device":0,"restart":%q}`, model, backend, restart))
	if code != 200 {
		d.t.Fatalf("spawn %s: %d %s", backend, code, b)
	}
	var res struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(b, &res)
	return res.WorkerID
}

func (d *daemon) waitWorker(what, id string, timeout time.Duration, cond func(apiWorker) bool) apiWorker {
	d.t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		w := d.worker(id)
		if cond(w) {
			return w
		}
		if time.Now().After(deadline) {
			d.t.Fatalf("%s: worker %s is %+v", what, id, w)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// workerToken reads the token a worker was started with from its
// environment, as the worker itself uses it.
func workerToken(t *testing.T, pid int) string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range bytes.Split(b, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("RBEE_WORKER_TOKEN=")); ok {
			return string(v)
		}
	}
	t.Fatalf("no RBEE_WORKER_TOKEN in pid %d's environment", pid)
	return ""
}

// alive reports whether pid runs (a zombie whose reaper has not come yet
// counts as ended: a hive's orphans are reaped by init).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] != 'Z' && b[i+2] != 'X'
}

// TestKilledHiveWorkersAdopted: the hive is SIGKILLed with workers idle
// (writing output), busy (a stream in flight), loading, in their restart
// backoff and stale, and one more worker is killed while no hive runs. The
// restarted hive adopts every live worker with the same id, pid and url,
// answers its token, keeps its heartbeats (and marks the silent one stale
// again), resumes the backoff, restarts the lost worker by its policy,
// classifies an OOM after adoption as oom, stops an adopted worker on
// DELETE, and ships the output written while it was down without a gap,
// while the worker kept writing (a pipe would have blocked it at 64 KiB).
func TestKilledHiveWorkersAdopted(t *testing.T) {
	d := startDaemon(t, adoptConfig)
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	chat := d.spawnBackend("chat", model, "on-failure")
	slow := d.spawnBackend("slow", model, "on-failure")
	loader := d.spawnBackend("loader", model, "never")
	crasher := d.spawnBackend("crasher", model, "on-failure")
	hanger := d.spawnBackend("hanger", model, "on-failure")
	victim := d.spawnBackend("plain", model, "on-failure")
	before := map[string]apiWorker{}
	for _, id := range []string{chat, slow, victim} {
		before[id] = d.waitWorker("idle", id, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })
	}
	before[hanger] = d.waitWorker("stale", hanger, 20*time.Second, func(w apiWorker) bool { return w.State == "stale" })
	d.waitWorker("in backoff", crasher, 20*time.Second, func(w apiWorker) bool { return w.State == "restarting" })
	before[loader] = d.waitWorker("loading", loader, 5*time.Second, func(w apiWorker) bool { return w.State == "loading" && w.PID != nil })
	tokens := map[string]string{}
	for id, w := range before {
		tokens[id] = workerToken(t, *w.PID)
	}

	// A stream in flight on the busy worker.
	req, _ := http.NewRequest("POST", d.url+"/v1/workers/"+slow+"/inference", strings.NewReader(`{"job_id":"adopt-1","prompt":"hi","max_tokens":200}`))
	req.Header.Set("Authorization", "Bearer "+d.token())
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("inference: %v %v", err, resp)
	}
	defer resp.Body.Close()
	if _, err := bufio.NewReader(resp.Body).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	d.waitWorker("busy", slow, 5*time.Second, func(w apiWorker) bool { return w.State == "busy" })

	outFile := filepath.Join(d.stateDir, "output", chat+".stdout")
	size := func() int64 {
		st, err := os.Stat(outFile)
		if err != nil {
			t.Fatal(err)
		}
		return st.Size()
	}
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d.done
	atKill := size()
	if err := syscall.Kill(*before[victim].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1500 * time.Millisecond) // no hive: the worker writes on
	grown := size() - atKill
	if grown <= 64<<10 {
		t.Errorf("output grew %d bytes while no hive ran; the worker was held up", grown)
	}
	for id, w := range before {
		if id != victim && !alive(*w.PID) {
			t.Errorf("worker %s (pid %d) did not survive the hive", id, *w.PID)
		}
	}

	d2 := d.restart()
	for _, id := range []string{chat, slow, hanger, loader} {
		w := d2.worker(id)
		b := before[id]
		if w.PID == nil || *w.PID != *b.PID || w.URL != b.URL || w.AdoptedAt == nil {
			t.Errorf("worker %s after restart: %+v, before %+v", id, w, b)
		}
		code, body := d2.requestAs(tokens[id], "POST", "/v1/heartbeat", fmt.Sprintf(`{"worker_id":%q,"health_status":"healthy"}`, id))
		if code != 200 {
			t.Errorf("worker %s's own token refused by the new hive: %d %s", id, code, body)
		}
	}
	if got := d2.metric("rbee_hive_workers_adopted_total"); got != 4 {
		t.Errorf("rbee_hive_workers_adopted_total = %v, want 4", got)
	}
	if w := d2.worker(slow); w.State != "idle" {
		t.Errorf("busy worker adopted as %q, want idle (its stream ended with the old hive)", w.State)
	}
	// Heartbeats continue: the chatty worker stays idle past two thresholds
	// while the silent one is found stale again.
	stale0 := d2.metric("rbee_hive_workers_stale_total")
	d2.waitWorker("stale detection after adoption", hanger, 20*time.Second, func(w apiWorker) bool {
		return d2.metric("rbee_hive_workers_stale_total") > stale0
	})
	time.Sleep(4 * time.Second)
	if w := d2.worker(chat); w.State != "idle" {
		t.Errorf("heartbeating adopted worker is %q", w.State)
	}
	// The lost worker: restarted by its policy.
	v := d2.waitWorker("lost worker restarted", victim, 30*time.Second, func(w apiWorker) bool {
		return w.State == "idle" && w.PID != nil && *w.PID != *before[victim].PID
	})
	if v.RestartCount < 1 {
		t.Errorf("lost worker restart_count %d", v.RestartCount)
	}
	if got := d2.metric(`rbee_hive_worker_exits_total{reason="lost"}`); got != 1 {
		t.Errorf("exits{reason=lost} = %v, want 1", got)
	}
	// The worker in its backoff was started again.
	d2.waitWorker("backoff resumed", crasher, 30*time.Second, func(w apiWorker) bool { return w.RestartCount >= 1 })
	// The loading worker: ready after adoption, then OOM.
	d2.waitWorker("oom after adoption", loader, 40*time.Second, func(w apiWorker) bool { return w.State == "failed" })
	if w := d2.worker(loader); w.ExitReason != "oom" {
		t.Errorf("adopted worker's OOM classified %q", w.ExitReason)
	}
	// DELETE stops an adopted worker.
	if code, b := d2.request("DELETE", "/v1/workers/"+slow, ""); code != 200 {
		t.Errorf("DELETE adopted worker: %d %s", code, b)
	}
	if alive(*before[slow].PID) {
		t.Errorf("adopted worker %d still alive after DELETE", *before[slow].PID)
	}
	// Output: every chatter line up to now is in the log, none missing.
	final := size()
	logPath := filepath.Join(d.stateDir, "workers", chat+".log")
	re := regexp.MustCompile(`chatter seq=(\d+)`)
	deadline := time.Now().Add(20 * time.Second)
	for {
		data, err := os.ReadFile(logPath)
		if err != nil {
			t.Fatal(err)
		}
		seen := map[int]bool{}
		hi := -1
		for _, m := range re.FindAllSubmatch(data, -1) {
			n, _ := strconv.Atoi(string(m[1]))
			seen[n] = true
			hi = max(hi, n)
		}
		missing := 0
		for i := 0; i <= hi; i++ {
			if !seen[i] {
				missing++
			}
		}
		if missing > 0 {
			t.Fatalf("%d chatter lines of %d missing from the worker log", missing, hi+1)
		}
		if int64(hi+1)*154 >= final {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("log holds %d lines, the output file %d bytes", hi+1, final)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// requestAs is request with another bearer token.
func (d *daemon) requestAs(token, method, path, body string) (int, []byte) {
	d.t.Helper()
	req, err := http.NewRequest(method, d.url+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	return resp.StatusCode, buf.Bytes()
}

// TestBadRegistryHiveStarts: after a hive is killed, a tampered row (its
// leaf pointed outside the hive's tree) is dropped and logged and its
// worker killed as a leftover, while the untouched worker is adopted; a
// registry that is not a database at all is moved aside and the hive
// starts, adopting nothing and killing the leftovers.
func TestBadRegistryHiveStarts(t *testing.T) {
	d := startDaemon(t, adoptConfig)
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := d.spawnBackend("plain", model, "on-failure")
	bad := d.spawnBackend("plain", model, "on-failure")
	gw := d.waitWorker("idle", good, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })
	bw := d.waitWorker("idle", bad, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d.done
	dbPath := filepath.Join(d.stateDir, "workers.db")
	db, err := sql.Open("sqlite", dbPath)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`UPDATE workers SET cgroup_path = '/etc/`+bad+`' WHERE id = ?`, bad); err != nil {
		t.Fatal(err)
	}
	db.Close()

	d2 := d.restart()
	if w := d2.worker(good); w.PID == nil || *w.PID != *gw.PID {
		t.Errorf("untouched worker not adopted: %+v", w)
	}
	if code, _ := d2.request("GET", "/v1/workers/"+bad, ""); code != 404 {
		t.Errorf("worker of the tampered row: %d, want 404", code)
	}
	waitCLI(t, "tampered row's worker killed", func() bool { return !alive(*bw.PID) })
	if !strings.Contains(d2.logs.String(), "worker registry row dropped") {
		t.Error("dropped row not logged")
	}

	if err := d2.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d2.done
	for _, suffix := range []string{"-wal", "-shm"} {
		_ = os.Remove(dbPath + suffix)
	}
	if err := os.WriteFile(dbPath, []byte("this is not a database, it is a tampered file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d3 := d2.restart()
	if code, _ := d3.request("GET", "/v1/workers/"+good, ""); code != 404 {
		t.Errorf("worker adopted from a corrupt registry: %d", code)
	}
	waitCLI(t, "leftover killed", func() bool { return !alive(*gw.PID) })
	aside, _ := filepath.Glob(dbPath + ".corrupt-*")
	if len(aside) == 0 || !strings.Contains(d3.logs.String(), "moved aside") {
		t.Errorf("corrupt registry not moved aside (%v) or not logged", aside)
	}
}

// TestAdoptOffKillsLeftovers: with workers.adopt = false a killed hive's
// workers are killed at the next start, as before the registry.
func TestAdoptOffKillsLeftovers(t *testing.T) {
	d := startDaemon(t, strings.Replace(adoptConfig, "[workers]\n", "[workers]\nadopt = false\n", 1))
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := d.spawnBackend("plain", model, "on-failure")
	w := d.waitWorker("idle", id, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })
	if err := d.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	<-d.done
	d2 := d.restart()
	if code, _ := d2.request("GET", "/v1/workers/"+id, ""); code != 404 {
		t.Errorf("worker adopted with workers.adopt = false: %d", code)
	}
	waitCLI(t, "leftover killed", func() bool { return !alive(*w.PID) })
	if _, err := os.Stat(filepath.Join(d.stateDir, "workers.db")); !os.IsNotExist(err) {
		t.Errorf("registry kept with workers.adopt = false: %v", err)
	}
}
