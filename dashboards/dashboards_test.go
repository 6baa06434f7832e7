package dashboards

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// The committed files must be exactly what the generator writes.
func TestGeneratedFilesUpToDate(t *testing.T) {
	for _, f := range []struct {
		path   string
		render func() ([]byte, error)
	}{
		{OverviewFile, OverviewJSON},
		{QueriesFile, QueriesJSON},
	} {
		want, err := f.render()
		if err != nil {
			t.Fatal(err)
		}
		got, err := os.ReadFile(filepath.Base(f.path))
		if err != nil {
			t.Fatalf("%v (run: go run ./dashboards/gen)", err)
		}
		if !bytes.Equal(got, want) {
			t.Errorf("%s differs from the generator's output: edit dashboards/*.go and run go run ./dashboards/gen", f.path)
		}
	}
}

func TestDashboardVariables(t *testing.T) {
	b, err := OverviewJSON()
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID        string `json:"uid"`
		Templating struct {
			List []struct {
				Type, Name string
				Query      any
				Datasource *struct{ Uid string }
			}
		}
		Panels []struct {
			Type       string
			Datasource *struct{ Type, Uid string }
		}
	}
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for _, v := range d.Templating.List {
		vars[v.Name] = v.Type
	}
	if vars["datasource"] != "datasource" || vars["instance"] != "query" {
		t.Errorf("variables = %v, want a datasource variable and an instance query variable", vars)
	}
	for i, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if p.Datasource == nil || p.Datasource.Uid != "${datasource}" {
			t.Errorf("panel %d does not use the datasource variable", i)
		}
	}
}

// Every metric family the dashboard promises to show is queried, and every
// query is scoped to the selected hives.
func TestQueriesCoverMetrics(t *testing.T) {
	b, err := OverviewJSON()
	if err != nil {
		t.Fatal(err)
	}
	qs, err := ExtractQueries(b)
	if err != nil {
		t.Fatal(err)
	}
	all := ""
	for _, q := range qs {
		if !strings.Contains(q.Expr, `instance=~"$instance"`) {
			t.Errorf("%s/%s is not scoped to $instance: %s", q.Panel, q.RefID, q.Expr)
		}
		if strings.Contains(q.Eval, "$") {
			t.Errorf("%s/%s keeps a variable after substitution: %s", q.Panel, q.RefID, q.Eval)
		}
		all += q.Expr + "\n"
	}
	for _, m := range []string{
		"up", "rbee_hive_workers",
		"rbee_hive_inference_duration_seconds_bucket", "rbee_hive_inference_time_to_first_token_seconds_bucket",
		"rbee_hive_inference_tokens_per_second_bucket", "rbee_hive_inference_tokens_total",
		"rbee_hive_inference_requests_total", "rbee_hive_inference_errors_total", "rbee_hive_inference_requests_in_flight",
		"rbee_hive_memory_available_bytes", "rbee_hive_memory_used_bytes", "rbee_hive_memory_total_bytes",
		"rbee_hive_vram_used_bytes", "rbee_hive_vram_total_bytes", "rbee_hive_vram_available_bytes",
		"rbee_hive_disk_available_bytes", "rbee_hive_disk_used_bytes", "rbee_hive_worker_memory_bytes",
		"rbee_hive_worker_restarts_total", "rbee_hive_worker_oom_kills_total", "rbee_hive_workers_stale_total",
		"rbee_hive_worker_exits_total", "rbee_hive_worker_spawn_failures_total",
		"rbee_hive_heartbeats_rejected_total", "rbee_hive_admission_rejections_total",
		"rbee_hive_model_download_failures_total", "rbee_hive_model_downloads_in_flight", "rbee_hive_model_download_bytes_total",
	} {
		if !regexp.MustCompile(`\b` + m + `\{`).MatchString(all) {
			t.Errorf("no query reads %s", m)
		}
	}
}

func promtool(t *testing.T) string {
	t.Helper()
	return testkit.RequireCommand(t, "promtool")
}

func run(t *testing.T, dir, name string, args ...string) {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Errorf("%s %s: %v\n%s", filepath.Base(name), strings.Join(args, " "), err, out)
	}
}

// Every dashboard query, variables substituted, parses as PromQL: promtool
// parses each as a recording rule.
func TestQueriesParseWithPromtool(t *testing.T) {
	pt := promtool(t)
	b, err := OverviewJSON()
	if err != nil {
		t.Fatal(err)
	}
	qs, err := ExtractQueries(b)
	if err != nil {
		t.Fatal(err)
	}
	var rules strings.Builder
	rules.WriteString("groups:\n  - name: dashboard-queries\n    rules:\n")
	for i, q := range qs {
		e, _ := json.Marshal(q.Eval) // a JSON string is a valid YAML scalar
		fmt.Fprintf(&rules, "      - record: dashboard:query_%d\n        expr: %s\n", i, e)
	}
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "queries.yml"), []byte(rules.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, dir, pt, "check", "rules", "queries.yml")
}

func TestAlertRulesWithPromtool(t *testing.T) {
	pt := promtool(t)
	run(t, ".", pt, "check", "rules", "alerts.yml")
	run(t, ".", pt, "test", "rules", "alerts_test.yml")
}

// Every alert has a unit test where it fires and one where it does not.
func TestEveryAlertIsTested(t *testing.T) {
	rules, err := os.ReadFile("alerts.yml")
	if err != nil {
		t.Fatal(err)
	}
	tests, err := os.ReadFile("alerts_test.yml")
	if err != nil {
		t.Fatal(err)
	}
	names := regexp.MustCompile(`(?m)^\s*- alert: (\w+)$`).FindAllSubmatch(rules, -1)
	if len(names) < 8 {
		t.Fatalf("found %d alerts in alerts.yml", len(names))
	}
	for _, n := range names {
		a := regexp.QuoteMeta(string(n[1]))
		if !regexp.MustCompile(`alertname: ` + a + `\n\s*exp_alerts: \[\]`).Match(tests) {
			t.Errorf("%s has no not-firing test", n[1])
		}
		if !regexp.MustCompile(`alertname: ` + a + `\n\s*exp_alerts:\n\s*- exp_labels:`).Match(tests) {
			t.Errorf("%s has no firing test", n[1])
		}
		// The rule's text runs to the next rule.
		block := string(rules[bytes.Index(rules, n[0])+len(n[0]):])
		if next := strings.Index(block, "- alert:"); next > 0 {
			block = block[:next]
		}
		for _, ann := range []string{"summary:", "description:", "runbook:"} {
			if !strings.Contains(block, ann) {
				t.Errorf("%s lacks the %s annotation", n[1], strings.TrimSuffix(ann, ":"))
			}
		}
	}
}
