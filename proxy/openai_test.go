package proxy

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/api"
)

// fakeEngine answers like llama-server's OpenAI routes: three content
// deltas, a finish chunk, a usage chunk when asked for, then [DONE]. mode
// "break" stops after the second delta; "error" sends an error event;
// "reject" answers 400.
type fakeEngine struct {
	mode string
	got  chan map[string]any // each request body
}

func (f *fakeEngine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var req map[string]any
	_ = json.NewDecoder(r.Body).Decode(&req)
	f.got <- req
	if f.mode == "reject" {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		_, _ = io.WriteString(w, `{"error":{"code":400,"message":"bad prompt","type":"invalid_request_error"}}`)
		return
	}
	if req["stream"] != true {
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"choices":[{"index":0,"message":{"content":"abc"},"finish_reason":"length"}],"usage":{"prompt_tokens":5,"completion_tokens":3},"timings":{"prompt_n":5,"predicted_n":3,"predicted_per_second":30}}`)
		return
	}
	w.Header().Set("Content-Type", "text/event-stream")
	fl := w.(http.Flusher)
	send := func(s string) { _, _ = io.WriteString(w, "data: "+s+"\n\n"); fl.Flush() }
	for i, c := range []string{"a", "b", "c"} {
		if f.mode == "break" && i == 2 {
			return
		}
		if f.mode == "error" && i == 1 {
			_, _ = io.WriteString(w, `error: {"code":500,"message":"boom","type":"server_error"}`+"\n\n")
			return
		}
		send(fmt.Sprintf(`{"choices":[{"index":0,"delta":{"content":%q},"finish_reason":null}]}`, c))
	}
	send(`{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"timings":{"prompt_n":4,"predicted_n":3,"predicted_per_second":50}}`)
	if so, _ := req["stream_options"].(map[string]any); so["include_usage"] == true {
		send(`{"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":3,"total_tokens":7}}`)
	}
	send("[DONE]")
}

func newOpenAIRig(t *testing.T, eng *fakeEngine) (*Proxy, *prometheus.Registry, string) {
	t.Helper()
	us := httptest.NewServer(eng)
	t.Cleanup(us.Close)
	up, _ := url.Parse(us.URL)
	reg := prometheus.NewPedanticRegistry()
	p, err := New(reg, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	router := api.NewRouter(slog.New(slog.DiscardHandler))
	router.HandleFunc("POST /w/v1/chat/completions", nil, func(w http.ResponseWriter, r *http.Request) {
		p.ServeOpenAI(w, r, up, RouteChatCompletions, testLabels, Hooks{})
	})
	hive := httptest.NewServer(router)
	t.Cleanup(hive.Close)
	return p, reg, hive.URL + "/w/v1/chat/completions"
}

func TestOpenAIProxy(t *testing.T) {
	tests := []struct {
		name       string
		mode       string
		body       string
		status     int
		wantEvents []string // data of each event the client sees, "*" for any
		outcome    string
		errType    string
		tokens     float64
		prompt     float64
		finish     string
		usageAsked bool
	}{
		{name: "stream without usage: asked for, stripped", body: `{"stream":true,"messages":[]}`, status: 200,
			wantEvents: []string{"*a*", "*b*", "*c*", "*stop*", "[DONE]"}, outcome: StatusOK, tokens: 3, prompt: 4, finish: FinishStop, usageAsked: true},
		{name: "stream with usage: kept", body: `{"stream":true,"stream_options":{"include_usage":true}}`, status: 200,
			wantEvents: []string{"*a*", "*b*", "*c*", "*stop*", "*total_tokens*", "[DONE]"}, outcome: StatusOK, tokens: 3, prompt: 4, finish: FinishStop, usageAsked: true},
		{name: "not streamed", body: `{"messages":[]}`, status: 200, outcome: StatusOK, tokens: 3, prompt: 5, finish: FinishLength},
		{name: "broken stream", mode: "break", body: `{"stream":true}`, status: 200,
			wantEvents: []string{"*a*", "*b*", `*"code":"WORKER_STREAM_ERROR"*`, "[DONE]"}, outcome: StatusError, errType: ErrorTypeStream, tokens: 2, usageAsked: true},
		{name: "engine error event", mode: "error", body: `{"stream":true}`, status: 200,
			wantEvents: []string{"*a*", "*boom*", "[DONE]"}, outcome: StatusError, errType: ErrorTypeWorker, tokens: 1, usageAsked: true},
		{name: "engine rejects", mode: "reject", body: `{"stream":true}`, status: 400, outcome: StatusRejected, usageAsked: true},
		{name: "not JSON", body: `[1]`, status: 400, outcome: StatusRejected},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			eng := &fakeEngine{mode: tc.mode, got: make(chan map[string]any, 1)}
			p, reg, u := newOpenAIRig(t, eng)
			resp, err := http.Post(u, "application/json", strings.NewReader(tc.body))
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != tc.status {
				t.Fatalf("status %d, want %d: %s", resp.StatusCode, tc.status, raw)
			}
			if tc.wantEvents != nil {
				var events []string
				for _, ev := range strings.Split(strings.TrimSpace(string(raw)), "\n\n") {
					_, data, _ := strings.Cut(ev, ": ")
					events = append(events, data)
				}
				if len(events) != len(tc.wantEvents) {
					t.Fatalf("events %q, want %q", events, tc.wantEvents)
				}
				for i, w := range tc.wantEvents {
					if ok := w == events[i] || (strings.HasPrefix(w, "*") && strings.Contains(events[i], strings.Trim(w, "*"))); !ok {
						t.Errorf("event %d = %q, want %q", i, events[i], w)
					}
				}
			}
			if tc.mode != "" || tc.body != "[1]" {
				req := <-eng.got
				so, _ := req["stream_options"].(map[string]any)
				if asked := so["include_usage"] == true; asked != tc.usageAsked {
					t.Errorf("engine got include_usage %v, want %v", asked, tc.usageAsked)
				}
			}
			rg := &rig{t: t, p: p, reg: reg}
			rg.exactlyOne(p.m.requests, "requests_total{status=%q}", allStatuses, tc.outcome)
			rg.exactlyOne(p.m.errors, "errors_total{type=%q}", allErrorTypes, tc.errType)
			if got := rg.counter(p.m.tokens); got != tc.tokens {
				t.Errorf("tokens %v, want %v", got, tc.tokens)
			}
			if got := rg.counter(p.m.promptTokens); got != tc.prompt {
				t.Errorf("prompt tokens %v, want %v", got, tc.prompt)
			}
			if tc.finish != "" && rg.counter(p.m.finish, tc.finish) != 1 {
				t.Errorf("finish reason %s not counted", tc.finish)
			}
			if tc.outcome == StatusOK && histCount(t, reg, "rbee_hive_inference_tokens_per_second") != 1 {
				t.Error("tokens/s not observed")
			}
			if tc.wantEvents != nil && tc.outcome == StatusOK && histCount(t, reg, "rbee_hive_inference_time_to_first_token_seconds") != 1 {
				t.Error("time to first token not observed")
			}
		})
	}
}

func TestPrepareOpenAIBody(t *testing.T) {
	_, _, _, err := prepareOpenAIBody([]byte(`{"stream":"yes"}`), RouteChatCompletions)
	if err == nil {
		t.Error(`"stream":"yes" accepted`)
	}
	out, streaming, strip, err := prepareOpenAIBody([]byte(`{"stream":true,"stream_options":{"x":1}}`), RouteCompletions)
	if err != nil || !streaming || !strip || !strings.Contains(string(out), `"include_usage":true`) || !strings.Contains(string(out), `"x":1`) {
		t.Errorf("got %s %v %v %v", out, streaming, strip, err)
	}
	out, _, strip, _ = prepareOpenAIBody([]byte(`{"stream":true}`), RouteNativeComplete)
	if strip || string(out) != `{"stream":true}` {
		t.Errorf("native route body changed: %s", out)
	}
}

// llama.cpp's native /completion stream has no [DONE]: its last event says
// "stop": true. A stream that breaks before it gets the error event only.
func TestOpenAIProxyNativeCompletion(t *testing.T) {
	for _, broken := range []bool{false, true} {
		t.Run(fmt.Sprint("broken=", broken), func(t *testing.T) {
			eng := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "text/event-stream")
				_, _ = io.WriteString(w, "data: {\"content\":\"a\",\"stop\":false}\n\ndata: {\"content\":\"b\",\"stop\":false}\n\n")
				if !broken {
					_, _ = io.WriteString(w, `data: {"content":"","stop":true,"stop_type":"limit","tokens_predicted":2,"tokens_evaluated":3,"timings":{"predicted_per_second":40}}`+"\n\n")
				}
			}))
			defer eng.Close()
			up, _ := url.Parse(eng.URL)
			reg := prometheus.NewPedanticRegistry()
			p, err := New(reg, Options{Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				t.Fatal(err)
			}
			hive := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				p.ServeOpenAI(w, r, up, RouteNativeComplete, testLabels, Hooks{})
			}))
			defer hive.Close()
			resp, err := http.Post(hive.URL, "application/json", strings.NewReader(`{"prompt":"x","stream":true}`))
			if err != nil {
				t.Fatal(err)
			}
			raw, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			s := string(raw)
			if strings.Contains(s, "[DONE]") {
				t.Errorf("native stream got [DONE]: %s", s)
			}
			rg := &rig{t: t, p: p, reg: reg}
			if broken {
				if !strings.Contains(s, CodeStreamError) {
					t.Errorf("no error event: %s", s)
				}
				rg.exactlyOne(p.m.requests, "requests_total{status=%q}", allStatuses, StatusError)
				return
			}
			rg.exactlyOne(p.m.requests, "requests_total{status=%q}", allStatuses, StatusOK)
			if rg.counter(p.m.tokens) != 2 || rg.counter(p.m.promptTokens) != 3 || rg.counter(p.m.finish, FinishLength) != 1 {
				t.Errorf("tokens %v prompt %v length %v", rg.counter(p.m.tokens), rg.counter(p.m.promptTokens), rg.counter(p.m.finish, FinishLength))
			}
		})
	}
}

// An engine that drops a reused keep-alive connection without answering
// (cpp-httplib closing an idle connection as the POST arrives) costs the
// client nothing: the request goes again on a fresh connection.
func TestOpenAIProxyRetriesStaleConnection(t *testing.T) {
	var n atomic.Int32
	eng := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 2 {
			conn, _, err := http.NewResponseController(w).Hijack()
			if err == nil {
				conn.Close()
			}
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = io.WriteString(w, `{"choices":[{"text":"x","finish_reason":"length"}],"usage":{"prompt_tokens":1,"completion_tokens":1}}`)
	}))
	defer eng.Close()
	up, _ := url.Parse(eng.URL)
	p, err := New(prometheus.NewPedanticRegistry(), Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	hive := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		p.ServeOpenAI(w, r, up, RouteCompletions, testLabels, Hooks{})
	}))
	defer hive.Close()
	for i := range 2 {
		resp, err := http.Post(hive.URL, "application/json", strings.NewReader(`{"prompt":"x"}`))
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("request %d: %d %s", i, resp.StatusCode, b)
		}
	}
	if got := n.Load(); got != 3 {
		t.Errorf("engine saw %d requests, want 3 (one dropped, retried)", got)
	}
}
