package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"
)

// BenchmarkOpenAIEndpoint measures the host's OpenAI endpoint against real
// rbee-simworkers (unpaced: the worker's own time is ~0, so the figures are
// the hive's): a warm routed request (POST /openai/v1/chat/completions)
// against the same request sent straight to the worker's port and through
// the hive's per-worker route (/v1/workers/{id}/v1/chat/completions),
// interleaved in the same run; then cold starts after an unload, split by
// the hive's own log lines into routing + admission (request → worker
// registered), spawn (→ process started), load (→ ready) and first token
// (ready → the client's first event).
//
//	go test -run '^$' -bench OpenAIEndpoint -benchtime 1x ./test/e2e/
func BenchmarkOpenAIEndpoint(b *testing.B) {
	require(b, "/bin/sh")
	const warmN, coldN = 300, 5
	for b.Loop() {
		h := startHive(b, hiveOptions{extra: servedSim(b, "bench", `, "--tokens-per-second", "0"`)})
		client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
		body := []byte(`{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":8}`)
		post := func(url string, auth bool) time.Duration {
			req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
			req.Header.Set("Content-Type", "application/json")
			if auth {
				req.Header.Set("Authorization", "Bearer "+h.Token)
			}
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			out, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			d := time.Since(t0)
			if resp.StatusCode != 200 || !bytes.Contains(out, []byte(`"completion_tokens":8`)) {
				b.Fatalf("%s: %d %s", url, resp.StatusCode, out)
			}
			return d
		}
		post(h.URL+"/openai/v1/chat/completions", true) // load
		var list struct {
			Workers []struct{ ID, URL, Served string }
		}
		_, lb := h.Do("GET", "/v1/workers/list", nil)
		if err := json.Unmarshal(lb, &list); err != nil || len(list.Workers) != 1 || list.Workers[0].Served != "bench" {
			b.Fatalf("workers: %v %s", err, lb)
		}
		w := list.Workers[0]
		paths := []struct{ name, url string }{
			{"direct to the worker", w.URL + "/v1/chat/completions"},
			{"hive /v1/workers/{id}", h.URL + "/v1/workers/" + w.ID + "/v1/chat/completions"},
			{"hive /openai/v1 (routed)", h.URL + "/openai/v1/chat/completions"},
		}
		times := make([][]time.Duration, len(paths))
		for i := 0; i < warmN+20; i++ {
			for j, p := range paths {
				d := post(p.url, j > 0)
				if i >= 20 { // warm-up
					times[j] = append(times[j], d)
				}
			}
		}
		base := pct(times[0], 50)
		for j, p := range paths {
			b.Logf("warm %-26s p50 %8v p95 %8v  p50 ×%.2f of direct", p.name, pct(times[j], 50), pct(times[j], 95), float64(pct(times[j], 50))/float64(base))
		}
		b.ReportMetric(float64(pct(times[2], 50))/float64(base), "routed/direct-p50")
		b.ReportMetric(float64(pct(times[2], 50))/float64(pct(times[1], 50)), "routed/per-worker-p50")

		var admit, spawn, load, first, total []time.Duration
		for range coldN {
			if code, out := h.Do("POST", "/openai/v1/models/bench/unload", nil); code != 200 {
				b.Fatalf("unload: %d %s", code, out)
			}
			req, _ := http.NewRequest("POST", h.URL+"/openai/v1/chat/completions",
				strings.NewReader(`{"model":"bench","messages":[{"role":"user","content":"hi"}],"max_tokens":8,"stream":true}`))
			req.Header.Set("Authorization", "Bearer "+h.Token)
			t0 := time.Now()
			resp, err := client.Do(req)
			if err != nil {
				b.Fatal(err)
			}
			rd := bufio.NewReader(resp.Body)
			if _, err := rd.ReadString('\n'); err != nil {
				b.Fatal(err)
			}
			tFirst := time.Now()
			_, _ = io.Copy(io.Discard, rd)
			resp.Body.Close()
			_, lb := h.Do("GET", "/v1/workers/list", nil)
			if err := json.Unmarshal(lb, &list); err != nil || len(list.Workers) != 1 {
				b.Fatalf("workers after a cold start: %v %s", err, lb)
			}
			ev := logTimes(b, h.Logs.String(), list.Workers[0].ID)
			admit = append(admit, ev["worker registered"].Sub(t0))
			spawn = append(spawn, ev["worker started"].Sub(ev["worker registered"]))
			load = append(load, ev["worker ready"].Sub(ev["worker started"]))
			first = append(first, tFirst.Sub(ev["worker ready"]))
			total = append(total, tFirst.Sub(t0))
		}
		b.Logf("cold start (median of %d, unload before each): routing+admission %v, spawn %v, load %v, first token %v; request → first event %v = ×%.0f a warm routed request",
			coldN, pct(admit, 50), pct(spawn, 50), pct(load, 50), pct(first, 50), pct(total, 50), float64(pct(total, 50))/float64(pct(times[2], 50)))
		b.ReportMetric(float64(pct(total, 50))/float64(pct(times[2], 50)), "cold/warm-routed")
	}
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[(len(s)-1)*p/100]
}

// logTimes is when the hive logged each lifecycle line of worker id.
func logTimes(b *testing.B, logs, id string) map[string]time.Time {
	b.Helper()
	out := map[string]time.Time{}
	for _, line := range strings.Split(logs, "\n") {
		if !strings.Contains(line, `"worker_id":"`+id+`"`) {
			continue
		}
		var e struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &e) == nil {
			switch e.Msg {
			case "worker registered", "worker started", "worker ready":
				out[e.Msg] = e.Time
			}
		}
	}
	for _, k := range []string{"worker registered", "worker started", "worker ready"} {
		if out[k].IsZero() {
			b.Fatalf("no %q log line for %s", k, id)
		}
	}
	return out
}
