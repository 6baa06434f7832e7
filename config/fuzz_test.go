package config

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// FuzzLoad loads arbitrary bytes as the config file: no panic, every
// error names the file, and an accepted config printed with TOML is a fixed
// point (it loads again and prints the same), so what `rbee-hive config`
// shows is what the hive runs with.
func FuzzLoad(f *testing.F) {
	if example, err := os.ReadFile("../systemd/config.example.toml"); err == nil {
		f.Add(example)
	}
	for _, s := range []string{
		"", "port = 7835\n", "[workers]\ngrace_period = \"10s\"\n", "[workers]\ngrace_period = 10\n",
		"[resources]\nmemory_reserve = \"1GiB\"\n", "[resources]\nmemory_reserve = -1\n", "[resources]\nmemory_reserve = \"NaN\"\n",
		"[workers]\nport_min = 1\nport_max = 70000\n", "[backends.x]\ncommand = [\"/bin/true\"]\n", "[backends.Bad]\n",
		"port = 1\nport = 2\n", "[heartbeat]\ninterval = 1.5\n", "unknown = 1\n", "[[backends]]\n", "a = \"\x00\"\n",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(dir, "hive.toml")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg, err := Load(p, true)
		if err != nil {
			if !strings.HasPrefix(err.Error(), "config "+p) {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		out, err := cfg.TOML()
		if err != nil {
			t.Fatalf("accepted config does not print: %v", err)
		}
		if err := os.WriteFile(p, out, 0o600); err != nil {
			t.Fatal(err)
		}
		cfg2, err := Load(p, true)
		if err != nil {
			t.Fatalf("printed config does not load: %v", err) // the error names the line
		}
		out2, err := cfg2.TOML()
		if err != nil {
			t.Fatalf("reloaded config does not print: %v", err)
		}
		a, b := strings.Split(string(out), "\n"), strings.Split(string(out2), "\n")
		for i := range min(len(a), len(b)) {
			if a[i] != b[i] {
				t.Fatalf("printed config changes on reload, line %d: %q -> %q", i+1, a[i], b[i])
			}
		}
		if len(a) != len(b) {
			t.Fatalf("printed config changes on reload: %d lines -> %d", len(a), len(b))
		}
	})
}
