package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/systemd/journaltest"
)

func TestMain(m *testing.M) {
	// The hive starts workers through its own binary's gate, not ours, but
	// a test binary linking cgroup must still honour the contract.
	cgroup.MaybeRunGate()
	// Main re-executes this binary in a private mount namespace so the
	// journald tests get their own /run/systemd/journal; every test runs in
	// that child.
	code := journaltest.Main(m)
	bins.cleanup()
	os.Exit(code)
}

// binaries are rbee-hive and rbee-simworker, built once per test process
// (lazily: the parent of journaltest's re-exec never needs them), or taken
// from $RBEE_E2E_BIN_DIR when set (e.g. bin/ after `make build`).
type binaries struct {
	once     sync.Once
	dir      string // built here; removed at the end
	prebuilt string
	err      error
}

var bins binaries

func (b *binaries) get(t testing.TB) string {
	t.Helper()
	b.once.Do(func() {
		if dir := os.Getenv("RBEE_E2E_BIN_DIR"); dir != "" {
			for _, name := range []string{"rbee-hive", "rbee-simworker"} {
				if _, err := os.Stat(filepath.Join(dir, name)); err != nil {
					b.err = fmt.Errorf("RBEE_E2E_BIN_DIR: %w", err)
				}
			}
			b.prebuilt = dir
			return
		}
		dir, err := os.MkdirTemp("", "rbee-e2e-bin")
		if err != nil {
			b.err = err
			return
		}
		b.dir = dir
		// Workers run under uids of their own: they must reach the binaries.
		if err := os.Chmod(dir, 0o755); err != nil {
			b.err = err
			return
		}
		cmd := exec.Command("go", "build", "-o", dir, "./cmd/rbee-hive", "./cmd/rbee-simworker")
		cmd.Dir = "../.."
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	if b.prebuilt != "" {
		return b.prebuilt
	}
	return b.dir
}

func (b *binaries) cleanup() {
	if b.dir != "" {
		os.RemoveAll(b.dir)
	}
}

// require skips (or, under CI, fails) a test that cannot run here: not root,
// or a program missing.
func require(t testing.TB, programs ...string) {
	t.Helper()
	var why string
	if os.Geteuid() != 0 {
		why = "needs root (cgroups, mount namespaces)"
	}
	for _, p := range programs {
		if why != "" {
			break
		}
		if strings.HasPrefix(p, "/") {
			if _, err := os.Stat(p); err != nil {
				why = p + " missing"
			}
		} else if _, err := exec.LookPath(p); err != nil {
			why = p + " not in PATH"
		}
	}
	if why == "" {
		return
	}
	testkit.Skip(t, "%s", why)
}

// hiveOptions shape a test hive's config.
type hiveOptions struct {
	logFormat string // "journal", "json", ...
	logLevel  string
	extra     string // appended to the config file: backends, [heartbeat], [gpu] ...
}

// simEnv are the rbee-simworker knobs (RBEE_SIM_*, see its README) a spawn
// request may set through the sim backends' env_allow.
const simEnvAllow = `["RBEE_SIM_CRASH_AFTER", "RBEE_SIM_ALLOC_MIB", "RBEE_SIM_NO_HEARTBEAT", "RBEE_SIM_LOAD_TIME", "RBEE_SIM_HANG_AFTER", "RBEE_SIM_TOKENS_PER_SECOND"]`

// simBackends is a [backends.*] block: "sim" (512MiB) and "small" (64MiB,
// for OOM kills), both rbee-simworker over the notify protocol.
const simBackends = `
[backends.sim]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"]
health = "notify"
load_timeout = "20s"
memory_limit = "512MiB"
env_allow = ` + simEnvAllow + `

[backends.small]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"]
health = "notify"
load_timeout = "20s"
memory_limit = "64MiB"
env_allow = ` + simEnvAllow + `
`

// hive is a running `rbee-hive daemon`.
type hive struct {
	*testkit.Hive
	model string // a placeholder model file, as "file:<path>"
}

// startHive runs the real daemon with a config in a temp dir, waits for
// /v1/health, and stops it (and checks its cgroups are gone) at cleanup.
func startHive(t testing.TB, o hiveOptions) *hive {
	t.Helper()
	bin := bins.get(t)
	if o.logFormat == "" {
		o.logFormat = "json"
	}
	if o.logLevel == "" {
		o.logLevel = "info"
	}
	// A root of our own: `go test ./...` runs cmd/rbee-hive's daemon tests
	// at the same time, and they use the default root.
	env := testkit.NewHiveEnv(t, "rbee-e2e-")
	model := env.PlaceholderModel(t)
	cfg := fmt.Sprintf(`listen = "127.0.0.1:%d"
state_dir = %q
runtime_dir = %q
log_format = %q
log_level = %q

[cgroup]
root = %q

[workers]
grace_period = "3s"
shutdown_budget = "20s"
port_min = 30000
port_max = 39999

[workers.restart]
backoff_base = "200ms"
backoff_max = "1s"
jitter = 0.0
max_failures = 3
failure_window = "60s"
%s`, env.Port, env.State, env.Runtime, o.logFormat, o.logLevel, env.CgroupRoot, o.extra)
	h := testkit.StartHive(t, env, testkit.HiveOptions{Bin: filepath.Join(bin, "rbee-hive"), Config: cfg,
		StartTimeout: 20 * time.Second, StopTimeout: 40 * time.Second})
	return &hive{Hive: h, model: "file:" + model}
}

// servedSim writes a placeholder model and returns the config of a served
// model name on "simopenai", an rbee-simworker backend speaking OpenAI
// (its command ends with args: `, "--flag", "value"`).
func servedSim(t testing.TB, name, args string) string {
	t.Helper()
	servedModel := filepath.Join(t.TempDir(), "served.gguf")
	if err := os.WriteFile(servedModel, []byte("rbee-simworker placeholder\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	return fmt.Sprintf(`
[backends.simopenai]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"%s]
health = "notify"
api = "openai"
load_timeout = "20s"
memory_limit = "256MiB"

[served.%s]
model = %q
backend = "simopenai"

# The served model and the hive's model dir both lie in the temp dir: file:
# refs must be below a root.
[models]
file_roots = [%q]
`, args, name, servedModel, filepath.Clean(os.TempDir()))
}

func (h *hive) notifySocket() string { return filepath.Join(h.Runtime, "notify.sock") }

// spawnRequest is POST /v1/workers/spawn's body.
type spawnRequest struct {
	ModelRef         string            `json:"model_ref"`
	Backend          string            `json:"backend"`
	Device           int               `json:"device"`
	MemoryLimitBytes *int64            `json:"memory_limit_bytes,omitempty"`
	Restart          string            `json:"restart,omitempty"`
	Env              map[string]string `json:"env,omitempty"`
}

// spawn starts a worker of backend with the given RBEE_SIM_* knobs and
// returns its id.
func (h *hive) spawn(backend string, env map[string]string) string {
	h.T.Helper()
	code, body := h.Do("POST", "/v1/workers/spawn", spawnRequest{ModelRef: h.model, Backend: backend, Env: env})
	if code != http.StatusOK {
		h.T.Fatalf("spawn %s %v: %d %s", backend, env, code, body)
	}
	var res struct {
		WorkerID string `json:"worker_id"`
	}
	if err := json.Unmarshal(body, &res); err != nil || res.WorkerID == "" {
		h.T.Fatalf("spawn response %s: %v", body, err)
	}
	return res.WorkerID
}

// workerInfo is the part of GET /v1/workers/{id} the tests read.
type workerInfo struct {
	ID           string `json:"id"`
	URL          string `json:"url"`
	State        string `json:"state"`
	RestartCount int    `json:"restart_count"`
	ExitReason   string `json:"exit_reason"`
	PID          *int   `json:"pid"`
}

func (h *hive) worker(id string) (workerInfo, int) {
	h.T.Helper()
	var wi workerInfo
	return wi, h.GetJSON("/v1/workers/"+id, &wi)
}

// waitState waits until worker id is in one of states.
func (h *hive) waitState(id string, timeout time.Duration, states ...string) workerInfo {
	h.T.Helper()
	var wi workerInfo
	testkit.WaitFor(h.T, timeout, fmt.Sprintf("worker %s in %v (last: %+v)", id, states, &wi), func() bool {
		wi, _ = h.worker(id)
		for _, s := range states {
			if wi.State == s {
				return true
			}
		}
		return false
	})
	return wi
}

// stop is DELETE /v1/workers/{id}.
func (h *hive) stop(id string) {
	h.T.Helper()
	if code, body := h.Do("DELETE", "/v1/workers/"+id, nil); code != http.StatusOK {
		h.T.Fatalf("stop %s: %d %s", id, code, body)
	}
}

// infer runs one inference through the hive's proxy and returns the number
// of token events read from the SSE stream.
func (h *hive) infer(id, jobID string, maxTokens int) (int, error) {
	body, _ := json.Marshal(map[string]any{"job_id": jobID, "prompt": "hello from the e2e test", "max_tokens": maxTokens})
	req, err := http.NewRequest("POST", h.URL+"/v1/workers/"+id+"/inference", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+h.Token)
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Accept", "text/event-stream")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return 0, fmt.Errorf("inference %s: %d %s", id, resp.StatusCode, b)
	}
	tokens, done := 0, false
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "data: [DONE]":
			done = true
		case strings.HasPrefix(line, "data: ") && strings.Contains(line, `"type":"token"`):
			tokens++
		}
	}
	if err := sc.Err(); err != nil {
		return tokens, err
	}
	if !done {
		return tokens, fmt.Errorf("inference %s: stream ended without [DONE] after %d tokens", id, tokens)
	}
	return tokens, nil
}

// metrics fetches the hive's /metrics body.
