package proxy

import (
	"bufio"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
)

// TestDrainEndsOpenStreams: Drain ends a stream mid-way with the
// HIVE_SHUTTING_DOWN error event and [DONE] (the client can tell it from a
// cut connection), cancels the worker's request, and later requests get a
// 503 envelope without reaching the worker.
func TestDrainEndsOpenStreams(t *testing.T) {
	bin := buildSimworker(t)
	rg := newRigURL(t, startSimworker(t, bin, "--tokens-per-second", "5"), Options{})
	resp := rg.post(t.Context(), `{"job_id":"job-1","prompt":"hello","max_tokens":2000}`)
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("status %d", resp.StatusCode)
	}
	br := bufio.NewReader(resp.Body)
	for {
		ev, err := sse(br)
		if err != nil {
			t.Fatalf("stream ended before the first token: %v", err)
		}
		if strings.Contains(ev, `"type":"token"`) {
			break
		}
	}
	rg.p.Drain()
	evs := readAll(t, br)
	rg.waitEnd()
	if len(evs) < 2 || evs[len(evs)-1] != "[DONE]" {
		t.Fatalf("events after Drain %q", evs)
	}
	var last struct{ Type, Code string }
	if err := json.Unmarshal([]byte(evs[len(evs)-2]), &last); err != nil || last.Type != "error" || last.Code != CodeShuttingDown {
		t.Fatalf("event before [DONE] %q, want a %s error", evs[len(evs)-2], CodeShuttingDown)
	}
	for _, ev := range evs {
		if strings.Contains(ev, `"type":"end"`) {
			t.Fatalf("the worker finished its 2000 tokens: %q", evs)
		}
	}
	rg.outcomes(StatusError, ErrorTypeShutdown)

	resp = rg.post(t.Context(), `{"job_id":"job-2","prompt":"hello","max_tokens":2}`)
	rg.waitEnd()
	var env struct{ Error struct{ Code string } }
	if err := json.NewDecoder(resp.Body).Decode(&env); err != nil || resp.StatusCode != http.StatusServiceUnavailable || env.Error.Code != "SERVICE_UNAVAILABLE" {
		t.Fatalf("after Drain: %d %+v (%v)", resp.StatusCode, env, err)
	}
	if got := rg.counter(rg.p.m.errors, ErrorTypeShutdown); got != 2 {
		t.Errorf("errors_total{type=shutdown} = %v, want 2", got)
	}
}
