package config

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "hive.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestDefaults(t *testing.T) {
	t.Setenv("XDG_STATE_HOME", "/tmp/xdg-state")
	t.Setenv("XDG_RUNTIME_DIR", "/tmp/xdg-run")
	tests := []struct {
		root                         bool
		state, runtime, models, sock string
	}{
		{true, "/var/lib/rbee-hive", "/run/rbee-hive", "/var/lib/rbee-hive/models", "/run/rbee-hive/notify.sock"},
		{false, "/tmp/xdg-state/rbee-hive", "/tmp/xdg-run/rbee-hive", "/tmp/xdg-state/rbee-hive/models", "/tmp/xdg-run/rbee-hive/notify.sock"},
	}
	for _, tc := range tests {
		cfg, err := Load("", tc.root)
		if err != nil {
			t.Fatalf("root=%v: %v", tc.root, err)
		}
		if cfg.StateDir != tc.state || cfg.RuntimeDir != tc.runtime || cfg.ModelDir != tc.models || cfg.Heartbeat.NotifySocket != tc.sock {
			t.Errorf("root=%v: got state %q runtime %q models %q socket %q", tc.root, cfg.StateDir, cfg.RuntimeDir, cfg.ModelDir, cfg.Heartbeat.NotifySocket)
		}
		if cfg.Listen != "127.0.0.1:9200" || cfg.Heartbeat.Interval.D() != 30*time.Second ||
			cfg.Heartbeat.StaleThreshold.D() != 60*time.Second || cfg.Workers.MemoryLimit != 8<<30 {
			t.Errorf("root=%v: unexpected defaults %+v", tc.root, cfg)
		}
		if len(cfg.Models.FileRoots) != 1 || cfg.Models.FileRoots[0] != tc.models {
			t.Errorf("root=%v: models.file_roots %q, want [model_dir]", tc.root, cfg.Models.FileRoots)
		}
		if cfg.MetricsListen != "" || cfg.TLSCert != "" || cfg.TLSKey != "" {
			t.Errorf("root=%v: metrics_listen/tls set by default", tc.root)
		}
		sim, ok := cfg.Backends["sim"]
		if !ok || sim.Command[0] != "{self_dir}/rbee-simworker" || sim.Health != "notify" {
			t.Errorf("default sim backend missing or wrong: %+v", sim)
		}
	}
}

func TestSystemdDirectories(t *testing.T) {
	t.Setenv("STATE_DIRECTORY", "/var/lib/rbee-hive-gpu0:/var/lib/other")
	t.Setenv("RUNTIME_DIRECTORY", "/run/rbee-hive-gpu0")
	cfg, err := Load("", true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.StateDir != "/var/lib/rbee-hive-gpu0" || cfg.RuntimeDir != "/run/rbee-hive-gpu0" || cfg.Heartbeat.NotifySocket != "/run/rbee-hive-gpu0/notify.sock" {
		t.Errorf("systemd directories ignored: %q %q %q", cfg.StateDir, cfg.RuntimeDir, cfg.Heartbeat.NotifySocket)
	}
}

func TestOverrides(t *testing.T) {
	p := writeConfig(t, `
listen = "0.0.0.0:9300"
state_dir = "/srv/hive"

[heartbeat]
interval = "5s"
stale_threshold = "15s"
stale_action = "kill"

[workers]
memory_limit = "512MiB"
pids_max = 100

[resources]
disk_reserve = 1073741824

[backends.llama]
command = ["/usr/bin/llama-server", "--port", "{port}", "-m", "{model_path}"]
health = "http"
cuda = true
env_allow = ["LLAMA_ARG_THREADS"]
`)
	cfg, err := Load(p, true)
	if err != nil {
		t.Fatal(err)
	}
	checks := []struct {
		name      string
		got, want any
	}{
		{"listen", cfg.Listen, "0.0.0.0:9300"},
		{"model_dir follows state_dir", cfg.ModelDir, "/srv/hive/models"},
		{"interval", cfg.Heartbeat.Interval.D(), 5 * time.Second},
		{"stale_action", cfg.Heartbeat.StaleAction, StaleAction("kill")},
		{"memory_limit", cfg.Workers.MemoryLimit, Size(512 << 20)},
		{"pids_max", cfg.Workers.PidsMax, int64(100)},
		{"disk_reserve as integer", cfg.Resources.DiskReserve, Size(1 << 30)},
		{"untouched default", cfg.Workers.GracePeriod.D(), 10 * time.Second},
		{"llama health_path default", cfg.Backends["llama"].HealthPath, "/health"},
		{"llama load_timeout default", cfg.Backends["llama"].LoadTimeout.D(), 10 * time.Minute},
		{"sim kept beside llama", cfg.Backends["sim"].Health, HealthMode("notify")},
		{"backend memory limit falls back", cfg.MemoryLimit("llama"), Size(512 << 20)},
		{"sim memory limit", cfg.MemoryLimit("sim"), Size(512 << 20)},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
}

func TestLoadErrors(t *testing.T) {
	tests := []struct {
		name string
		body string
		want []string // substrings of the error
	}{
		{"unknown key", "listen = \"127.0.0.1:1\"\n[workers]\nmemory_limt = \"1GiB\"\n", []string{":3:", "workers.memory_limt", "unknown key"}},
		{"wrong type", "[workers]\npids_max = \"many\"\n", []string{":2:", "workers.pids_max"}},
		{"bad size", "[workers]\nmemory_limit = \"lots\"\n", []string{":2:", "workers.memory_limit", "invalid size"}},
		{"bad duration", "[heartbeat]\ninterval = \"soon\"\n", []string{":2:", "heartbeat.interval", "invalid duration"}},
		{"bad enum", "[heartbeat]\nstale_action = \"explode\"\n", []string{":2:", "stale_action", "restart, kill, mark"}},
		{"syntax", "[workers\n", []string{":1:"}},
		{"threshold below interval", "[heartbeat]\ninterval = \"30s\"\nstale_threshold = \"10s\"\n", []string{":3:", "heartbeat.stale_threshold", "longer than"}},
		{"relative state dir", "state_dir = \"var/lib\"\n", []string{":1:", "state_dir", "absolute"}},
		{"bad listen", "listen = \"nowhere\"\n", []string{":1:", "listen"}},
		{"unknown placeholder", "[backends.x]\ncommand = [\"/bin/x\", \"{pwn}\"]\n", []string{"backends.x.command", "unknown placeholder {pwn}"}},
		{"empty command", "[backends.x]\nhealth = \"notify\"\n", []string{"backends.x.command", "must name a program"}},
		{"bad backend name", "[backends.X]\ncommand = [\"/bin/x\"]\n", []string{"backends.X"}},
		{"reserved env allowed", "[backends.x]\ncommand = [\"/bin/x\"]\nenv_allow = [\"LD_PRELOAD\"]\n", []string{"env_allow", "LD_PRELOAD"}},
		{"port range", "[workers]\nport_min = 9000\nport_max = 8000\n", []string{"workers.port_min"}},
		{"cgroup root traversal", "[cgroup]\nroot = \"a/../../b\"\n", []string{":2:", "cgroup.root"}},
		{"jitter", "[workers.restart]\njitter = 1.5\n", []string{":2:", "workers.restart.jitter"}},
		{"relative file root", "[models]\nfile_roots = [\"/srv/models\", \"models\"]\n", []string{":2:", "models.file_roots", "entry 2"}},
		{"unclean file root", "[models]\nfile_roots = [\"/srv/../etc\"]\n", []string{":2:", "models.file_roots"}},
		{"bad metrics_listen", "metrics_listen = \"9464\"\n", []string{":1:", "metrics_listen"}},
		{"tls cert without key", "tls_cert = \"/etc/rbee-hive/cert.pem\"\n", []string{":1:", "tls_cert", "tls_key"}},
		{"tls key without cert", "\ntls_key = \"/etc/rbee-hive/key.pem\"\n", []string{":2:", "tls_key", "tls_cert"}},
		{"relative tls cert", "tls_cert = \"cert.pem\"\ntls_key = \"/k.pem\"\n", []string{":1:", "tls_cert", "absolute"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.body)
			_, err := Load(p, true)
			if err == nil {
				t.Fatal("expected an error")
			}
			msg := err.Error()
			if !strings.Contains(msg, p) {
				t.Errorf("error %q does not name the file", msg)
			}
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q lacks %q", msg, w)
				}
			}
		})
	}
	if _, err := Load("/nonexistent/hive.toml", true); err == nil || !strings.Contains(err.Error(), "/nonexistent/hive.toml") {
		t.Errorf("missing file: got %v", err)
	}
}

func TestTOMLRoundTrip(t *testing.T) {
	cfg, err := Load("", true)
	if err != nil {
		t.Fatal(err)
	}
	cfg.Workers.MemoryLimit = 3 << 30
	b, err := cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), "memory_limit = '3GiB'") {
		t.Errorf("printed config lacks the size in units:\n%s", b)
	}
	again, err := Load(writeConfig(t, string(b)), true)
	if err != nil {
		t.Fatalf("printed config does not load back: %v\n%s", err, b)
	}
	if again.Workers.MemoryLimit != cfg.Workers.MemoryLimit || again.Heartbeat.StaleThreshold != cfg.Heartbeat.StaleThreshold ||
		len(again.Backends) != len(cfg.Backends) {
		t.Errorf("round trip changed the config")
	}
}

func TestParseSize(t *testing.T) {
	tests := []struct {
		in   string
		want Size
		err  bool
	}{
		{"4096", 4096, false},
		{"8GiB", 8 << 30, false},
		{"1.5GiB", 3 << 29, false},
		{"10GB", 10e9, false},
		{"512 MiB", 512 << 20, false},
		{"", 0, true},
		{"-1GiB", 0, true},
		{"GiB", 0, true},
		{"1XB", 0, true},
		{"99999999TiB", 0, true},
		{"NaN", 0, true},
		{"NaNGiB", 0, true},
		{"Inf", 0, true},
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseSize(%q) = %v, %v; want %v, err=%v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// TestHostileValues: values a careless operator writes that the decoder
// used to accept silently (an integer duration is nanoseconds to go-toml, a
// negative size wraps to 2^64−1) or reported without a line or full key.
// Each error names the file, the line and the full dotted key.
func TestHostileValues(t *testing.T) {
	tests := []struct {
		name string
		body string
		line int
		key  string
		want string
	}{
		{"integer duration", "[workers]\ngrace_period = 10\n", 2, "workers.grace_period", `write "10s"`},
		{"integer sample interval", "[resources]\nsample_interval = 5\n", 2, "resources.sample_interval", `write "5s"`},
		{"integer heartbeat", "[heartbeat]\ninterval = 30\n", 2, "heartbeat.interval", `write "30s"`},
		{"float duration", "\n[models]\nstall_timeout = 1.5\n", 3, "models.stall_timeout", "needs a unit"},
		{"integer duration in a dotted key", "workers.restart.backoff_base = 1\n", 1, "workers.restart.backoff_base", `write "1s"`},
		{"integer duration in an inline table", "workers = { restart = { stable_after = 300 } }\n", 1, "workers.restart.stable_after", `write "300s"`},
		{"integer backend load timeout", "[backends.x]\ncommand = [\"/bin/true\"]\nload_timeout = 60\n", 3, "backends.x.load_timeout", `write "60s"`},
		{"negative reserve", "[resources]\nmemory_reserve = -1\n", 2, "resources.memory_reserve", "negative"},
		{"negative disk reserve", "[resources]\n\ndisk_reserve = -5\n", 3, "resources.disk_reserve", "negative"},
		{"NaN size", "[resources]\nvram_margin = \"NaN\"\n", 2, "resources.vram_margin", "invalid size"},
		{"Inf size", "[models]\nmax_bytes = \"Inf\"\n", 2, "models.max_bytes", "invalid size"},
		{"float size", "[workers]\nmemory_limit = 1.5\n", 2, "workers.memory_limit", "whole number"},
		{"negative fake GPU", "[gpu]\ndriver = \"fake\"\n[[gpu.fake]]\nname = \"a\"\n[[gpu.fake]]\nmemory_total = -1\n", 6, "gpu.fake[1].memory_total", "negative"},
		{"sample interval too small", "[resources]\nsample_interval = \"1ms\"\n", 2, "resources.sample_interval", "minimum 1s"},
		{"heartbeat too small", "[heartbeat]\ninterval = \"1ns\"\n", 2, "heartbeat.interval", "minimum"},
		{"zero shutdown budget", "[workers]\nshutdown_budget = \"0s\"\n", 2, "workers.shutdown_budget", "minimum"},
		{"zero grace", "[workers]\ngrace_period = \"0s\"\n", 2, "workers.grace_period", "minimum"},
		{"zero stall timeout", "[models]\nstall_timeout = \"0s\"\n", 2, "models.stall_timeout", "minimum"},
		{"zero failure window", "[workers.restart]\nfailure_window = \"0s\"\n", 2, "workers.restart.failure_window", "minimum"},
		{"zero backoff", "[workers.restart]\nbackoff_base = \"0s\"\n", 2, "workers.restart.backoff_base", "minimum"},
		{"tiny load timeout", "[backends.x]\ncommand = [\"/bin/true\"]\nload_timeout = \"1ms\"\n", 3, "backends.x.load_timeout", "minimum"},
		{"zero memory limit", "[workers]\nmemory_limit = 0\n", 2, "workers.memory_limit", "positive"},
		{"port_max out of range", "[workers]\nport_min = 8000\nport_max = 70000\n", 3, "workers.port_max", "1024-65535"},
		{"port_max below port_min", "[workers]\nport_max = 2000\n", 2, "workers.port_max", "below workers.port_min"},
		{"threshold below a set interval", "[heartbeat]\ninterval = \"90s\"\n", 2, "heartbeat.stale_threshold", "longer than"},
		{"bad backend name", "\n[backends.Bad]\ncommand = [\"/bin/x\"]\n", 2, "backends.Bad", "lowercase"},
		{"missing command", "[backends.x]\n\nhealth = \"notify\"\n", 1, "backends.x.command", "must name a program"},
		{"duplicate key", "[workers]\npids_max = 1\n[heartbeat]\ninterval = \"1s\"\n[workers.restart]\njitter = 0.1\njitter = 0.2\n", 7, "workers.restart.jitter", "twice (first on line 6)"},
		{"duplicate table", "[workers]\npids_max = 1\n[workers]\nlog_files = 2\n", 3, "workers", "twice"},
		{"relative command", "[backends.x]\ncommand = [\"rbee-simworker\"]\n", 2, "backends.x.command", "absolute path"},
		{"dot-relative command", "[backends.x]\ncommand = [\"./bin/x\", \"{port}\"]\n", 2, "backends.x.command", "absolute path"},
		{"bad memory admission", "[resources]\nmemory_admission = \"yolo\"\n", 2, "resources.memory_admission", "limits, usage"},
		{"uid range without dash", "[workers]\nuid_range = \"70000\"\n", 2, "workers.uid_range", "FIRST-LAST"},
		{"uid range reversed", "[workers]\n\nuid_range = \"79999-70000\"\n", 3, "workers.uid_range", "first is above last"},
		{"uid range over system ids", "[workers]\nuid_range = \"0-100\"\n", 2, "workers.uid_range", "system ids"},
		{"uid range over nobody", "[workers]\nuid_range = \"60000-70000\"\n", 2, "workers.uid_range", "nobody"},
		{"model group root", "[workers]\nmodel_group = \"0\"\n", 2, "workers.model_group", "root"},
		{"model group in the range", "[workers]\nmodel_group = \"70001\"\n", 2, "workers.model_group", "inside workers.uid_range"},
		{"model group nonsense", "[workers]\nmodel_group = \"a b\"\n", 2, "workers.model_group", "neither a gid"},
		{"bad user", "[backends.x]\ncommand = [\"/bin/true\"]\nuser = \"Root;x\"\n", 3, "backends.x.user", "not a user name"},
		{"relative writable", "[backends.x]\ncommand = [\"/bin/true\"]\nwritable = [\"tmp\"]\n", 3, "backends.x.writable", "clean absolute path"},
		{"writable state dir", "state_dir = \"/var/lib/h\"\n[backends.x]\ncommand = [\"/bin/true\"]\nwritable = [\"/var/lib/h/models\"]\n", 4, "backends.x.writable", "overlaps"},
		{"denied env", "[backends.x]\ncommand = [\"/bin/true\"]\nenv = { GCONV_PATH = \"/tmp\" }\n", 3, "backends.x.env", "GCONV_PATH"},
		{"denied env_allow", "[backends.x]\ncommand = [\"/bin/true\"]\nenv_allow = [\"PYTHONPATH\"]\n", 3, "backends.x.env_allow", "PYTHONPATH"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.body)
			_, err := Load(p, true)
			if err == nil {
				t.Fatal("expected an error")
			}
			msg := err.Error()
			for _, w := range []string{fmt.Sprintf("%s:%d:", p, tc.line), "key " + tc.key + ":", tc.want} {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q lacks %q", msg, w)
				}
			}
		})
	}
}

func TestGoodValuesStillLoad(t *testing.T) {
	p := writeConfig(t, `
workers.restart.backoff_base = "200ms"
[resources]
memory_reserve = 0
memory_admission = "usage"
disk_reserve = "0"
[heartbeat]
interval = "100ms"
stale_threshold = "1s"
[backends.x]
command = ["{self_dir}/x", "{port}"]
[[gpu.fake]]
name = "a"
memory_total = "8GiB"
`)
	cfg, err := Load(p, true)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Resources.MemoryAdmission != MemoryUsage || cfg.Workers.Restart.BackoffBase.D() != 200*time.Millisecond || cfg.GPU.Fake[0].MemoryTotal != 8<<30 {
		t.Errorf("values not applied: %+v", cfg)
	}
	if def, _ := Load("", true); def.Resources.MemoryAdmission != MemoryLimits {
		t.Errorf("default memory_admission = %q, want limits", def.Resources.MemoryAdmission)
	}
}

func TestCheckCommands(t *testing.T) {
	dir := t.TempDir()
	exe := filepath.Join(dir, "worker")
	plain := filepath.Join(dir, "plain")
	for p, mode := range map[string]os.FileMode{exe: 0o755, plain: 0o644} {
		if err := os.WriteFile(p, []byte("#!/bin/sh\n"), mode); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name, prog, want string
	}{
		{"self_dir resolved", "{self_dir}/worker", ""},
		{"absolute", exe, ""},
		{"missing", "{self_dir}/nope", "backend b: command " + dir + "/nope: stat"},
		{"not executable", plain, "backend b: command " + plain + " is not executable"},
		{"directory", dir, "is not a regular file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			cfg := Config{Backends: map[string]Backend{"b": {Command: []string{tc.prog}}}}
			err := cfg.CheckCommands(dir)
			if tc.want == "" {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %v, want %q", err, tc.want)
			}
		})
	}
}

// TestExampleConfig: the sample systemd installs documents what the keys
// mean and, uncommented, loads.
func TestExampleConfig(t *testing.T) {
	b, err := os.ReadFile("../systemd/config.example.toml")
	if err != nil {
		t.Fatal(err)
	}
	sample := string(b)
	for _, w := range []string{"#memory_admission = \"limits\"", "usage:", "health_path is\n# polled", "WATCHDOG_USEC"} {
		if !strings.Contains(sample, w) {
			t.Errorf("config.example.toml lacks %q", w)
		}
	}
	if strings.Contains(sample, "twice") {
		t.Error("config.example.toml still says WATCHDOG_USEC is twice the interval")
	}
	var out []string
	for _, line := range strings.Split(sample, "\n") {
		if rest, ok := strings.CutPrefix(line, "#"); ok && (strings.HasPrefix(rest, "[") || strings.Contains(rest, " = ")) && !strings.HasPrefix(rest, " ") {
			line = rest
		}
		out = append(out, line)
	}
	if _, err := Load(writeConfig(t, strings.Join(out, "\n")), true); err != nil {
		t.Fatalf("uncommented sample does not load: %v", err)
	}
	cfg, _ := Load("", true)
	printed, err := cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"memory_admission = 'limits'", "health_path is polled", "WATCHDOG_USEC"} {
		if !strings.Contains(string(printed), w) {
			t.Errorf("config printout lacks %q", w)
		}
	}
}
