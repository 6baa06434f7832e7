package main

import (
	"bytes"
	"context"
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

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/internal/testkit"
)

// binDir holds rbee-hive (and rbee-simworker) built once for these tests.
type testBinaries struct{ dir string }

var bins testBinaries // set once in TestMain, read-only afterwards

func TestMain(m *testing.M) {
	runGate()
	dir, err := os.MkdirTemp("", "rbee-hive-test-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	for _, args := range [][]string{{"./cmd/rbee-hive"}, {"./cmd/rbee-simworker"},
		// the "new release" of the in-place upgrade tests
		{"-ldflags", "-X main.version=" + nextVersion, "-o", filepath.Join(dir, "next"), "./cmd/rbee-hive"}} {
		pkg := args[len(args)-1]
		out := []string{"-o", dir}
		if len(args) > 1 {
			out = nil
		}
		cmd := exec.Command("go", append(append([]string{"build"}, out...), args...)...)
		cmd.Dir = "../.."
		cmd.Stderr = os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n", pkg, err)
			os.Exit(1)
		}
	}
	// Workers run under uids of their own: they must reach the binaries.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins = testBinaries{dir: dir}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// passableTempDir is t.TempDir with it and its parent 0711: workers, which
// run under uids of their own, must pass through to the notify socket and
// the state dir, as they pass through /run and /var/lib.
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

// daemon is a running `rbee-hive daemon` child process.
type daemon struct {
	t        testing.TB
	cmd      *exec.Cmd
	url      string
	stateDir string
	cfgPath  string
	env      []string
	bin      string // "": the shared build
	logs     *testkit.SyncBuffer
	done     chan error    // the exit, once
	exited   chan struct{} // closed at the exit
	client   *http.Client  // nil: http.DefaultClient
}

func (d *daemon) httpClient() *http.Client {
	if d.client != nil {
		return d.client
	}
	return http.DefaultClient
}

// startDaemon runs the hive with a config whose paths live in a temp dir;
// extra is appended to the config file.
func startDaemon(t *testing.T, extra string, env ...string) *daemon {
	t.Helper()
	return startDaemonWith(t, "http", nil, extra, env...)
}

// startDaemonFrom is startDaemon running the binary bin ("": the shared build).
func startDaemonFrom(t *testing.T, bin, extra string, env ...string) *daemon {
	t.Helper()
	return startDaemonBin(t, bin, "http", nil, extra, env...)
}

// startDaemonWith is startDaemon for an API served over scheme ("http" or
// "https") and polled with client (nil: http.DefaultClient).
func startDaemonWith(t *testing.T, scheme string, client *http.Client, extra string, env ...string) *daemon {
	t.Helper()
	return startDaemonBin(t, "", scheme, client, extra, env...)
}

func startDaemonBin(t testing.TB, bin, scheme string, client *http.Client, extra string, env ...string) *daemon {
	t.Helper()
	dir := passableTempDir(t)
	port := testkit.FreePort(t)
	cfg := fmt.Sprintf("listen = \"127.0.0.1:%d\"\nstate_dir = %q\nruntime_dir = %q\nlog_format = \"json\"\nlog_level = \"debug\"\n%s",
		port, filepath.Join(dir, "state"), filepath.Join(dir, "run"), extra)
	cfgPath := filepath.Join(dir, "hive.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	d := &daemon{t: t, url: fmt.Sprintf("%s://127.0.0.1:%d", scheme, port), stateDir: filepath.Join(dir, "state"),
		cfgPath: cfgPath, env: env, bin: bin, client: client}
	d.launch()
	return d
}

// restart starts another hive on d's configuration (d must have exited).
func (d *daemon) restart() *daemon {
	d.t.Helper()
	n := &daemon{t: d.t, url: d.url, stateDir: d.stateDir, cfgPath: d.cfgPath, env: d.env, bin: d.bin, client: d.client}
	n.launch()
	return n
}

// launch starts the hive process and waits until it answers /v1/health.
func (d *daemon) launch() {
	t := d.t
	t.Helper()
	d.logs, d.done, d.exited = &testkit.SyncBuffer{}, make(chan error, 1), make(chan struct{})
	bin := d.bin
	if bin == "" {
		bin = filepath.Join(bins.dir, "rbee-hive")
	}
	d.cmd = exec.Command(bin, "daemon", "--config", d.cfgPath)
	d.cmd.Env = append(os.Environ(), d.env...)
	d.cmd.Stderr = d.logs
	d.cmd.Stdout = d.logs
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		err := d.cmd.Wait()
		close(d.exited)
		d.done <- err
	}()
	t.Cleanup(func() {
		if d.cmd.ProcessState == nil {
			_ = d.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-d.done:
			case <-time.After(30 * time.Second):
				_ = d.cmd.Process.Kill()
			}
		}
		if t.Failed() {
			t.Logf("daemon logs:\n%s", d.logs.String())
		}
	})
	testkit.WaitHealthy(t, d.httpClient(), d.url, 20*time.Second, d.exited, func() string {
		return fmt.Sprintf("%v\n%s", d.cmd.ProcessState, d.logs.String())
	})
}

func (d *daemon) token() string {
	d.t.Helper()
	b, err := os.ReadFile(filepath.Join(d.stateDir, "api-token"))
	if err != nil {
		d.t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// request sends an API request with the hive's token and returns status and body.
func (d *daemon) request(method, path, body string) (int, []byte) {
	d.t.Helper()
	var r io.Reader
	if body != "" {
		r = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, d.url+path, r)
	if err != nil {
		d.t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+d.token())
	if body != "" {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := d.httpClient().Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}

func (d *daemon) stop(sig syscall.Signal) (int, time.Duration) {
	d.t.Helper()
	start := time.Now()
	if err := d.cmd.Process.Signal(sig); err != nil {
		d.t.Fatal(err)
	}
	select {
	case <-d.done:
	case <-time.After(60 * time.Second):
		d.t.Fatalf("daemon ignored %v", sig)
	}
	return d.cmd.ProcessState.ExitCode(), time.Since(start)
}

func TestDaemonHealthMetricsAuth(t *testing.T) {
	d := startDaemon(t, "")

	resp, err := http.Get(d.url + "/v1/health")
	if err != nil {
		t.Fatal(err)
	}
	var health map[string]string
	_ = json.NewDecoder(resp.Body).Decode(&health)
	resp.Body.Close()
	if health["status"] != "alive" || health["api_version"] != "v1" || health["version"] != version {
		t.Errorf("health %v", health)
	}

	resp, err = http.Get(d.url + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain; version=0.0.4") {
		t.Errorf("metrics content type %q", ct)
	}
	for _, want := range []string{"rbee_hive_build_info{", "go_goroutines ", "process_resident_memory_bytes "} {
		if !bytes.Contains(body, []byte(want)) {
			t.Errorf("metrics lack %q", want)
		}
	}

	// The generated token file is private to the hive's user.
	st, err := os.Stat(filepath.Join(d.stateDir, "api-token"))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("api-token: %v mode %v", err, st.Mode())
	}
	resp, err = http.Get(d.url + "/v1/workers/list")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 401 || resp.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("unauthenticated list: %d %v", resp.StatusCode, resp.Header)
	}
	if code, body := d.request("GET", "/v1/workers/list", ""); code != 200 {
		t.Errorf("authenticated list: %d %s", code, body)
	}

	tok := d.token()
	logs := d.logs.String()
	if strings.Contains(logs, tok) {
		t.Errorf("token in logs")
	}
	if fp := api.Fingerprint(tok); !strings.Contains(logs, fp) {
		t.Errorf("logs lack the token fingerprint %s", fp)
	}
}

func TestTokenSources(t *testing.T) {
	tokFile := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(tokFile, []byte("from-file\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	creds := t.TempDir()
	if err := os.WriteFile(filepath.Join(creds, "api-token"), []byte("from-cred"), 0o600); err != nil {
		t.Fatal(err)
	}
	env := func(m map[string]string) func(string) string { return func(k string) string { return m[k] } }
	tests := []struct {
		name, file string
		env        map[string]string
		want       string
	}{
		{"explicit file wins", tokFile, map[string]string{"CREDENTIALS_DIRECTORY": creds, "LLORCH_API_TOKEN": "from-env"}, "from-file"},
		{"systemd credential", "", map[string]string{"CREDENTIALS_DIRECTORY": creds, "LLORCH_API_TOKEN": "from-env"}, "from-cred"},
		{"environment", "", map[string]string{"LLORCH_API_TOKEN": "from-env"}, "from-env"},
	}
	for _, tc := range tests {
		got, _, err := loadToken(tc.file, t.TempDir(), env(tc.env))
		if err != nil || got != tc.want {
			t.Errorf("%s: got %q, %v", tc.name, got, err)
		}
	}
	// Generated once, then reused.
	state := t.TempDir()
	a, _, err := loadToken("", state, env(nil))
	if err != nil || len(a) != 64 {
		t.Fatalf("generated %q %v", a, err)
	}
	b, _, err := loadToken("", state, env(nil))
	if err != nil || a != b {
		t.Errorf("second load generated a new token")
	}
	empty := filepath.Join(t.TempDir(), "empty")
	_ = os.WriteFile(empty, []byte("\n"), 0o600)
	if _, _, err := loadToken(empty, state, env(nil)); err == nil {
		t.Errorf("an empty token file must be an error")
	}
}

func TestDaemonSignalsExitZero(t *testing.T) {
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			d := startDaemon(t, "")
			code, took := d.stop(sig)
			if code != 0 {
				t.Fatalf("exit code %d after %v\n%s", code, sig, d.logs.String())
			}
			if !strings.Contains(d.logs.String(), "hive stopped") {
				t.Errorf("no shutdown log line")
			}
			t.Logf("%v → exit 0 in %v", sig, took)
		})
	}
}

func TestDaemonBadConfig(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "bad.toml")
	_ = os.WriteFile(p, []byte("listen = \"127.0.0.1:1\"\n[heartbeat]\nstale_action = \"explode\"\n"), 0o600)
	var stderr bytes.Buffer
	cmd := exec.Command(filepath.Join(bins.dir, "rbee-hive"), "daemon", "--config", p)
	cmd.Stderr = &stderr
	err := cmd.Run()
	if cmd.ProcessState.ExitCode() != 1 {
		t.Fatalf("exit %v, want 1: %s", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), p+":3: key heartbeat.stale_action") {
		t.Errorf("stderr does not point at file:line:key: %s", stderr.String())
	}
}

func TestCLIStatus(t *testing.T) {
	d := startDaemon(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var out bytes.Buffer
	tokFile := filepath.Join(d.stateDir, "api-token")
	if code := run(ctx, []string{"status", "--url", d.url, "--token-file", tokFile}, &out, &out); code != 0 {
		t.Fatalf("status exit %d: %s", code, out.String())
	}
	if !strings.Contains(out.String(), "alive") || !strings.Contains(out.String(), "workers: 0") {
		t.Errorf("status output:\n%s", out.String())
	}
	out.Reset()
	if code := run(ctx, []string{"workers", "ls", "--json", "--url", d.url, "--token-file", tokFile}, &out, &out); code != 0 {
		t.Fatalf("workers ls exit %d: %s", code, out.String())
	}
	var list struct {
		Workers []any `json:"workers"`
	}
	if err := json.Unmarshal(out.Bytes(), &list); err != nil || list.Workers == nil {
		t.Errorf("workers ls --json: %v %q", err, out.String())
	}
	// A wrong token is a clear error, not a crash.
	bad := filepath.Join(t.TempDir(), "bad")
	_ = os.WriteFile(bad, []byte("wrong"), 0o600)
	out.Reset()
	if code := run(ctx, []string{"workers", "ls", "--url", d.url, "--token-file", bad}, &out, &out); code != 1 || !strings.Contains(out.String(), "INVALID_API_KEY") {
		t.Errorf("wrong token: exit %d %q", code, out.String())
	}
}
