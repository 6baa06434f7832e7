package engine

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// llamaServer is the genuine llama-server (scripts/build-llama-server.sh
// prints its path; `make enginetest` passes it as RBEE_LLAMA_SERVER). Without
// it the test skips, except under CI, where it must run.
func llamaServer(t testing.TB) string {
	t.Helper()
	why := ""
	bin := os.Getenv("RBEE_LLAMA_SERVER")
	switch {
	case os.Geteuid() != 0:
		why = "needs root (cgroups)"
	case bin == "":
		why = "RBEE_LLAMA_SERVER is not set (make enginetest builds llama-server and sets it)"
	default:
		if _, err := os.Stat(bin); err != nil {
			why = "RBEE_LLAMA_SERVER: " + err.Error()
		}
	}
	if why == "" {
		return bin
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s (CI must run this test: make enginetest)", why)
	}
	t.Skip(why)
	return ""
}

// hive is a running `rbee-hive daemon` built from this tree.
type hive struct {
	t          testing.TB
	cmd        *exec.Cmd
	url        string
	token      string
	cgroupRoot string
	logs       *testkit.SyncBuffer
	done       chan struct{}
}

// passableTempDir is t.TempDir with it and its parent 0711: workers run
// under uids of their own and must pass through to their model files and
// the state dir, as they pass through /var/lib.
func passableTempDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func buildHive(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	cmd := exec.Command("go", "build", "-o", dir, "./cmd/rbee-hive")
	cmd.Dir = "../.."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return filepath.Join(dir, "rbee-hive")
}

func startHive(t testing.TB, backends string) *hive {
	t.Helper()
	bin := buildHive(t)
	dir := passableTempDir(t)
	rt, err := os.MkdirTemp("", "rbe")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(rt) })
	if err := os.Chmod(rt, 0o711); err != nil {
		t.Fatal(err)
	}
	var b [4]byte
	_, _ = rand.Read(b[:])
	root := "rbee-engine-" + hex.EncodeToString(b[:])
	if cgroupV2() {
		root = "/sys/fs/cgroup/" + root
	}
	port := testkit.FreePort(t)
	cfg := fmt.Sprintf(`listen = "127.0.0.1:%d"
state_dir = %q
runtime_dir = %q
log_format = "json"

# The tests write their GGUF files to their own temp dirs.
[models]
file_roots = [%q]

[cgroup]
root = %q

[workers]
grace_period = "3s"
shutdown_budget = "20s"
port_min = 40000
port_max = 44999

[workers.restart]
backoff_base = "200ms"
backoff_max = "1s"
jitter = 0.0
max_failures = 3
failure_window = "60s"
%s`, port, filepath.Join(dir, "state"), rt, filepath.Clean(os.TempDir()), root, backends)
	cfgPath := filepath.Join(dir, "hive.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	h := &hive{t: t, url: fmt.Sprintf("http://127.0.0.1:%d", port), cgroupRoot: root, logs: &testkit.SyncBuffer{}, done: make(chan struct{})}
	h.cmd = exec.Command(bin, "daemon", "--config", cfgPath)
	h.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + dir}
	h.cmd.Stdout, h.cmd.Stderr = h.logs, h.logs
	h.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = h.cmd.Wait(); close(h.done) }()
	t.Cleanup(h.cleanup)
	waitFor(t, 30*time.Second, "the hive's /v1/health", func() bool {
		select {
		case <-h.done:
			t.Fatalf("hive exited at start: %v\n%s", h.cmd.ProcessState, h.logs.String())
		default:
		}
		resp, err := http.Get(h.url + "/v1/health")
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK
	})
	tok, err := os.ReadFile(filepath.Join(dir, "state", "api-token"))
	if err != nil {
		t.Fatal(err)
	}
	h.token = strings.TrimSpace(string(tok))
	return h
}

func (h *hive) cleanup() {
	select {
	case <-h.done:
	default:
		_ = h.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.done:
		case <-time.After(40 * time.Second):
			h.t.Errorf("hive ignored SIGTERM for 40s")
			_ = h.cmd.Process.Kill()
			<-h.done
		}
	}
	for _, d := range cgroupDirs(h.cgroupRoot) {
		leaves, _ := filepath.Glob(filepath.Join(d, "workers", "w-*"))
		for _, leaf := range leaves {
			h.t.Errorf("worker cgroup %s left behind", leaf)
		}
		for _, sub := range []string{"workers", "supervisor", ""} {
			_ = os.Remove(filepath.Join(d, sub))
		}
	}
	if h.t.Failed() {
		h.t.Logf("hive output:\n%s", h.logs.String())
	}
}

func cgroupV2() bool {
	_, err := os.Stat("/sys/fs/cgroup/cgroup.controllers")
	return err == nil
}

// cgroupDirs are the hive root's directories: itself on v2, nested under
// this process's cgroup in every v1 hierarchy.
func cgroupDirs(root string) []string {
	if filepath.IsAbs(root) {
		return []string{root}
	}
	data, _ := os.ReadFile("/proc/self/cgroup")
	seen := map[string]bool{}
	var dirs []string
	for _, line := range strings.Split(string(data), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 || parts[1] == "" || strings.HasPrefix(parts[1], "name=") {
			continue
		}
		d := filepath.Join("/sys/fs/cgroup", parts[1], parts[2], root)
		if !seen[d] {
			seen[d] = true
			dirs = append(dirs, d)
		}
	}
	return dirs
}

// req sends an authenticated request to the hive.
func (h *hive) req(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.url+path, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+h.token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return http.DefaultClient.Do(req)
}

// do is req, read to the end; it fails the test on a transport error.
func (h *hive) do(method, path string, body any) (int, []byte) {
	h.t.Helper()
	resp, err := h.req(context.Background(), method, path, body)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

// workerInfo is the part of GET /v1/workers/{id} the test reads.
type workerInfo struct {
	ID             string `json:"id"`
	URL            string `json:"url"`
	State          string `json:"state"`
	PID            *int   `json:"pid"`
	SlotsTotal     int    `json:"slots_total"`
	SlotsAvailable int    `json:"slots_available"`
	ContextSize    int    `json:"context_size"`
	InFlight       int    `json:"in_flight"`
	RestartCount   int    `json:"restart_count"`
	ExitReason     string `json:"exit_reason"`
	StateReason    string `json:"state_reason"`
}

func (h *hive) worker(id string) (workerInfo, int) {
	h.t.Helper()
	code, b := h.do("GET", "/v1/workers/"+id, nil)
	var wi workerInfo
	if code == http.StatusOK {
		if err := json.Unmarshal(b, &wi); err != nil {
			h.t.Fatalf("worker %s: %v: %s", id, err, b)
		}
	}
	return wi, code
}

func (h *hive) metrics() string {
	h.t.Helper()
	resp, err := http.Get(h.url + "/metrics")
	if err != nil {
		h.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return string(b)
}

// waitFor polls cond every 50ms until it holds or timeout passes.
func waitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
