package sim

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/worker"
)

func TestParse(t *testing.T) {
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		check   func(Config) bool
		wantErr bool
	}{
		{"defaults", nil, nil, func(c Config) bool {
			return c.Port == -1 && c.TokensPerSecond == 50 && c.Backend == "cpu" && !c.IgnoreSIGTERM
		}, false},
		{"flags", []string{"--port", "0", "--worker-id", "w-a", "--model", "/m.gguf", "--load-time", "2s", "--alloc-mib", "64",
			"--crash-after", "1m", "--hang-after", "3s", "--no-heartbeat", "--leak-mib-per-sec", "1.5", "--ignore-sigterm", "--callback-url", "http://x"},
			nil, func(c Config) bool {
				return c.Port == 0 && c.WorkerID == "w-a" && c.Model == "/m.gguf" && c.ModelRef == "/m.gguf" && c.LoadTime == 2*time.Second &&
					c.AllocMiB == 64 && c.CrashAfter == time.Minute && c.HangAfter == 3*time.Second && c.NoHeartbeat &&
					c.LeakMiBPerSec == 1.5 && c.IgnoreSIGTERM
			}, false},
		{"env", nil, map[string]string{"RBEE_SIM_PORT": "8081", "RBEE_SIM_NO_HEARTBEAT": "true", "RBEE_SIM_TOKENS_PER_SECOND": "7",
			"RBEE_WORKER_ID": "w-env", "LLORCH_API_TOKEN": "tok"}, func(c Config) bool {
			return c.Port == 8081 && c.NoHeartbeat && c.TokensPerSecond == 7 && c.WorkerID == "w-env" && c.APIToken == "tok"
		}, false},
		{"flag beats env", []string{"--port", "9"}, map[string]string{"RBEE_SIM_PORT": "8081", "RBEE_SIM_WORKER_ID": "w-sim"},
			func(c Config) bool { return c.Port == 9 && c.WorkerID == "w-sim" }, false},
		{"bad env", nil, map[string]string{"RBEE_SIM_LOAD_TIME": "soon"}, nil, true},
		{"bad flag", []string{"--load-time", "x"}, nil, nil, true},
		{"unknown flag", []string{"--nope"}, nil, nil, true},
		{"stray arg", []string{"extra"}, nil, nil, true},
		{"port range", []string{"--port", "70000"}, nil, nil, true},
		{"negative duration", []string{"--crash-after", "-1s"}, nil, nil, true},
		{"negative alloc", []string{"--alloc-mib", "-1"}, nil, nil, true},
		{"negative leak", []string{"--leak-mib-per-sec", "-1"}, nil, nil, true},
		{"negative rate", []string{"--tokens-per-second", "-1"}, nil, nil, true},
		{"NaN rate", []string{"--tokens-per-second", "NaN"}, nil, nil, true},
		{"NaN leak", []string{"--leak-mib-per-sec", "NaN"}, nil, nil, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := Parse(tt.args, func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok }, io.Discard)
			if tt.wantErr {
				if err == nil {
					t.Fatalf("want error, got %+v", c)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tt.check(c) {
				t.Fatalf("unexpected config %+v", c)
			}
		})
	}
}

// inProcess runs Run with an HTTP port and no hive, and returns its base URL.
func inProcess(t *testing.T, cfg Config) (string, *state) {
	t.Helper()
	s := newState(cfg)
	s.ready.Store(true)
	srv := httptest.NewServer(s.Handler())
	t.Cleanup(srv.Close)
	return srv.URL, s
}

func post(t *testing.T, url, ctype, body string, hdr map[string]string) *http.Response {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// readSSE returns the data payloads of an event stream.
func readSSE(t *testing.T, r io.Reader) []string {
	t.Helper()
	var out []string
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		if line == "" {
			continue
		}
		d, ok := strings.CutPrefix(line, "data: ")
		if !ok {
			t.Fatalf("non-data SSE line %q", line)
		}
		out = append(out, d)
	}
	return out
}

func keys(t *testing.T, js string) ([]string, map[string]any) {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal([]byte(js), &m); err != nil {
		t.Fatalf("%q: %v", js, err)
	}
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks, m
}

func TestInferenceSSE(t *testing.T) {
	base, _ := inProcess(t, Config{TokensPerSecond: 0, Model: "/models/tiny.gguf"})
	tests := []struct {
		name       string
		body       string
		tokens     int
		stopReason string
	}{
		{"max tokens", `{"job_id":"job-1","prompt":"hello","max_tokens":7,"stream":true}`, 7, "MAX_TOKENS"},
		{"one token", `{"job_id":"job-2","prompt":"x","max_tokens":1,"seed":7}`, 1, "MAX_TOKENS"},
		// seed 42 token 0 is "." (deterministic vocabulary draw)
		{"stop sequence", `{"job_id":"job-3","prompt":"x","max_tokens":50,"stop":["` + tokenText(42, 0) + `"]}`, 1, "STOP_SEQUENCE"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := post(t, base+"/v1/inference", "application/json", tt.body, map[string]string{"X-Correlation-ID": "corr-1"})
			if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != "text/event-stream" || resp.Header.Get("X-Correlation-ID") != "corr-1" {
				t.Fatalf("status %d, headers %v", resp.StatusCode, resp.Header)
			}
			ev := readSSE(t, resp.Body)
			if len(ev) != tt.tokens+3 || ev[len(ev)-1] != "[DONE]" {
				t.Fatalf("events %q", ev)
			}
			ks, m := keys(t, ev[0])
			if !reflect.DeepEqual(ks, []string{"job_id", "model", "started_at", "type"}) || m["type"] != "started" || m["model"] != "/models/tiny.gguf" || !strings.HasPrefix(tt.body, `{"job_id":"`+m["job_id"].(string)) {
				t.Fatalf("started %q", ev[0])
			}
			for i := 0; i < tt.tokens; i++ {
				ks, m := keys(t, ev[1+i])
				if !reflect.DeepEqual(ks, []string{"i", "t", "type"}) || m["type"] != "token" || m["i"] != float64(i) || m["t"] == "" {
					t.Fatalf("token %d: %q", i, ev[1+i])
				}
			}
			ks, m = keys(t, ev[len(ev)-2])
			want := []string{"decode_time_ms", "stop_reason", "tokens_out", "type"}
			if tt.stopReason == "STOP_SEQUENCE" {
				want = []string{"decode_time_ms", "stop_reason", "stop_sequence_matched", "tokens_out", "type"}
			}
			if !reflect.DeepEqual(ks, want) || m["type"] != "end" || m["tokens_out"] != float64(tt.tokens) || m["stop_reason"] != tt.stopReason {
				t.Fatalf("end %q", ev[len(ev)-2])
			}
		})
	}
}

func TestTokensPerSecond(t *testing.T) {
	base, _ := inProcess(t, Config{TokensPerSecond: 100})
	start := time.Now()
	resp := post(t, base+"/v1/inference", "application/json", `{"job_id":"j","prompt":"p","max_tokens":20}`, nil)
	ev := readSSE(t, resp.Body)
	if el := time.Since(start); el < 180*time.Millisecond || len(ev) != 23 {
		t.Fatalf("20 tokens at 100/s took %v (%d events), want ≥ ~200ms", el, len(ev))
	}
}

func TestInferenceErrors(t *testing.T) {
	base, _ := inProcess(t, Config{})
	type fe struct{ Field, Constraint string }
	long := strings.Repeat("a", 32769)
	tests := []struct {
		name   string
		ctype  string
		body   string
		status int
		errs   []fe   // for 400 validation errors
		text   string // substring of a plain-text body
	}{
		{"no content type", "", `{}`, 415, nil, "Content-Type"},
		{"malformed json", "application/json", `{"job_id":`, 400, nil, "Failed to parse the request body as JSON"},
		{"missing max_tokens", "application/json", `{"job_id":"j","prompt":"p"}`, 422, nil, "missing field `max_tokens`"},
		{"negative u32", "application/json", `{"job_id":"j","prompt":"p","max_tokens":-1}`, 422, nil, "Failed to deserialize"},
		{"wrong type", "application/json", `{"job_id":1,"prompt":"p","max_tokens":1}`, 422, nil, "Failed to deserialize"},
		{"all violations", "application/json",
			`{"job_id":"","prompt":"","max_tokens":0,"temperature":2.5,"top_p":1.5,"repetition_penalty":-1,"min_p":2,"stop":["a","","` + strings.Repeat("s", 101) + `","b","c"]}`,
			400, []fe{{"job_id", "non_empty"}, {"prompt", "length(1..=32768)"}, {"max_tokens", "range(1..=2048)"}, {"temperature", "range(0.0..=2.0)"},
				{"top_p", "range(0.0..=1.0)"}, {"repetition_penalty", "range(0.0..=2.0)"}, {"stop", "max_count(4)"}, {"stop[1]", "non_empty"},
				{"stop[2]", "max_length(100)"}, {"min_p", "range(0.0..=1.0)"}}, ""},
		{"max_tokens too big", "application/json", `{"job_id":"j","prompt":"p","max_tokens":5000}`, 400, []fe{{"max_tokens", "range(1..=2048)"}}, ""},
		{"prompt too long", "application/json", `{"job_id":"j","prompt":"` + long + `","max_tokens":1}`, 400, []fe{{"prompt", "length(1..=32768)"}}, ""},
		{"boundaries pass", "application/json", `{"job_id":"j","prompt":"p","max_tokens":1,"temperature":2,"top_p":1,"min_p":0,"repetition_penalty":0,"stop":["a","b","c","` + strings.Repeat("d", 100) + `"]}`, 200, nil, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp := post(t, base+"/v1/inference", tt.ctype, tt.body, nil)
			body, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != tt.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tt.status, body)
			}
			if tt.text != "" && !strings.Contains(string(body), tt.text) {
				t.Fatalf("body %q lacks %q", body, tt.text)
			}
			if tt.errs == nil {
				return
			}
			var got struct {
				Errors []map[string]any `json:"errors"`
			}
			if err := json.Unmarshal(body, &got); err != nil {
				t.Fatal(err)
			}
			var gotFE []fe
			for _, e := range got.Errors {
				gotFE = append(gotFE, fe{e["field"].(string), e["constraint"].(string)})
				if e["message"] == "" {
					t.Fatalf("empty message in %v", e)
				}
				if e["field"] == "prompt" && e["value"] != nil {
					t.Fatalf("prompt echoed: %v", e)
				}
			}
			if !reflect.DeepEqual(gotFE, tt.errs) {
				t.Fatalf("errors %v, want %v", gotFE, tt.errs)
			}
			if tt.name == "max_tokens too big" && got.Errors[0]["message"] != "max_tokens must be at most 2048 (got 5000)" {
				t.Fatalf("message %q", got.Errors[0]["message"])
			}
		})
	}
}

func TestAuthAndReadiness(t *testing.T) {
	s := newState(Config{APIToken: "tok"})
	srv := httptest.NewServer(s.Handler())
	defer srv.Close()
	get := func(path, auth string) (int, string) {
		req, _ := http.NewRequest(http.MethodGet, srv.URL+path, nil)
		if auth != "" {
			req.Header.Set("Authorization", auth)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, strings.TrimSpace(string(b))
	}
	tests := []struct {
		name, path, auth string
		ready            bool
		code             int
		body             string
	}{
		{"health loading is public 503", "/health", "", false, 503, `{"status":"loading","vram_bytes":0}`},
		{"ready loading", "/v1/ready", "Bearer tok", false, 200, `{"progress_url":"/v1/loading/progress","ready":false,"state":"loading"}`},
		{"no header", "/v1/ready", "", true, 401, `{"error":{"code":"MISSING_API_KEY","message":"Missing API key"}}`},
		{"lowercase bearer", "/v1/ready", "bearer tok", true, 401, `{"error":{"code":"MISSING_API_KEY","message":"Missing API key"}}`},
		{"wrong token", "/v1/ready", "Bearer nope", true, 401, `{"error":{"code":"INVALID_API_KEY","message":"Invalid or missing API key"}}`},
		{"health ready", "/health", "", true, 200, `{"status":"healthy","vram_bytes":0}`},
		{"ready", "/v1/ready", "Bearer tok", true, 200, `{"model_loaded":true,"ready":true,"state":"idle"}`},
		{"progress", "/v1/loading/progress", "Bearer tok", true, 503, "Model not loading"},
		{"no /v1/health on a worker", "/v1/health", "", true, 404, "404 page not found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s.ready.Store(tt.ready)
			code, body := get(tt.path, tt.auth)
			if code != tt.code || body != tt.body {
				t.Fatalf("%d %s, want %d %s", code, body, tt.code, tt.body)
			}
		})
	}
}

// TestRunInProcess: ctx end is a clean stop; no hive configured is fine.
func TestRunInProcess(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan int, 1)
	var logBuf bytes.Buffer
	log := slog.New(slog.NewTextHandler(&syncWriter{w: &logBuf}, nil))
	go func() { done <- Run(ctx, Config{Port: -1}, worker.New(worker.Env{}), nil, log) }()
	time.Sleep(50 * time.Millisecond)
	cancel()
	select {
	case code := <-done:
		if code != ExitOK {
			t.Fatalf("exit %d", code)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return")
	}
}

// Like serde, the 422 names the first missing field in declaration order,
// every time.
func TestMissingFieldsInDeclarationOrder(t *testing.T) {
	base, _ := inProcess(t, Config{})
	for _, tt := range []struct{ body, want string }{
		{`{}`, "job_id"}, {`{"max_tokens":1}`, "job_id"}, {`{"job_id":"j"}`, "prompt"}, {`{"job_id":"j","prompt":"p"}`, "max_tokens"},
	} {
		for range 20 {
			resp := post(t, base+"/v1/inference", "application/json", tt.body, nil)
			b, _ := io.ReadAll(resp.Body)
			if resp.StatusCode != 422 || !strings.Contains(string(b), "missing field `"+tt.want+"`") {
				t.Fatalf("%s: %d %q, want 422 naming %s", tt.body, resp.StatusCode, b, tt.want)
			}
		}
	}
}
