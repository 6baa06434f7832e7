package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// Files of the dashboards package, relative to this package.
const (
	dashboardPath = "../../dashboards/rbee-hive-overview.json"
	alertsPath    = "../../dashboards/alerts.yml"
	// jobName is the scrape job alerts.yml's RbeeHiveDown and the "Hives up"
	// panel match on.
	jobName = "rbee-hive"
)

// TestPrometheusDashboardAndAlerts is issue 9's acceptance test: a real
// Prometheus scrapes a real hive driven through inference, a crash, an OOM
// kill, a stale worker, a refused spawn and spoofed heartbeats; then every
// PromQL expression of the shipped dashboard must parse and return data,
// every alert rule must load and parse, the alerts this scenario causes must
// fire, and promtool must accept /metrics and the rules file.
func TestPrometheusDashboardAndAlerts(t *testing.T) {
	require(t, "prometheus", "promtool")
	start := time.Now()
	// A served model for the OpenAI endpoint's panels: rbee-simworker
	// speaks OpenAI too.
	h := startHive(t, hiveOptions{extra: servedSim(t, "e2e-sim", "") + `
[heartbeat]
interval = "1s"
stale_threshold = "2s"

[resources]
sample_interval = "1s"

[gpu]
driver = "fake"

[[gpu.fake]]
name = "Fake GPU"
uuid = "GPU-e2e00000-0000-0000-0000-000000000000"
memory_total = "24GiB"
` + simBackends})
	target := strings.TrimPrefix(h.URL, "http://")
	p := startPrometheus(t, target)

	// Counters must have a sample at their old value before they move, or
	// increase() cannot see the step.
	p.waitFor(t, 20*time.Second, fmt.Sprintf(`count_over_time(up{job=%q, instance=%q}[1m]) >= 2`, jobName, target))

	// Load: ready workers serving inference, and every kind of trouble.
	var ready []string
	for range 3 {
		ready = append(ready, h.spawn("sim", map[string]string{"RBEE_SIM_TOKENS_PER_SECOND": "200"}))
	}
	crasher := h.spawn("sim", map[string]string{"RBEE_SIM_CRASH_AFTER": "1s"})
	oom := h.spawn("small", map[string]string{"RBEE_SIM_ALLOC_MIB": "256"})
	stale := h.spawn("sim", map[string]string{"RBEE_SIM_NO_HEARTBEAT": "true"})
	tooBig := int64(1) << 50
	code, body := h.Do("POST", "/v1/workers/spawn", spawnRequest{ModelRef: h.model, Backend: "sim", MemoryLimitBytes: &tooBig})
	if code != http.StatusInsufficientStorage || !bytes.Contains(body, []byte(`"INSUFFICIENT_MEMORY"`)) {
		t.Errorf("spawn with a 1PiB memory limit: %d %s, want 507 INSUFFICIENT_MEMORY", code, body)
	}
	spoofHeartbeats(t, h, 10)
	for _, id := range ready {
		h.waitState(id, 15*time.Second, "idle")
	}
	runInference(t, h, ready, 4)
	routedRequest(t, h) // loads the served model: a cold start

	// The scenario as the hive saw it (a precondition of the queries below).
	h.waitState(oom, 20*time.Second, "failed")
	if wi, _ := h.worker(oom); wi.ExitReason != "oom" {
		t.Errorf("worker with a 64MiB limit allocating 256MiB: exit reason %q, want oom", wi.ExitReason)
	}
	testkit.WaitFor(t, 20*time.Second, "the crashing worker to be restarted", func() bool {
		wi, _ := h.worker(crasher)
		return wi.RestartCount >= 1
	})
	testkit.WaitFor(t, 20*time.Second, "the silent worker to be declared stale", func() bool {
		wi, _ := h.worker(stale)
		return wi.RestartCount >= 1 || wi.State == "stale" || wi.ExitReason == "stale"
	})
	runInference(t, h, ready, 2) // again, inside every rate window
	routedRequest(t, h)

	// Every dashboard query returns data, every expected alert fires.
	queries := dashboardQueries(t, target)
	expectFiring := []string{"RbeeHiveWorkerOOMKilled", "RbeeHiveWorkerStale", "RbeeHiveHeartbeatsRejected"}
	rules := p.rules(t)
	checkRuleFile(t, rules)
	var pending map[string]string // expression → why it is not done yet
	deadline := time.Now().Add(30 * time.Second)
	for {
		pending = map[string]string{}
		for _, q := range queries {
			n, err := p.query(q.eval)
			switch {
			case err != nil:
				pending[q.name+": "+q.eval] = err.Error()
			case n == 0:
				pending[q.name+": "+q.eval] = "empty result"
			}
		}
		for _, r := range rules {
			n, err := p.query(r.Query)
			if err != nil {
				pending["alert "+r.Name+": "+r.Query] = err.Error()
			} else if n == 0 && contains(expectFiring, r.Name) {
				pending["alert "+r.Name+": "+r.Query] = "empty result: the scenario should make it fire"
			}
		}
		if len(pending) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(time.Second)
	}
	keys := make([]string, 0, len(pending))
	for k := range pending {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		t.Errorf("%s → %s", k, pending[k])
	}
	// Prometheus's own rule evaluation agrees: the alerts become active
	// (within a few of its 1 s evaluation rounds).
	var firing map[string]bool
	deadline = time.Now().Add(10 * time.Second)
	for {
		firing = p.activeAlerts(t)
		missing := 0
		for _, name := range expectFiring {
			if !firing[name] {
				missing++
			}
		}
		if missing == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	for _, name := range expectFiring {
		if !firing[name] {
			t.Errorf("alert %s not active in Prometheus (active: %v)", name, firing)
		}
	}
	// The $instance variable's values come from this query.
	if vals := p.labelValues(t, "instance", "rbee_hive_memory_total_bytes"); !contains(vals, target) {
		t.Errorf("label_values(rbee_hive_memory_total_bytes, instance) = %v, want %s among them", vals, target)
	}

	// promtool: the exposition is lint-clean, the rules file valid.
	metrics := h.Metrics()
	cmd := exec.Command("promtool", "check", "metrics")
	cmd.Stdin = bytes.NewReader(metrics)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
	if out, err := exec.Command("promtool", "check", "rules", alertsPath).CombinedOutput(); err != nil {
		t.Errorf("promtool check rules %s: %v\n%s", alertsPath, err, out)
	}
	t.Logf("%d dashboard queries and %d alert rules evaluated against a real Prometheus; %v in all", len(queries), len(rules), time.Since(start).Round(100*time.Millisecond))
}

// spoofHeartbeats sends n datagrams to the hive's notify socket from this
// process, which lives in no worker cgroup: each must be rejected
// (rbee_hive_heartbeats_rejected_total{reason="unknown_sender"}), whatever
// id the payload claims.
func spoofHeartbeats(t *testing.T, h *hive, n int) {
	t.Helper()
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: h.notifySocket(), Net: "unixgram"})
	if err != nil {
		t.Fatalf("dial notify socket: %v", err)
	}
	defer conn.Close()
	for i := range n {
		msg := fmt.Sprintf("WATCHDOG=1\nREADY=1\nRBEE_WORKER_ID=w-spoofed%d\nRBEE_HEALTH=healthy", i)
		if _, err := conn.Write([]byte(msg)); err != nil {
			t.Fatalf("spoofed datagram: %v", err)
		}
	}
}

// runInference streams per requests through the hive's proxy to each
// worker at once and checks every stream is complete.
func runInference(t *testing.T, h *hive, workers []string, per int) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, len(workers)*per)
	for _, id := range workers {
		for i := range per {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tokens, err := h.infer(id, fmt.Sprintf("e2e-%s-%d", id, i), 16)
				if err == nil && tokens != 16 {
					err = fmt.Errorf("inference on %s: %d tokens, want 16", id, tokens)
				}
				if err != nil {
					errs <- err
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// routedRequest sends one chat completion through the OpenAI endpoint.
func routedRequest(t *testing.T, h *hive) {
	t.Helper()
	code, body := h.Do("POST", "/openai/v1/chat/completions", map[string]any{
		"model": "e2e-sim", "messages": []map[string]string{{"role": "user", "content": "hi"}}, "max_tokens": 4,
	})
	if code != http.StatusOK || !bytes.Contains(body, []byte(`"completion_tokens":4`)) {
		t.Errorf("routed request: %d %s", code, body)
	}
}

// dashQuery is one dashboard expression, ready to send.
type dashQuery struct {
	name string // panel title and refId
	eval string
}

// dashboardQueries reads every targets[].expr of the dashboard JSON, nested
// rows included, and substitutes Grafana's variables with concrete values:
// this hive's instance and windows that fit a test's short history.
func dashboardQueries(t *testing.T, instance string) []dashQuery {
	t.Helper()
	raw, err := os.ReadFile(dashboardPath)
	if err != nil {
		t.Fatal(err)
	}
	type panel struct {
		Title   string `json:"title"`
		Targets []struct {
			RefID string `json:"refId"`
			Expr  string `json:"expr"`
		} `json:"targets"`
		Panels []json.RawMessage `json:"panels"`
	}
	var d struct {
		Panels []json.RawMessage `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatalf("%s: %v", dashboardPath, err)
	}
	vars := strings.NewReplacer(
		"${__rate_interval}", "30s", "$__rate_interval", "30s",
		"${__interval}", "5s", "$__interval", "5s",
		"${__range}", "1m", "$__range", "1m",
		// Unescaped: the dots match themselves too, and a regex escape
		// would need PromQL string escaping on top.
		"${instance:regex}", instance, "${instance}", instance, "$instance", instance,
		"${job}", jobName, "$job", jobName,
	)
	var qs []dashQuery
	var walk func([]json.RawMessage)
	walk = func(ps []json.RawMessage) {
		for _, r := range ps {
			var p panel
			if err := json.Unmarshal(r, &p); err != nil {
				t.Fatalf("%s: panel: %v", dashboardPath, err)
			}
			for _, tg := range p.Targets {
				if tg.Expr == "" {
					continue
				}
				e := vars.Replace(tg.Expr)
				if strings.Contains(e, "$") {
					t.Errorf("panel %q %s: unknown Grafana variable left in %q", p.Title, tg.RefID, e)
				}
				qs = append(qs, dashQuery{name: fmt.Sprintf("panel %q %s", p.Title, tg.RefID), eval: e})
			}
			walk(p.Panels)
		}
	}
	walk(d.Panels)
	// Every "expr" in the file must have been found by the walk above.
	if n := bytes.Count(raw, []byte(`"expr":`)); n != len(qs) {
		t.Errorf("%s has %d \"expr\" keys, the panel walk found %d", dashboardPath, n, len(qs))
	}
	if len(qs) == 0 {
		t.Fatalf("%s: no queries", dashboardPath)
	}
	return qs
}

// checkRuleFile makes sure Prometheus loaded every alert of alerts.yml and
// evaluates each without error.
func checkRuleFile(t *testing.T, rules []promRule) {
	t.Helper()
	raw, err := os.ReadFile(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`(?m)^\s*-\s*alert:\s*(\S+)`).FindAllSubmatch(raw, -1)
	if len(want) != len(rules) {
		t.Errorf("%s defines %d alerts, Prometheus loaded %d", alertsPath, len(want), len(rules))
	}
	for _, r := range rules {
		if r.Health == "err" || r.LastError != "" {
			t.Errorf("rule %s: health %q: %s", r.Name, r.Health, r.LastError)
		}
	}
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// prometheus is a running Prometheus server scraping one hive.
type prometheus struct {
	url  string
	logs *testkit.SyncBuffer
}

// startPrometheus runs Debian's prometheus on a free port with a temp
// TSDB, a 1 s scrape and rule evaluation, and a copy of alerts.yml.
func startPrometheus(t *testing.T, target string) *prometheus {
	t.Helper()
	dir := t.TempDir()
	rules, err := os.ReadFile(alertsPath)
	if err != nil {
		t.Fatal(err)
	}
	rulesPath := filepath.Join(dir, "rbee-hive-alerts.yml")
	if err := os.WriteFile(rulesPath, rules, 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - %s
scrape_configs:
  - job_name: %s
    static_configs:
      - targets: [%q]
`, rulesPath, jobName, target)
	cfgPath := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", testkit.FreePort(t))
	p := &prometheus{url: "http://" + addr, logs: &testkit.SyncBuffer{}}
	cmd := exec.Command("prometheus",
		"--config.file="+cfgPath,
		"--storage.tsdb.path="+filepath.Join(dir, "tsdb"),
		"--web.listen-address="+addr,
		"--log.level=warn",
	)
	cmd.Dir = dir
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("prometheus output:\n%s", p.logs.String())
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get(p.url + "/-/ready")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		select {
		case <-done:
			t.Fatalf("prometheus exited at start: %v\n%s", cmd.ProcessState, p.logs.String())
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus not ready within 30s:\n%s", p.logs.String())
		}
	}
}

// apiResponse is the envelope of Prometheus's HTTP API.
type apiResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
}

// get calls an API endpoint with GET (not every endpoint takes POST).
func (p *prometheus) get(path string, params url.Values) (json.RawMessage, error) {
	resp, err := http.Get(p.url + path + "?" + params.Encode())
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	var r apiResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("%s: %d %s", path, resp.StatusCode, b)
	}
	if r.Status != "success" {
		return nil, fmt.Errorf("%s: %s", r.ErrorType, r.Error)
	}
	return r.Data, nil
}

// query evaluates expr now and returns how many series (or 1 for a scalar)
// it gave.
func (p *prometheus) query(expr string) (int, error) {
	data, err := p.get("/api/v1/query", url.Values{"query": {expr}})
	if err != nil {
		return 0, err
	}
	var d struct {
		ResultType string          `json:"resultType"`
		Result     json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		return 0, err
	}
	switch d.ResultType {
	case "vector", "matrix":
		var series []json.RawMessage
		if err := json.Unmarshal(d.Result, &series); err != nil {
			return 0, err
		}
		return len(series), nil
	default: // scalar, string
		return 1, nil
	}
}

// waitFor polls until expr returns data.
func (p *prometheus) waitFor(t *testing.T, timeout time.Duration, expr string) {
	t.Helper()
	var last error
	testkit.WaitFor(t, timeout, fmt.Sprintf("Prometheus: %s (last error: %v)", expr, &last), func() bool {
		n, err := p.query(expr)
		last = err
		return err == nil && n > 0
	})
}

// promRule is an alerting rule as /api/v1/rules shows it.
type promRule struct {
	Name      string `json:"name"`
	Query     string `json:"query"`
	Type      string `json:"type"`
	Health    string `json:"health"`
	LastError string `json:"lastError"`
}

func (p *prometheus) rules(t *testing.T) []promRule {
	t.Helper()
	data, err := p.get("/api/v1/rules", url.Values{"type": {"alert"}})
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Groups []struct {
			File  string     `json:"file"`
			Rules []promRule `json:"rules"`
		} `json:"groups"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	var rules []promRule
	for _, g := range d.Groups {
		rules = append(rules, g.Rules...)
	}
	return rules
}

// activeAlerts are the names of pending or firing alerts.
func (p *prometheus) activeAlerts(t *testing.T) map[string]bool {
	t.Helper()
	data, err := p.get("/api/v1/alerts", nil)
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		Alerts []struct {
			Labels map[string]string `json:"labels"`
			State  string            `json:"state"`
		} `json:"alerts"`
	}
	if err := json.Unmarshal(data, &d); err != nil {
		t.Fatal(err)
	}
	out := map[string]bool{}
	for _, a := range d.Alerts {
		out[a.Labels["alertname"]] = true
	}
	return out
}

func (p *prometheus) labelValues(t *testing.T, label, match string) []string {
	t.Helper()
	resp, err := http.Get(p.url + "/api/v1/label/" + label + "/values?" + url.Values{"match[]": {match}}.Encode())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct {
		Status string   `json:"status"`
		Data   []string `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || r.Status != "success" {
		t.Fatalf("label values: %v %v", err, r.Status)
	}
	return r.Data
}
