package testkit

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
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// HiveEnv is where a test's `rbee-hive daemon` lives; its config is written
// from these paths.
type HiveEnv struct {
	Dir        string // a temp dir: hive.toml and the daemon's HOME
	State      string // <Dir>/state, the state_dir
	Runtime    string // the runtime_dir, short enough for the notify socket
	CgroupRoot string // a root of its own: relative (nested under this process's v1 cgroups) or absolute on v2
	Port       int    // the listen port on 127.0.0.1
	URL        string // http://127.0.0.1:<Port>
}

// NewHiveEnv makes a HiveEnv whose cgroup root is cgroupPrefix and a random
// suffix: a root of its own, because other packages' tests run hives at the
// same time.
func NewHiveEnv(t testing.TB, cgroupPrefix string) HiveEnv {
	t.Helper()
	dir := PassableTempDir(t)
	// The notify socket path must fit a sockaddr_un (107 bytes); TempDir
	// paths can be long.
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
	root := cgroupPrefix + hex.EncodeToString(b[:])
	if CgroupV2() {
		root = "/sys/fs/cgroup/" + root
	}
	port := FreePort(t)
	return HiveEnv{Dir: dir, State: filepath.Join(dir, "state"), Runtime: rt, CgroupRoot: root,
		Port: port, URL: fmt.Sprintf("http://127.0.0.1:%d", port)}
}

// PassableTempDir is t.TempDir with it and its parent 0711: workers run
// under uids of their own and must pass through to the notify socket, their
// model files and the state dir, as they pass through /run and /var/lib.
func PassableTempDir(t testing.TB) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// PlaceholderModel writes a model file for rbee-simworker below model_dir
// (<state_dir>/models, the default models.file_roots) and returns its path.
func (e HiveEnv) PlaceholderModel(t testing.TB) string {
	t.Helper()
	model := filepath.Join(e.State, "models", "model.gguf")
	if err := os.MkdirAll(filepath.Dir(model), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(model, []byte("rbee-simworker placeholder model\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return model
}

// HiveOptions say how StartHive runs the daemon.
type HiveOptions struct {
	Bin          string        // the rbee-hive binary
	Config       string        // hive.toml's text, written from the HiveEnv
	StartTimeout time.Duration // until /v1/health answers 200
	StopTimeout  time.Duration // from SIGTERM at cleanup until it must have exited
	MustOutlive  bool          // the hive exiting before cleanup fails the test
	LogTail      int           // on failure log only the output's last LogTail bytes (0: all)
}

// Hive is a running `rbee-hive daemon`.
type Hive struct {
	HiveEnv
	T     testing.TB
	Cmd   *exec.Cmd
	Token string
	Logs  *SyncBuffer
	Done  chan struct{} // closed when the daemon has exited
}

// StartHive writes o.Config to <Dir>/hive.toml, runs the daemon with a bare
// environment, waits for /v1/health and reads the API token. At cleanup it
// stops the daemon (SIGTERM: it stops its workers), fails the test for any
// worker cgroup left behind (and kills it) and removes the root's
// directories.
func StartHive(t testing.TB, env HiveEnv, o HiveOptions) *Hive {
	t.Helper()
	cfgPath := filepath.Join(env.Dir, "hive.toml")
	if err := os.WriteFile(cfgPath, []byte(o.Config), 0o600); err != nil {
		t.Fatal(err)
	}
	h := &Hive{HiveEnv: env, T: t, Logs: &SyncBuffer{}, Done: make(chan struct{})}
	h.Cmd = exec.Command(o.Bin, "daemon", "--config", cfgPath)
	// No NOTIFY_SOCKET, LLORCH_API_TOKEN, ... from whoever runs the tests.
	h.Cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "HOME=" + env.Dir}
	h.Cmd.Stdout, h.Cmd.Stderr = h.Logs, h.Logs
	h.Cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := h.Cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { _ = h.Cmd.Wait(); close(h.Done) }()
	t.Cleanup(func() { h.stop(o) })
	WaitHealthy(t, http.DefaultClient, h.URL, o.StartTimeout, h.Done, func() string {
		return fmt.Sprintf("%v\n%s", h.Cmd.ProcessState, h.Logs.String())
	})
	tok, err := os.ReadFile(filepath.Join(env.State, "api-token"))
	if err != nil {
		t.Fatal(err)
	}
	h.Token = strings.TrimSpace(string(tok))
	return h
}

// Request sends an API request with the hive's token; body, if not nil,
// goes as JSON.
func (h *Hive) Request(ctx context.Context, method, path string, body any) (*http.Response, error) {
	var r io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, err
		}
		r = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, h.URL+path, r)
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+h.Token)
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	return http.DefaultClient.Do(req)
}

// Try is Request read to the end, without failing the test (for
// goroutines and timed calls).
func (h *Hive) Try(ctx context.Context, method, path string, body any) (int, []byte, error) {
	resp, err := h.Request(ctx, method, path, body)
	if err != nil {
		return 0, nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, b, err
}

// Do is Try that fails the test on a transport or read error.
func (h *Hive) Do(method, path string, body any) (int, []byte) {
	h.T.Helper()
	code, b, err := h.Try(context.Background(), method, path, body)
	if err != nil {
		h.T.Fatalf("%s %s: %v", method, path, err)
	}
	return code, b
}

// GetJSON GETs path and, on 200, decodes the answer into v (failing the
// test if it is not JSON); it returns the status.
func (h *Hive) GetJSON(path string, v any) int {
	h.T.Helper()
	code, b := h.Do("GET", path, nil)
	if code == http.StatusOK {
		if err := json.Unmarshal(b, v); err != nil {
			h.T.Fatalf("GET %s: %v: %s", path, err, b)
		}
	}
	return code
}

// Metrics is the hive's /metrics text; anything but a 200 fails the test.
func (h *Hive) Metrics() []byte {
	h.T.Helper()
	resp, err := http.Get(h.URL + "/metrics")
	if err != nil {
		h.T.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		h.T.Fatalf("/metrics: %d %v", resp.StatusCode, err)
	}
	return b
}

// WaitFor polls cond every 50ms until it holds or timeout passes.
func WaitFor(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// WaitHealthy polls url's /v1/health until it answers 200; it fails the test
// if exited is closed first (describe says why) or timeout passes.
func WaitHealthy(t testing.TB, client *http.Client, url string, timeout time.Duration, exited <-chan struct{}, describe func() string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		resp, err := client.Get(url + "/v1/health")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case <-exited:
			t.Fatalf("hive exited at start: %s", describe())
		case <-time.After(50 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("hive not answering /v1/health within %v: %s", timeout, describe())
		}
	}
}

func (h *Hive) stop(o HiveOptions) {
	t := h.T
	select {
	case <-h.Done:
		if o.MustOutlive {
			t.Errorf("the hive exited before the test ended: %v", h.Cmd.ProcessState)
		}
	default:
		_ = h.Cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-h.Done:
		case <-time.After(o.StopTimeout):
			t.Errorf("hive ignored SIGTERM for %v; killing it", o.StopTimeout)
			_ = h.Cmd.Process.Kill()
			<-h.Done
		}
	}
	for _, d := range CgroupDirs(h.CgroupRoot) {
		leaves, _ := filepath.Glob(filepath.Join(d, "workers", "w-*"))
		for _, leaf := range leaves {
			t.Errorf("worker cgroup %s left behind after the hive stopped", leaf)
			KillCgroup(leaf)
		}
		for _, sub := range []string{"workers", "supervisor", ""} {
			_ = os.Remove(filepath.Join(d, sub))
		}
	}
	if t.Failed() {
		logs := h.Logs.String()
		if o.LogTail > 0 && len(logs) > o.LogTail {
			logs = "...\n" + logs[len(logs)-o.LogTail:]
		}
		t.Logf("hive output:\n%s", logs)
	}
}

// CgroupV2 reports whether /sys/fs/cgroup is the unified (v2) hierarchy.
func CgroupV2() bool {
	_, err := os.Stat("/sys/fs/cgroup/cgroup.controllers")
	return err == nil
}

// CgroupDirs are the directories of a hive cgroup root: itself on v2; on
// v1 the root nested under this process's cgroup in every hierarchy (the
// hive inherits our cgroups).
func CgroupDirs(root string) []string {
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

// CgroupPIDs are the processes in a cgroup directory (none if unreadable).
func CgroupPIDs(dir string) []int {
	data, _ := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	var pids []int
	for _, f := range strings.Fields(string(data)) {
		if pid, err := strconv.Atoi(f); err == nil {
			pids = append(pids, pid)
		}
	}
	return pids
}

// KillCgroup SIGKILLs every process of a leaf and removes it.
func KillCgroup(dir string) {
	for range 50 {
		pids := CgroupPIDs(dir)
		if len(pids) == 0 {
			break
		}
		for _, pid := range pids {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = os.Remove(dir)
}
