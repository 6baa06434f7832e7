package engine

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// servedWorkers are the ids of the hive's live workers of a served model.
func (h *hive) servedWorkers(served string) []string {
	h.T.Helper()
	code, b := h.Do("GET", "/v1/workers/list", nil)
	var list struct {
		Workers []struct {
			ID     string `json:"id"`
			Served string `json:"served"`
			State  string `json:"state"`
		} `json:"workers"`
	}
	if err := json.Unmarshal(b, &list); code != http.StatusOK || err != nil {
		h.T.Fatalf("workers list: %d %v %s", code, err, b)
	}
	var ids []string
	for _, w := range list.Workers {
		if w.Served == served && w.State != "stopped" && w.State != "failed" {
			ids = append(ids, w.ID)
		}
	}
	return ids
}

// TestServedLlamaServer drives the host's OpenAI endpoint with the genuine
// llama-server as the served model's engine: the first request loads it on
// demand and streams tokens, the second reuses the worker, and the worker
// is stopped after its ttl.
func TestServedLlamaServer(t *testing.T) {
	bin := llamaServer(t)
	model := writeModel(t, t.TempDir())
	h := startHive(t, backends(t, bin)+fmt.Sprintf(`
[served.tiny]
model = %q
backend = "llama-server"
ttl = "2s"
`, model))

	if ids := h.servedWorkers("tiny"); len(ids) != 0 {
		t.Fatalf("workers before any request: %v", ids)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	t0 := time.Now()
	evs, err := h.stream(ctx, "/openai/v1/chat/completions", map[string]any{
		"model": "tiny", "messages": []map[string]string{{"role": "user", "content": "hello"}}, "max_tokens": 16, "stream": true,
	}, 0)
	if err != nil {
		t.Fatalf("first (cold) request: %v", err)
	}
	cold := time.Since(t0)
	tokens := 0
	for _, e := range evs {
		if strings.Contains(e.data, `"delta":{"content"`) || strings.Contains(e.data, `"content":"`) {
			tokens++
		}
	}
	if len(evs) < 3 || evs[len(evs)-1].data != "[DONE]" || tokens == 0 {
		t.Fatalf("cold stream: %d events, %d with content, last %q", len(evs), tokens, evs[len(evs)-1].data)
	}
	ids := h.servedWorkers("tiny")
	if len(ids) != 1 {
		t.Fatalf("workers after the first request: %v", ids)
	}

	start := time.Now()
	code, b := h.Do("POST", "/openai/v1/chat/completions", map[string]any{
		"model": "tiny", "messages": []map[string]string{{"role": "user", "content": "again"}}, "max_tokens": 8,
	})
	warm := time.Since(start)
	if code != http.StatusOK || !strings.Contains(string(b), `"choices"`) {
		t.Fatalf("second request: %d %s", code, b)
	}
	if again := h.servedWorkers("tiny"); len(again) != 1 || again[0] != ids[0] {
		t.Errorf("the second request did not reuse worker %s: %v", ids[0], again)
	}
	m := string(h.Metrics())
	for sel, want := range map[string]float64{
		`rbee_hive_openai_loads_total{model="tiny",reason="request"}`:                         1,
		`rbee_hive_openai_cold_start_seconds_count{model="tiny"}`:                             1,
		`rbee_hive_inference_requests_total{backend="llama-server",model="tiny",status="ok"}`: 2,
	} {
		name, labels, _ := strings.Cut(sel, "{")
		if got := metric(m, name, "{"+labels); got != want {
			t.Errorf("%s = %v, want %v", sel, got, want)
		}
	}
	t.Logf("cold request (load + %d events) %v, warm request %v: cold/warm ×%.1f", len(evs), cold.Round(time.Millisecond), warm.Round(time.Millisecond), cold.Seconds()/warm.Seconds())
	// The cold start split by the hive's own log lines for the worker.
	at := map[string]time.Time{}
	for _, line := range strings.Split(h.Logs.String(), "\n") {
		var e struct {
			Time     time.Time `json:"time"`
			Msg      string    `json:"msg"`
			WorkerID string    `json:"worker_id"`
		}
		if json.Unmarshal([]byte(line), &e) == nil && e.WorkerID == ids[0] && at[e.Msg].IsZero() {
			at[e.Msg] = e.Time
		}
	}
	if reg, st, rdy := at["worker registered"], at["worker started"], at["worker ready"]; !reg.IsZero() && !st.IsZero() && !rdy.IsZero() {
		t.Logf("cold start: request → registered (routing, admission with the GGUF estimate) %v, → process started %v, → ready (llama-server loads the model) %v, ready → first event %v",
			reg.Sub(t0).Round(time.Microsecond), st.Sub(reg).Round(time.Microsecond), rdy.Sub(st).Round(time.Millisecond), evs[0].at.Sub(rdy).Round(time.Millisecond))
	}

	testkit.WaitFor(t, time.Minute, "the ttl unload", func() bool {
		return metric(string(h.Metrics()), "rbee_hive_openai_unloads_total", `{model="tiny",reason="ttl"}`) == 1
	})
	testkit.WaitFor(t, 30*time.Second, "the worker to be gone", func() bool { return len(h.servedWorkers("tiny")) == 0 })
}
