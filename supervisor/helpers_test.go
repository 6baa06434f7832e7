package supervisor

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/supervisor/notify"
)

// simDir holds the rbee-simworker binary; set once in TestMain.
var simDir string

func TestMain(m *testing.M) {
	cgroup.MaybeRunGate()
	if os.Getenv(firstHiveEnv) != "" {
		os.Exit(runFirstHive())
	}
	if os.Getenv(senderEnv) != "" {
		os.Exit(runSender())
	}
	if pid := os.Getenv(forgeEnv); pid != "" {
		os.Exit(forgeCredentials(pid))
	}
	if msg := os.Getenv(sendEnv); msg != "" {
		os.Exit(sendOnce(msg))
	}
	os.Exit(runTests(m))
}

func runTests(m *testing.M) int {
	// This binary doubles as the forger of TestIsolatedWorkerAttacks; a
	// worker must be able to run it, and the go build cache is 0700.
	fdir, err := os.MkdirTemp("", "rbee-sup-forger")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(fdir)
	forgerPath = filepath.Join(fdir, "forger")
	if err := copyTestBinary(forgerPath); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := os.Chmod(fdir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if p := os.Getenv("RBEE_SIMWORKER"); p != "" {
		simDir = filepath.Dir(p)
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "rbee-sup-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// Workers run under uids of their own: they must reach the binary.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	out, err := exec.Command("go", "build", "-o", filepath.Join(dir, "rbee-simworker"), "github.com/rbee/rbee-hive/cmd/rbee-simworker").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building rbee-simworker: %v\n%s", err, out)
		return 1
	}
	simDir = dir
	return m.Run()
}

// forgerPath is a copy of this test binary that workers can execute; run
// with forgeEnv=<pid> it sends a datagram naming that pid (forgeCredentials).
var forgerPath string

const forgeEnv = "RBEE_TEST_FORGE_PID"

// sendEnv makes the binary send its value as one datagram to
// $NOTIFY_SOCKET and exit at once, as systemd-notify --no-block does
// (the stand-in where systemd-notify is not installed: the VM).
const sendEnv = "RBEE_TEST_SEND"

func sendOnce(msg string) int {
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: os.Getenv("NOTIFY_SOCKET"), Net: "unixgram"})
	if err == nil {
		_, err = c.Write([]byte(msg))
		c.Close()
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "send:", err)
		return 1
	}
	return 0
}

func copyTestBinary(dst string) error {
	self, err := os.Executable()
	if err != nil {
		return err
	}
	b, err := os.ReadFile(self)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}

// forgeCredentials sends WATCHDOG=1 to $NOTIFY_SOCKET with SCM_CREDENTIALS
// naming pid (and the sender's own uid and gid). Exit status: 0 sent,
// 1 refused by the kernel with EPERM, 2 anything else.
func forgeCredentials(pid string) int {
	n, err := strconv.Atoi(pid)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_DGRAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer syscall.Close(fd)
	oob := syscall.UnixCredentials(&syscall.Ucred{Pid: int32(n), Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid())})
	err = syscall.Sendmsg(fd, []byte("WATCHDOG=1"), oob, &syscall.SockaddrUnix{Name: os.Getenv("NOTIFY_SOCKET")}, 0)
	switch {
	case err == nil:
		return 0
	case errors.Is(err, syscall.EPERM):
		return 1
	}
	fmt.Fprintln(os.Stderr, "forge:", err)
	return 2
}

// simEnv are the simworker knobs a spawn request may set in tests.
var simEnv = []string{"RBEE_SIM_CRASH_AFTER", "RBEE_SIM_ALLOC_MIB", "RBEE_SIM_NO_HEARTBEAT",
	"RBEE_SIM_IGNORE_SIGTERM", "RBEE_SIM_LOAD_TIME", "RBEE_SIM_HANG_AFTER", "RBEE_SIM_LEAK_MIB_PER_SEC"}

func simCommand(extra ...string) []string {
	return append([]string{"{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}",
		"--model", "{model_path}", "--model-ref", "{model_ref}", "--tokens-per-second", "0"}, extra...)
}

// testConfig is the default config with test-sized timings and the backends
// the tests use.
func testConfig(t testing.TB) *config.Config {
	cfg := config.Default(true)
	cfg.StateDir = t.TempDir()
	rt, err := os.MkdirTemp("", "rbh") // short: unix socket paths are limited
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(rt) })
	// The notify socket is reached through workers.model_group (mode 0660);
	// its directory must let workers pass, as /run/rbee-hive (0755) does.
	if err := os.Chmod(rt, 0o711); err != nil {
		t.Fatal(err)
	}
	cfg.RuntimeDir = rt
	cfg.Heartbeat.NotifySocket = filepath.Join(rt, "notify.sock")
	cfg.Heartbeat.Interval = config.Duration(500 * time.Millisecond)
	cfg.Heartbeat.StaleThreshold = config.Duration(2 * time.Second)
	cfg.Workers.GracePeriod = config.Duration(2 * time.Second)
	cfg.Workers.ShutdownBudget = config.Duration(10 * time.Second)
	cfg.Workers.Restart.BackoffBase = config.Duration(20 * time.Millisecond)
	cfg.Workers.Restart.BackoffMax = config.Duration(200 * time.Millisecond)
	cfg.Workers.PortMin, cfg.Workers.PortMax = testPorts()
	cfg.Backends = map[string]config.Backend{
		"sim":     {Command: simCommand(), Health: "notify", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20, EnvAllow: simEnv},
		"simhttp": {Command: simCommand("--load-time", "300ms"), Health: "http", HealthPath: "/health", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20, EnvAllow: simEnv},
		"simcb":   {Command: simCommand(), Health: "callback", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20, EnvAllow: simEnv},
		// A worker that leaves a double-forked grandchild behind.
		"forker": {Command: []string{"/bin/sh", "-c", "(sleep 600 &) ; exec \"$0\" --port \"$1\" --worker-id \"$2\" --model x --tokens-per-second 0",
			"{self_dir}/rbee-simworker", "{port}", "{worker_id}"}, Health: "notify", LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20},
		"gpu": {Command: simCommand(), Health: "notify", CUDA: true, LoadTimeout: config.Duration(20 * time.Second), MemoryLimit: 256 << 20},
	}
	return &cfg
}

// newCgroups returns a manager over a uniquely named root, removed at the end.
func newCgroups(t testing.TB) cgroup.Manager {
	t.Helper()
	testkit.RequireRoot(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	root := "rbee-sup-" + hex.EncodeToString(b[:])
	opts := cgroup.Options{Root: root}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		opts.Root = "/sys/fs/cgroup/" + root
	}
	m, err := cgroup.New(opts)
	if err != nil {
		t.Fatalf("cgroup.New: %v", err)
	}
	t.Cleanup(func() { removeCgroupTree(t, m, root) })
	return m
}

// removeCgroupTree empties and deletes every leaf, then the tree's
// directories in every hierarchy.
func removeCgroupTree(t testing.TB, m cgroup.Manager, root string) {
	ids, _ := m.List()
	for _, id := range ids {
		t.Errorf("cgroup leaf %s left behind", id)
		if l, err := m.Load(id); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = l.Kill(ctx)
			cancel()
			_ = l.Delete()
		}
	}
	var dirs []string
	if m.Mode() == "v2" {
		dirs = []string{m.Root()}
	} else {
		data, _ := os.ReadFile("/proc/self/cgroup")
		for _, line := range strings.Split(string(data), "\n") {
			parts := strings.SplitN(line, ":", 3)
			if len(parts) != 3 || parts[1] == "" || strings.HasPrefix(parts[1], "name=") {
				continue
			}
			for _, c := range strings.Split(parts[1], ",") {
				dirs = append(dirs, filepath.Join("/sys/fs/cgroup", c, parts[2], root))
			}
		}
	}
	for _, d := range dirs {
		for _, sub := range []string{"workers", "supervisor", ""} {
			_ = os.Remove(filepath.Join(d, sub))
		}
	}
}

// harness is a supervisor with its notify socket and HTTP API.
type harness struct {
	t     testing.TB
	cfg   *config.Config
	cg    cgroup.Manager
	reg   *prometheus.Registry
	s     *Supervisor
	srv   *httptest.Server
	token string
	logs  *testkit.SyncBuffer
	gpu   *gpu.Fake // the hardware edge: two fake GPUs, GPU-aaaa and GPU-bbbb
}

func newHarness(t testing.TB, mutate ...func(*config.Config)) *harness {
	t.Helper()
	return newHarnessWrapped(t, nil, mutate...)
}

// newHarnessWrapped is newHarness with the supervisor's cgroup manager
// wrapped by wrap (nil: none), to stall or observe cgroup operations.
func newHarnessWrapped(t testing.TB, wrap func(cgroup.Manager) cgroup.Manager, mutate ...func(*config.Config)) *harness {
	t.Helper()
	cfg := testConfig(t)
	for _, f := range mutate {
		f(cfg)
	}
	fake, err := gpu.NewFake([]gpu.FakeDevice{{UUID: "GPU-aaaa", MemoryTotal: 80 << 30}, {UUID: "GPU-bbbb", MemoryTotal: 80 << 30}})
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, cfg: cfg, cg: newCgroups(t), reg: prometheus.NewRegistry(), token: "test-api-token", logs: &testkit.SyncBuffer{}, gpu: fake}
	var handler http.Handler = http.NotFoundHandler()
	h.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { handler.ServeHTTP(w, r) }))
	t.Cleanup(h.srv.Close)
	logger := slog.New(slog.NewTextHandler(io.MultiWriter(h.logs), &slog.HandlerOptions{Level: slog.LevelDebug}))
	cg := h.cg
	if wrap != nil {
		cg = wrap(cg)
	}
	s, err := New(cfg, Deps{Logger: logger, Cgroups: cg, Registry: h.reg, SelfDir: simDir, HiveURL: h.srv.URL,
		GPUs: gpuAdapter{fake}})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	h.s = s
	if _, err := s.Adopt(context.Background()); err != nil { // as the daemon does
		t.Fatalf("Adopt: %v", err)
	}
	rt := api.NewRouter(logger)
	auth := func(r *http.Request) *api.Error { return api.Authenticator{Token: h.token}.Check(r) }
	if err := rt.Register(auth, workerRoutes(s, auth)...); err != nil {
		t.Fatal(err)
	}
	handler = rt

	ln, err := notify.Listen(cfg.Heartbeat.NotifySocket)
	if err != nil {
		t.Fatalf("notify.Listen: %v", err)
	}
	// As the daemon does (it binds before New, which sets the group).
	if err := os.Chown(cfg.Heartbeat.NotifySocket, 0, int(s.ids.group)); err != nil {
		t.Fatal(err)
	}
	s.deps.NotifyDrops = func() map[string]uint64 { return ln.Stats().Dropped() }
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); _ = ln.Serve(ctx, s.HandleNotify) }()
	go func() { defer wg.Done(); _ = s.Run(ctx) }()
	t.Cleanup(func() {
		rep := s.Shutdown(context.Background())
		_ = rep
		cancel()
		wg.Wait()
		ln.Close()
		if t.Failed() {
			t.Logf("supervisor log:\n%s", h.logs.String())
		}
	})
	return h
}

// gpuAdapter fits a gpu.GPUs to the supervisor's GPUs, as cmd/rbee-hive's
// gpuList does for the daemon.
type gpuAdapter struct{ g gpu.GPUs }

func (a gpuAdapter) GPUDevices(ctx context.Context) ([]GPUDevice, error) {
	devs, err := a.g.Devices(ctx)
	if err != nil {
		return nil, err
	}
	out := make([]GPUDevice, 0, len(devs))
	for _, d := range devs {
		out = append(out, GPUDevice{Index: d.Index, UUID: d.UUID})
	}
	return out, nil
}

func (a gpuAdapter) GPUProcesses(ctx context.Context, index int) ([]GPUProcess, error) {
	procs, err := a.g.Processes(ctx, index)
	if err != nil {
		return nil, err
	}
	out := make([]GPUProcess, 0, len(procs))
	for _, p := range procs {
		out = append(out, GPUProcess{PID: p.PID, UsedBytes: p.UsedMemory})
	}
	return out, nil
}

// do sends a request to the API with the API token (or tok if given).
func (h *harness) do(method, path string, body any, tok ...string) (int, []byte) {
	h.t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	default:
		data, err := json.Marshal(b)
		if err != nil {
			h.t.Fatal(err)
		}
		rd = bytes.NewReader(data)
	}
	req, err := http.NewRequest(method, h.srv.URL+path, rd)
	if err != nil {
		h.t.Fatal(err)
	}
	token := h.token
	if len(tok) > 0 {
		token = tok[0]
	}
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	if rd != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		h.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, data
}

// spawn spawns through the API and fails the test unless it answers 200.
func (h *harness) spawn(req map[string]any) SpawnResult {
	h.t.Helper()
	if _, ok := req["model_ref"]; !ok {
		req["model_ref"] = "file:/models/tiny.gguf"
	}
	if _, ok := req["device"]; !ok {
		req["device"] = 0
	}
	if _, ok := req["model_path"]; !ok {
		req["model_path"] = ""
	}
	code, body := h.do("POST", "/v1/workers/spawn", req)
	if code != 200 {
		h.t.Fatalf("spawn: %d %s", code, body)
	}
	var res SpawnResult
	if err := json.Unmarshal(body, &res); err != nil {
		h.t.Fatal(err)
	}
	return res
}

func (h *harness) get(id string) WorkerInfo {
	h.t.Helper()
	wi, err := h.s.Get(id)
	if err != nil {
		h.t.Fatalf("get %s: %v", id, err)
	}
	return wi
}

// waitFor polls cond (test-side only) until it holds or the timeout passes.
func (h *harness) waitFor(what string, timeout time.Duration, cond func() bool) {
	h.t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			h.t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (h *harness) waitState(id string, want State, timeout time.Duration) WorkerInfo {
	h.t.Helper()
	var wi WorkerInfo
	h.waitFor(fmt.Sprintf("%s to be %s", id, want), timeout, func() bool {
		wi = h.get(id)
		return wi.State == want
	})
	return wi
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(data)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}

func counter(t testing.TB, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue next
				}
			}
			if m.Counter != nil {
				return m.Counter.GetValue()
			}
			if m.Gauge != nil {
				return m.Gauge.GetValue()
			}
		}
	}
	return -1
}

func strconvItoa(i int) string { return fmt.Sprint(i) }
