package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/supervisor"
)

// miniHub serves the part of the HuggingFace API a one-file GGUF pull
// uses: the tree listing (LFS size and sha256) and the resolve download.
func miniHub(t *testing.T, repo, file string, content []byte) *httptest.Server {
	t.Helper()
	sum := sha256.Sum256(content)
	mux := http.NewServeMux()
	mux.HandleFunc("GET /api/models/"+repo+"/tree/main", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode([]map[string]any{{
			"type": "file", "path": file, "size": len(content), "oid": "0123456789abcdef0123456789abcdef01234567",
			"lfs": map[string]any{"oid": hex.EncodeToString(sum[:]), "size": len(content)},
		}})
	})
	mux.HandleFunc("GET /"+repo+"/resolve/main/"+file, func(w http.ResponseWriter, r *http.Request) {
		http.ServeContent(w, r, file, time.Time{}, bytes.NewReader(content))
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// cli runs one CLI command against d and returns its exit code and output.
func cli(t *testing.T, d *daemon, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var out bytes.Buffer
	// Flags go after the subcommand: `workers ls --url ...`.
	full := append([]string{args[0], args[1], "--url", d.url, "--token-file", filepath.Join(d.stateDir, "api-token")}, args[2:]...)
	code := run(ctx, full, &out, &out)
	return code, out.String()
}

func TestCLIWorkersAndModels(t *testing.T) {
	content := bytes.Repeat([]byte("gguf"), 64<<10) // 256 KiB
	hub := miniHub(t, "acme/tiny-GGUF", "tiny.Q4.gguf", content)
	d := startDaemon(t, fmt.Sprintf("[models]\nhf_endpoint = %q\n[resources]\ndisk_reserve = \"1MiB\"\n", hub.URL))

	// models pull downloads, verifies and registers; ls shows it.
	code, out := cli(t, d, "models", "pull", "hf:acme/tiny-GGUF:tiny.Q4.gguf")
	if code != 0 || !strings.Contains(out, "downloaded to") {
		t.Fatalf("models pull: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "models", "ls"); code != 0 || !strings.Contains(out, "hf:acme/tiny-GGUF") {
		t.Fatalf("models ls: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "models", "pull", "hf:acme/tiny-GGUF:tiny.Q4.gguf"); code != 0 || !strings.Contains(out, "already present") {
		t.Errorf("second pull: %d\n%s", code, out)
	}

	// A worker on that model: spawn, show, logs, and rm refused while in use.
	code, out = cli(t, d, "workers", "spawn", "--json", "--backend", "sim", "--model", "hf:acme/tiny-GGUF:tiny.Q4.gguf")
	if code != 0 {
		t.Fatalf("workers spawn: %d\n%s", code, out)
	}
	var spawned struct {
		WorkerID string `json:"worker_id"`
	}
	if err := json.Unmarshal([]byte(out), &spawned); err != nil || spawned.WorkerID == "" {
		t.Fatalf("spawn output %q: %v", out, err)
	}
	id := spawned.WorkerID
	waitCLI(t, "worker idle", func() bool {
		_, out := cli(t, d, "workers", "ls")
		return strings.Contains(out, id) && strings.Contains(out, " idle ")
	})
	if code, out = cli(t, d, "workers", "show", "--json", id); code != 0 || !strings.Contains(out, `"state": "idle"`) {
		t.Errorf("workers show --json: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "workers", "show", id); code != 0 || !regexp.MustCompile(`(?m)^state:\s+idle`).MatchString(out) ||
		!regexp.MustCompile(`(?m)^id:\s+`+id+`$`).MatchString(out) {
		t.Errorf("workers show: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "workers", "logs", id); code != 0 || !strings.Contains(out, "ready") {
		t.Errorf("workers logs: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "models", "rm", "hf:acme/tiny-GGUF:tiny.Q4.gguf"); code != 1 || !strings.Contains(out, "409") {
		t.Errorf("models rm while in use: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "workers", "stop", id); code != 0 || !strings.Contains(out, "stopped") {
		t.Fatalf("workers stop: %d\n%s", code, out)
	}
	if code, out = cli(t, d, "models", "rm", "hf:acme/tiny-GGUF:tiny.Q4.gguf"); code != 0 {
		t.Errorf("models rm: %d\n%s", code, out)
	}
	if _, out = cli(t, d, "models", "ls", "--json"); strings.Contains(out, "tiny-GGUF") {
		t.Errorf("model still listed after rm:\n%s", out)
	}

	// Bad input is a clear error with exit code 1 or 2, never a crash.
	for _, args := range [][]string{
		{"workers", "spawn", "--backend", "nope", "--model", "file:/etc/hostname"},
		{"workers", "spawn", "--backend", "sim", "--model", "hf:../../etc"},
		{"workers", "stop", "w-doesnotexist"},
		{"models", "pull", "s3:bucket/x"},
	} {
		code, out := cli(t, d, args...)
		if code != 1 || !strings.Contains(out, "hive answered 4") {
			t.Errorf("%v: exit %d\n%s", args, code, out)
		}
	}
	if code, out := cli(t, d, "workers", "frobnicate"); code != 2 {
		t.Errorf("unknown subcommand: exit %d\n%s", code, out)
	}
}

func waitCLI(t *testing.T, what string, ok func() bool) {
	t.Helper()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(100 * time.Millisecond) {
		if ok() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestCLIDetect(t *testing.T) {
	var out bytes.Buffer
	if code := run(context.Background(), []string{"detect", "--json"}, &out, &out); code != 0 {
		t.Fatalf("detect: %d %s", code, out.String())
	}
	var d detection
	if err := json.Unmarshal(out.Bytes(), &d); err != nil {
		t.Fatalf("detect --json: %v\n%s", err, out.String())
	}
	if !strings.HasPrefix(d.CgroupMode, "v1") && !strings.HasPrefix(d.CgroupMode, "v2") {
		t.Errorf("cgroup mode %q", d.CgroupMode)
	}
	if !slices.Contains(d.Controllers, "memory") || d.MemoryTotal == 0 || d.MemoryAvailable == 0 || d.MemoryAvailable > d.MemoryTotal {
		t.Errorf("detection %+v", d)
	}
	// No NVIDIA driver on CI: no GPUs, a reason, and no crash.
	if d.GPU.Backend != "none" && len(d.GPU.Devices) == 0 {
		t.Errorf("gpu %+v", d.GPU)
	}
}

// TestPrintWorker: the human view of `workers show` names each field once,
// shows only those with a value, and durations relative to now.
func TestPrintWorker(t *testing.T) {
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	pid, code := 4242, 1
	started, beat := now.Add(-90*time.Second), now.Add(-1500*time.Millisecond)
	cpu, vram := 12.5, uint64(3<<30)
	wi := supervisor.WorkerInfo{ID: "w-abc", URL: "http://127.0.0.1:9300", ModelRef: "hf:acme/tiny", Backend: "sim",
		State: supervisor.StateIdle, StateReason: "ready (READY=1)", PID: &pid, StartedAt: &started, LastHeartbeat: &beat,
		Health: "healthy", HealthMode: "notify", RestartPolicy: supervisor.RestartOnFailure, RestartCount: 2,
		ExitReason: supervisor.ReasonExited, ExitCode: &code, MemoryLimitBytes: 4 << 30,
		Resources: &supervisor.Resources{MemoryCurrentBytes: 1 << 30, MemoryPeakBytes: 2 << 30, CPUPercent: &cpu, VRAMBytes: &vram},
		Figures:   map[string]string{"RBEE_TOKENS_PER_SEC": "41.5"}}
	var b strings.Builder
	if err := printWorker(&b, wi, now); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		`(?m)^id:\s+w-abc$`,
		`(?m)^state:\s+idle \(ready \(READY=1\)\)$`,
		`(?m)^backend:\s+sim \(device 0, health mode notify\)$`,
		`(?m)^pid:\s+4242$`,
		`(?m)^uptime:\s+1m30s$`,
		`(?m)^last heartbeat:\s+1\.5s ago$`,
		`(?m)^restarts:\s+2 \(policy on-failure\)$`,
		`(?m)^last exit:\s+exited, code 1$`,
		`(?m)^cpu:\s+12\.5%$`,
		`(?m)^RBEE_TOKENS_PER_SEC:\s+41\.5$`,
	} {
		if !regexp.MustCompile(want).MatchString(out) {
			t.Errorf("human view lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, "{") || strings.Contains(out, "status:") {
		t.Errorf("human view has JSON or an empty field:\n%s", out)
	}
}
