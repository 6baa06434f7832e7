package config

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestServedDefaults(t *testing.T) {
	p := writeConfig(t, `
[backends.oai]
command = ["{self_dir}/rbee-simworker", "--port", "{port}"]
api = "openai"
load_timeout = "2m"
memory_limit = "512MiB"

[served.tiny]
model = "hf:org/tiny/tiny.gguf"
backend = "oai"

[served.big]
model = "/models/big.gguf"
backend = "oai"
autoload = false
ttl = "10m"
pinned = true
max_workers = 2
queue = 8
load_timeout = "30s"
memory_limit = "1GiB"
context_size = 8192
`)
	cfg, err := Load(p, true)
	if err != nil {
		t.Fatal(err)
	}
	tiny, big := cfg.Served["tiny"], cfg.Served["big"]
	for _, c := range []struct {
		name      string
		got, want any
	}{
		{"tiny autoload", tiny.AutoloadOn(), true},
		{"tiny ttl", tiny.TTL.D(), time.Duration(0)},
		{"tiny max_workers", tiny.MaxWorkers, 1},
		{"tiny queue", tiny.Queue, 64},
		{"tiny load_timeout (the backend's)", tiny.LoadTimeout.D(), 2 * time.Minute},
		{"tiny context_size (the backend's)", tiny.ContextSize, 4096},
		{"tiny memory limit (the backend's)", cfg.ServedMemoryLimit("tiny"), Size(512 << 20)},
		{"big autoload", big.AutoloadOn(), false},
		{"big ttl", big.TTL.D(), 10 * time.Minute},
		{"big pinned", big.Pinned, true},
		{"big max_workers", big.MaxWorkers, 2},
		{"big queue", big.Queue, 8},
		{"big load_timeout", big.LoadTimeout.D(), 30 * time.Second},
		{"big memory limit", cfg.ServedMemoryLimit("big"), Size(1 << 30)},
		{"big context_size", big.ContextSize, 8192},
		{"names", strings.Join(cfg.ServedNames(), ","), "big,tiny"},
	} {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.name, c.got, c.want)
		}
	}
	printed, err := cfg.TOML()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"[served.tiny]", "autoload = true", "max_workers = 1", "queue = 64", "ttl = '10m0s'"} {
		if !strings.Contains(string(printed), w) {
			t.Errorf("printout lacks %q:\n%s", w, printed)
		}
	}
	// The printout loads back to the same served models.
	again, err := Load(writeConfig(t, string(printed)), true)
	if err != nil {
		t.Fatalf("printout does not load: %v", err)
	}
	if b := again.Served["big"]; b.AutoloadOn() || b.TTL != big.TTL || b.Queue != big.Queue || b.LoadTimeout != big.LoadTimeout {
		t.Errorf("round trip changed big: %+v", again.Served["big"])
	}
}

// TestServedErrors: every error names the file, the line and the full key.
func TestServedErrors(t *testing.T) {
	const oai = "[backends.oai]\ncommand = [\"/bin/x\"]\napi = \"openai\"\n"
	const head = oai + "[served.m]\nmodel = \"/m.gguf\"\nbackend = \"oai\"\n"
	tests := []struct {
		name, body string
		line       int
		key, want  string
	}{
		{"bad name", "\n[served.Big]\nmodel = \"x\"\nbackend = \"sim\"\n", 2, "served.Big", "lowercase"},
		{"no model", "[served.m]\nbackend = \"sim\"\n", 1, "served.m.model", "must name a model"},
		{"unknown backend", "[served.m]\nmodel = \"x\"\nbackend = \"vllm\"\n", 3, "served.m.backend", `"vllm" is not a backend`},
		{"rbee backend", "[served.m]\nmodel = \"x\"\nbackend = \"sim\"\n", 3, "served.m.backend", `needs one with api = "openai"`},
		{"no backend", "[served.m]\nmodel = \"x\"\n", 1, "served.m.backend", "is not a backend"},
		{"integer ttl", head + "ttl = 600\n", 7, "served.m.ttl", `write "600s"`},
		{"tiny ttl", head + "ttl = \"10ms\"\n", 7, "served.m.ttl", "at least 1s"},
		{"negative ttl", head + "ttl = \"-1m\"\n", 7, "served.m.ttl", "negative"},
		{"negative workers", head + "max_workers = -1\n", 7, "served.m.max_workers", "within 0-64"},
		{"huge queue", head + "queue = 10000000\n", 7, "served.m.queue", "within 0-65536"},
		{"tiny load timeout", head + "load_timeout = \"5ms\"\n", 7, "served.m.load_timeout", "minimum"},
		{"negative memory", head + "memory_limit = -5\n", 7, "served.m.memory_limit", "negative"},
		{"negative context", head + "context_size = -5\n", 7, "served.m.context_size", "negative"},
		{"unknown key", head + "ttl_seconds = 5\n", 7, "served.m.ttl_seconds", "unknown key"},
		{"autoload not bool", head + "autoload = \"yes\"\n", 7, "served.m.autoload", ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := writeConfig(t, tc.body)
			_, err := Load(p, true)
			if err == nil {
				t.Fatal("loaded")
			}
			for _, w := range []string{fmt.Sprintf("%s:%d:", p, tc.line), "key " + tc.key, tc.want} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}
