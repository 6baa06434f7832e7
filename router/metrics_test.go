package router

import (
	"bytes"
	"net/http/httptest"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// TestMetricsScrape: every series exists from the start (zeros for the
// models nothing has asked for yet), the cold start of a load is recorded,
// and promtool accepts the exposition.
func TestMetricsScrape(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100}})
	reg := prometheus.NewRegistry()
	r, err := New(h, &HTTPForwarder{}, []Model{{Name: "a", Autoload: true, Queue: 4, LoadTimeout: time.Minute}, {Name: "idle", Queue: 4}}, Options{Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 {
		t.Fatalf("%d %s", a.status, a.body)
	}
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(reg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	text := rec.Body.String()
	for _, want := range []string{
		`rbee_hive_openai_cold_start_seconds_count{model="a"} 1`,
		`rbee_hive_openai_queue_wait_seconds_count{model="a"} 1`,
		`rbee_hive_openai_loads_total{model="a",reason="request"} 1`,
		`rbee_hive_openai_loads_total{model="idle",reason="manual"} 0`,
		`rbee_hive_openai_unloads_total{model="idle",reason="ttl"} 0`,
		`rbee_hive_openai_evictions_total{model="idle",reason="vram"} 0`,
		`rbee_hive_openai_rejected_total{model="idle",reason="queue_full"} 0`,
		`rbee_hive_openai_queue_length{model="a"} 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("scrape lacks %s", want)
		}
	}
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("promtool missing in CI: apt-get install prometheus")
		}
		t.Skip("promtool not installed")
	}
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

func TestNewRejects(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(staticHive{}, &HTTPForwarder{}, []Model{{Name: "a"}}, Options{Registry: reg}); err != nil {
		t.Fatal(err)
	}
	for name, f := range map[string]func() error{
		"second router on one registry": func() error {
			_, err := New(staticHive{}, &HTTPForwarder{}, nil, Options{Registry: reg})
			return err
		},
		"repeated model": func() error {
			_, err := New(staticHive{}, &HTTPForwarder{}, []Model{{Name: "a"}, {Name: "a"}}, Options{})
			return err
		},
		"no hive":      func() error { _, err := New(nil, &HTTPForwarder{}, nil, Options{}); return err },
		"no forwarder": func() error { _, err := New(staticHive{}, nil, nil, Options{}); return err },
	} {
		if f() == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
