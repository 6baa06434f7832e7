package config

import (
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
	}
	for _, tc := range tests {
		got, err := ParseSize(tc.in)
		if (err != nil) != tc.err || got != tc.want {
			t.Errorf("ParseSize(%q) = %v, %v; want %v, err=%v", tc.in, got, err, tc.want, tc.err)
		}
	}
}
