package proxy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/internal/testkit"
)

var testLabels = Labels{Backend: "simworker", Model: "tiny"}

// rig is a proxy behind the hive's real router, in a real HTTP server, in
// front of a real upstream HTTP server.
type rig struct {
	t        *testing.T
	reg      *prometheus.Registry
	p        *Proxy
	hive     *httptest.Server
	upstream *url.URL
	started  atomic.Int32
	ended    chan struct{} // one value per finished Serve
}

func newRig(t *testing.T, upstream http.Handler, opts Options) *rig {
	t.Helper()
	var up *url.URL
	if upstream != nil {
		us := httptest.NewServer(upstream)
		t.Cleanup(us.Close)
		var err error
		if up, err = url.Parse(us.URL); err != nil {
			t.Fatal(err)
		}
	}
	return newRigURL(t, up, opts)
}

func newRigURL(t *testing.T, up *url.URL, opts Options) *rig {
	t.Helper()
	rg := &rig{t: t, reg: prometheus.NewPedanticRegistry(), upstream: up, ended: make(chan struct{}, 16)}
	var err error
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if rg.p, err = New(rg.reg, opts); err != nil {
		t.Fatal(err)
	}
	router := api.NewRouter(slog.New(slog.DiscardHandler))
	router.HandleFunc("POST /v1/workers/{id}/inference", nil, func(w http.ResponseWriter, r *http.Request) {
		rg.p.Serve(w, r, rg.upstream, testLabels, Hooks{
			OnStart: func() { rg.started.Add(1) },
			OnEnd:   func() { rg.ended <- struct{}{} },
			Prepare: func(req *http.Request) { req.Header.Set("Authorization", "Bearer worker-token") },
		})
	})
	rg.hive = httptest.NewServer(router)
	t.Cleanup(rg.hive.Close)
	return rg
}

func (rg *rig) post(ctx context.Context, body string) *http.Response {
	rg.t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, rg.hive.URL+"/v1/workers/w-1/inference", strings.NewReader(body))
	if err != nil {
		rg.t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer hive-token")
	req.Header.Set("X-Correlation-ID", "corr-1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		rg.t.Fatal(err)
	}
	rg.t.Cleanup(func() { resp.Body.Close() })
	return resp
}

// waitEnd waits for Serve to return, after which the metrics are final.
func (rg *rig) waitEnd() {
	rg.t.Helper()
	select {
	case <-rg.ended:
	case <-time.After(10 * time.Second):
		rg.t.Fatal("Serve did not return")
	}
}

func (rg *rig) counter(c *prometheus.CounterVec, lv ...string) float64 {
	return testutil.ToFloat64(c.WithLabelValues(append([]string{testLabels.Backend, testLabels.Model}, lv...)...))
}

// outcomes asserts requests_total and errors_total for testLabels: exactly
// one request with the given status and, if errType is set, one error.
func (rg *rig) outcomes(status, errType string) {
	rg.t.Helper()
	rg.exactlyOne(rg.p.m.requests, "requests_total{status=%q}", allStatuses, status)
	rg.exactlyOne(rg.p.m.errors, "errors_total{type=%q}", allErrorTypes, errType)
}

// exactlyOne asserts that the series of values are 1 for hit and 0 else.
func (rg *rig) exactlyOne(c *prometheus.CounterVec, name string, values []string, hit string) {
	rg.t.Helper()
	for _, v := range values {
		want := 0.0
		if v == hit {
			want = 1
		}
		if got := rg.counter(c, v); got != want {
			rg.t.Errorf(name+" = %v, want %v", v, got, want)
		}
	}
}

// sse reads one event's data (lines joined) from br.
func sse(br *bufio.Reader) (string, error) {
	var data []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return strings.Join(data, "\n"), err
		}
		line = strings.TrimRight(line, "\r\n")
		if line == "" {
			if len(data) > 0 {
				return strings.Join(data, "\n"), nil
			}
			continue
		}
		if v, ok := strings.CutPrefix(line, "data:"); ok {
			data = append(data, strings.TrimPrefix(v, " "))
		}
	}
}

func readAll(t *testing.T, r io.Reader) []string {
	t.Helper()
	br := bufio.NewReader(r)
	var evs []string
	for {
		ev, err := sse(br)
		if ev != "" {
			evs = append(evs, ev)
		}
		if err != nil {
			return evs
		}
	}
}

// worker is a real HTTP upstream speaking the worker's inference stream.
type worker struct {
	tokens   int
	delay    time.Duration
	decodeMs int
	gate     chan struct{} // if set, waited on after the first token
	seen     chan *http.Request
}

func (wk *worker) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if wk.seen != nil {
		wk.seen <- r
	}
	if r.Method != http.MethodPost || r.URL.Path != "/v1/inference" {
		http.Error(w, "wrong route", http.StatusNotFound)
		return
	}
	var req struct {
		JobID string `json:"job_id"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	rc := http.NewResponseController(w)
	w.Header().Set("Content-Type", "text/event-stream")
	w.Header().Set("X-Correlation-ID", r.Header.Get("X-Correlation-ID"))
	send := func(s string) bool {
		if _, err := fmt.Fprintf(w, "data: %s\n\n", s); err != nil {
			return false
		}
		return rc.Flush() == nil
	}
	send(`{"type":"narration","actor":"llm-worker-rbee","action":"execute_request","target":"x","human":"go"}`)
	send(fmt.Sprintf(`{"type":"started","job_id":%q,"model":"model","started_at":"0"}`, req.JobID))
	for i := range wk.tokens {
		if !send(fmt.Sprintf(`{"type":"token","t":"tok%d ","i":%d}`, i, i)) {
			return
		}
		if i == 0 && wk.gate != nil {
			select {
			case <-wk.gate:
			case <-r.Context().Done():
				return
			}
		}
		time.Sleep(wk.delay)
	}
	send(fmt.Sprintf(`{"type":"end","tokens_out":%d,"decode_time_ms":%d,"stop_reason":"MAX_TOKENS"}`, wk.tokens, wk.decodeMs))
	send("[DONE]")
}

const body = `{"job_id":"job-1","prompt":"hello","max_tokens":5}`

func TestProxyStreamsSuccess(t *testing.T) {
	seen := make(chan *http.Request, 1)
	rg := newRig(t, &worker{tokens: 5, decodeMs: 250, seen: seen}, Options{})
	resp := rg.post(t.Context(), body)
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	if got := resp.Header.Get("X-Correlation-ID"); got != "corr-1" {
		t.Errorf("X-Correlation-ID = %q, want corr-1 echoed", got)
	}
	evs := readAll(t, resp.Body)
	rg.waitEnd()

	if len(evs) != 9 || evs[len(evs)-1] != "[DONE]" || !strings.Contains(evs[len(evs)-2], `"type":"end"`) {
		t.Fatalf("events passed through = %q", evs)
	}
	up := <-seen
	if got := up.Header.Get("Authorization"); got != "Bearer worker-token" {
		t.Errorf("upstream Authorization = %q: the hive token must never reach a worker, Prepare's must", got)
	}
	rg.outcomes(StatusOK, "")
	if got := rg.counter(rg.p.m.tokens); got != 5 {
		t.Errorf("tokens_total = %v, want 5", got)
	}
	// 5 tokens in 250 ms of decode is 20 tokens/s: one observation, sum 20.
	if err := testutil.GatherAndCompare(rg.reg, strings.NewReader(`
# HELP rbee_hive_inference_tokens_per_second Decode rate of a successful inference: tokens_out over the worker's decode_time_ms, else over the time from first token to end.
# TYPE rbee_hive_inference_tokens_per_second histogram
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="1"} 0
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="2"} 0
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="5"} 0
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="10"} 0
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="20"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="30"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="50"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="75"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="100"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="150"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="200"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="300"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="500"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="1000"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="2000"} 1
rbee_hive_inference_tokens_per_second_bucket{backend="simworker",model="tiny",le="+Inf"} 1
rbee_hive_inference_tokens_per_second_sum{backend="simworker",model="tiny"} 20
rbee_hive_inference_tokens_per_second_count{backend="simworker",model="tiny"} 1
`), "rbee_hive_inference_tokens_per_second"); err != nil {
		t.Error(err)
	}
	for name, h := range map[string]*prometheus.HistogramVec{"duration": rg.p.m.duration, "ttft": rg.p.m.ttft} {
		if n := testutil.CollectAndCount(h); n != 1 {
			t.Errorf("%s series = %d, want 1", name, n)
		}
	}
	if n := histCount(t, rg.reg, "rbee_hive_inference_duration_seconds"); n != 1 {
		t.Errorf("duration count = %d, want 1", n)
	}
	if n := histCount(t, rg.reg, "rbee_hive_inference_time_to_first_token_seconds"); n != 1 {
		t.Errorf("ttft count = %d, want 1", n)
	}
	if got := rg.started.Load(); got != 1 {
		t.Errorf("OnStart calls = %d, want 1", got)
	}
	if got := testutil.ToFloat64(rg.p.m.inFlight.WithLabelValues(testLabels.Backend, testLabels.Model)); got != 0 {
		t.Errorf("in flight after the end = %v", got)
	}
}

func histCount(t *testing.T, reg prometheus.Gatherer, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, m := range mf.GetMetric() {
				n += m.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

// The client must get the first token while the worker is still holding
// back the rest: proof that nothing buffers the stream.
func TestProxyDoesNotBuffer(t *testing.T) {
	gate := make(chan struct{})
	rg := newRig(t, &worker{tokens: 3, gate: gate}, Options{})
	resp := rg.post(t.Context(), body)
	br := bufio.NewReader(resp.Body)
	got := make(chan string, 1)
	go func() {
		for {
			ev, err := sse(br)
			if err != nil || strings.Contains(ev, `"type":"token"`) {
				got <- ev
				return
			}
		}
	}()
	select {
	case ev := <-got:
		if !strings.Contains(ev, `"i":0`) {
			t.Fatalf("first token event = %q", ev)
		}
		if n := testutil.ToFloat64(rg.p.m.inFlight.WithLabelValues(testLabels.Backend, testLabels.Model)); n != 1 {
			t.Errorf("in flight while streaming = %v, want 1", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the first token did not reach the client before the worker finished: the proxy buffers")
	}
	close(gate)
	rest := readAll(t, br)
	rg.waitEnd()
	if rest[len(rest)-1] != "[DONE]" {
		t.Errorf("tail = %q", rest)
	}
	rg.outcomes(StatusOK, "")
}

func TestProxyClientCancelPropagates(t *testing.T) {
	upstreamDone := make(chan error, 1)
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // net/http watches for the peer leaving only after the body is read
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\n")
		http.NewResponseController(w).Flush()
		<-r.Context().Done()
		upstreamDone <- r.Context().Err()
	})
	rg := newRig(t, up, Options{})
	ctx, cancel := context.WithCancel(t.Context())
	resp := rg.post(ctx, body)
	if ev, err := sse(bufio.NewReader(resp.Body)); err != nil || !strings.Contains(ev, "token") {
		t.Fatalf("first event %q, %v", ev, err)
	}
	cancel()
	select {
	case err := <-upstreamDone:
		if !errors.Is(err, context.Canceled) {
			t.Errorf("upstream context error = %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the worker's request was not cancelled when the client left")
	}
	rg.waitEnd()
	rg.outcomes(StatusCancelled, ErrorTypeClientCancel)
	if got := rg.counter(rg.p.m.tokens); got != 1 {
		t.Errorf("tokens_total = %v, want the 1 token delivered", got)
	}
}

// The worker dies mid-stream (its connection is torn down): the client
// gets the tokens so far, an error event and [DONE].
func TestProxyUpstreamDiesMidStream(t *testing.T) {
	up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		fmt.Fprint(w, "data: {\"type\":\"started\",\"job_id\":\"j\",\"model\":\"model\",\"started_at\":\"0\"}\n\n")
		fmt.Fprint(w, "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\n")
		fmt.Fprint(w, "data: {\"type\":\"token\",\"t\":\"b\",\"i\":1}\n")
		http.NewResponseController(w).Flush()
		time.Sleep(20 * time.Millisecond)
		panic(http.ErrAbortHandler) // net/http drops the connection: a crashed worker
	})
	rg := newRig(t, up, Options{})
	resp := rg.post(t.Context(), body)
	evs := readAll(t, resp.Body)
	rg.waitEnd()
	if len(evs) != 5 {
		t.Fatalf("events = %q", evs)
	}
	var e struct{ Type, Code, Message string }
	if err := json.Unmarshal([]byte(evs[3]), &e); err != nil || e.Type != "error" || e.Code != CodeStreamError || e.Message == "" {
		t.Errorf("error event = %q (%v)", evs[3], err)
	}
	if evs[4] != "[DONE]" {
		t.Errorf("last event = %q, want [DONE]", evs[4])
	}
	rg.outcomes(StatusError, ErrorTypeStream)
	if got := rg.counter(rg.p.m.tokens); got != 2 {
		t.Errorf("tokens_total = %v, want 2", got)
	}
	if n := histCount(t, rg.reg, "rbee_hive_inference_duration_seconds"); n != 0 {
		t.Errorf("duration observed for a failed request")
	}
}

func TestProxyStreamOutcomes(t *testing.T) {
	tests := []struct {
		name      string
		stream    string // what the worker writes, then it returns
		hang      bool   // then it stays silent
		wantLast  []string
		status    string
		errType   string
		wantToken float64
	}{
		{
			name:     "worker error event passes through",
			stream:   "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: {\"type\":\"error\",\"code\":\"INFERENCE_FAILED\",\"message\":\"boom\"}\n\ndata: [DONE]\n\n",
			wantLast: []string{`{"type":"error","code":"INFERENCE_FAILED","message":"boom"}`, "[DONE]"},
			status:   StatusError, errType: ErrorTypeWorker, wantToken: 1,
		},
		{
			name:     "clean EOF before end",
			stream:   "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\n",
			wantLast: []string{`{"type":"token","t":"a","i":0}`, `"code":"WORKER_STREAM_ERROR"`, "[DONE]"},
			status:   StatusError, errType: ErrorTypeStream, wantToken: 1,
		},
		{
			// Nothing may follow [DONE]: the proxy's error event goes before it.
			name:     "DONE without end gets the error event before DONE",
			stream:   "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: [DONE]\n\n",
			wantLast: []string{`{"type":"token","t":"a","i":0}`, `"code":"WORKER_STREAM_ERROR"`, "[DONE]"},
			status:   StatusError, errType: ErrorTypeStream, wantToken: 1,
		},
		{
			name:     "end without DONE gets DONE",
			stream:   "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: {\"type\":\"end\",\"tokens_out\":7,\"decode_time_ms\":70,\"stop_reason\":\"EOS\"}\n\n",
			wantLast: []string{`"type":"end"`, "[DONE]"},
			status:   StatusOK, wantToken: 7,
		},
		{
			name:     "idle timeout mid-stream",
			stream:   "data: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\n",
			hang:     true,
			wantLast: []string{`"code":"TIMEOUT"`, "[DONE]"},
			status:   StatusError, errType: ErrorTypeTimeout, wantToken: 1,
		},
		{
			name:     "a line longer than the parse buffer is forwarded, not parsed",
			stream:   "data: {\"type\":\"narration\",\"human\":\"" + strings.Repeat("x", 3*maxLine) + "\"}\n\ndata: {\"type\":\"token\",\"t\":\"a\",\"i\":0}\n\ndata: {\"type\":\"end\",\"tokens_out\":1,\"decode_time_ms\":10}\n\ndata: [DONE]\n\n",
			wantLast: []string{"{\"type\":\"narration\",\"human\":\"" + strings.Repeat("x", 3*maxLine) + "\"}", `"type":"token"`, `"type":"end"`, "[DONE]"},
			status:   StatusOK, wantToken: 1,
		},
		{
			name:     "multi-line data and comments are framed per SSE",
			stream:   ": keep-alive\n\nevent: message\ndata: {\"type\":\"token\",\ndata: \"t\":\"a\",\"i\":0}\r\n\r\ndata: {\"type\":\"end\",\"tokens_out\":1,\"decode_time_ms\":10}\n\ndata: [DONE]\n\n",
			wantLast: []string{"{\"type\":\"token\",\n\"t\":\"a\",\"i\":0}", `"type":"end"`, "[DONE]"},
			status:   StatusOK, wantToken: 1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			up := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body)
				w.Header().Set("Content-Type", "text/event-stream; charset=utf-8")
				io.WriteString(w, tc.stream)
				http.NewResponseController(w).Flush()
				if tc.hang {
					<-r.Context().Done()
				}
			})
			rg := newRig(t, up, Options{IdleTimeout: 300 * time.Millisecond})
			evs := readAll(t, rg.post(t.Context(), body).Body)
			rg.waitEnd()
			if len(evs) < len(tc.wantLast) {
				t.Fatalf("events = %q", evs)
			}
			tail := evs[len(evs)-len(tc.wantLast):]
			for i, want := range tc.wantLast {
				if !strings.Contains(tail[i], want) {
					t.Errorf("event %d = %q, want it to contain %q (all: %q)", i, tail[i], want, evs)
				}
			}
			rg.outcomes(tc.status, tc.errType)
			if got := rg.counter(rg.p.m.tokens); got != tc.wantToken {
				t.Errorf("tokens_total = %v, want %v", got, tc.wantToken)
			}
		})
	}
}

func TestProxyErrorsBeforeStream(t *testing.T) {
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL, _ := url.Parse(closed.URL)
	closed.Close() // its port now refuses connections

	tests := []struct {
		name       string
		upstream   http.HandlerFunc // nil: use closedURL
		body       string
		wantStatus int
		wantCode   string
		status     string
		errType    string
		details    func(map[string]any) error
	}{
		{
			name: "connection refused", wantStatus: http.StatusBadGateway, wantCode: CodeWorkerUnreachable,
			status: StatusError, errType: ErrorTypeUnreachable,
		},
		{
			name: "worker validation error keeps its status and body",
			upstream: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusBadRequest)
				io.WriteString(w, `{"errors":[{"field":"max_tokens","constraint":"range(1..=2048)","message":"max_tokens must be at most 2048 (got 5000)"}]}`)
			},
			wantStatus: http.StatusBadRequest, wantCode: api.CodeValidation, status: StatusRejected,
			details: func(d map[string]any) error {
				wb, _ := d["worker_body"].(map[string]any)
				if d["worker_status"] != float64(400) || wb["errors"] == nil {
					return fmt.Errorf("details = %v", d)
				}
				return nil
			},
		},
		{
			name: "worker 500 is a bad gateway",
			upstream: func(w http.ResponseWriter, r *http.Request) {
				http.Error(w, "kaput", http.StatusInternalServerError)
			},
			wantStatus: http.StatusBadGateway, wantCode: api.CodeUpstream, status: StatusError, errType: ErrorTypeWorker,
			details: func(d map[string]any) error {
				if d["worker_status"] != float64(500) || d["worker_body"] != "kaput" {
					return fmt.Errorf("details = %v", d)
				}
				return nil
			},
		},
		{
			name: "worker busy",
			upstream: func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(http.StatusServiceUnavailable)
			},
			wantStatus: http.StatusServiceUnavailable, wantCode: api.CodeUnavailable, status: StatusError, errType: ErrorTypeWorker,
		},
		{
			name: "not an event stream",
			upstream: func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				io.WriteString(w, `{"ok":true}`)
			},
			wantStatus: http.StatusBadGateway, wantCode: CodeWorkerBadResponse, status: StatusError, errType: ErrorTypeStream,
		},
		{
			name: "no headers before the idle timeout",
			upstream: func(w http.ResponseWriter, r *http.Request) {
				io.Copy(io.Discard, r.Body) // net/http watches for the peer leaving only after the body is read
				<-r.Context().Done()
			},
			wantStatus: http.StatusGatewayTimeout, wantCode: CodeWorkerTimeout, status: StatusError, errType: ErrorTypeTimeout,
		},
		{
			name:       "body over the cap",
			upstream:   func(w http.ResponseWriter, r *http.Request) { t.Error("an oversized body reached the worker") },
			body:       `{"prompt":"` + strings.Repeat("x", 2048) + `"}`,
			wantStatus: http.StatusRequestEntityTooLarge, wantCode: api.CodePayloadTooLarge, status: StatusRejected,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			opts := Options{IdleTimeout: 300 * time.Millisecond, MaxBodyBytes: 1024}
			var rg *rig
			if tc.upstream == nil {
				rg = newRigURL(t, closedURL, opts)
			} else {
				rg = newRig(t, tc.upstream, opts)
			}
			b := tc.body
			if b == "" {
				b = body
			}
			resp := rg.post(t.Context(), b)
			rg.waitEnd()
			var env struct {
				Error struct {
					Code    string         `json:"code"`
					Message string         `json:"message"`
					Details map[string]any `json:"details"`
				} `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
				t.Fatalf("body is not the JSON envelope: %v", err)
			}
			if resp.StatusCode != tc.wantStatus || env.Error.Code != tc.wantCode || env.Error.Message == "" {
				t.Errorf("got %d %q %q, want %d %q", resp.StatusCode, env.Error.Code, env.Error.Message, tc.wantStatus, tc.wantCode)
			}
			if tc.details != nil {
				if err := tc.details(env.Error.Details); err != nil {
					t.Error(err)
				}
			}
			rg.outcomes(tc.status, tc.errType)
		})
	}
}

// Every family lints clean, and with native histograms on, a text scrape
// (what promtool and older Prometheus servers read) still has classic
// buckets and passes promtool check metrics.
func TestProxyMetricsLintAndClassicScrape(t *testing.T) {
	rg := newRig(t, &worker{tokens: 3, decodeMs: 30}, Options{})
	readAll(t, rg.post(t.Context(), body).Body)
	rg.waitEnd()

	problems, err := testutil.GatherAndLint(rg.reg)
	if err != nil {
		t.Fatal(err)
	}
	for _, pr := range problems {
		t.Errorf("lint: %s: %s", pr.Metric, pr.Text)
	}
	for _, c := range []prometheus.Collector{rg.p.m.duration, rg.p.m.ttft, rg.p.m.tps, rg.p.m.tokens, rg.p.m.requests, rg.p.m.errors, rg.p.m.inFlight} {
		if problems, err := testutil.CollectAndLint(c); err != nil || len(problems) > 0 {
			t.Errorf("CollectAndLint: %v %v", problems, err)
		}
	}

	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodGet, "/metrics", nil)
	req.Header.Set("Accept", "text/plain;version=0.0.4")
	promhttp.HandlerFor(rg.reg, promhttp.HandlerOpts{}).ServeHTTP(rec, req)
	text := rec.Body.String()
	for _, want := range []string{
		`rbee_hive_inference_duration_seconds_bucket{backend="simworker",model="tiny",le="0.05"}`,
		`rbee_hive_inference_time_to_first_token_seconds_bucket{backend="simworker",model="tiny",le="+Inf"} 1`,
		`rbee_hive_inference_requests_total{backend="simworker",model="tiny",status="ok"} 1`,
		`rbee_hive_inference_errors_total{backend="simworker",model="tiny",type="timeout"} 0`,
	} {
		if !strings.Contains(text, want) {
			t.Errorf("text scrape lacks %s", want)
		}
	}
	promtool := testkit.RequireCommand(t, "promtool")
	cmd := exec.Command(promtool, "check", "metrics")
	cmd.Stdin = strings.NewReader(text)
	if out, err := cmd.CombinedOutput(); err != nil || len(bytes.TrimSpace(out)) > 0 {
		t.Errorf("promtool check metrics: %v\n%s", err, out)
	}
}

func TestNewRejectsDuplicateRegistration(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(reg, Options{}); err != nil {
		t.Fatal(err)
	}
	if _, err := New(reg, Options{}); err == nil {
		t.Error("a second proxy on the same registry must fail, not panic or share")
	}
	if _, err := New(nil, Options{}); err == nil {
		t.Error("nil registerer accepted")
	}
}

// The per-write deadline must not outlive the stream: a keep-alive
// connection's next request, long after, still gets its answer (net/http
// clears the deadline after each request; this pins that down).
func TestProxyWriteDeadlineDoesNotLeak(t *testing.T) {
	rg := newRig(t, &worker{tokens: 2}, Options{WriteTimeout: 200 * time.Millisecond})
	c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1}}
	defer c.CloseIdleConnections()
	for i := range 2 {
		if i == 1 {
			time.Sleep(500 * time.Millisecond)
		}
		resp, err := c.Post(rg.hive.URL+"/v1/workers/w-1/inference", "application/json", strings.NewReader(body))
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		evs := readAll(t, resp.Body)
		resp.Body.Close()
		rg.waitEnd()
		if len(evs) == 0 || evs[len(evs)-1] != "[DONE]" {
			t.Fatalf("request %d: events %q", i, evs)
		}
	}
}

// The model label is the spawn's model_ref: however many distinct refs come
// through, the series stay bounded.
func TestModelLabelsBounded(t *testing.T) {
	p, err := New(prometheus.NewRegistry(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 * maxLabelSets {
		req := httptest.NewRequest(http.MethodPost, "/v1/workers/w-1/inference", strings.NewReader(body))
		// A nil upstream fails at once, and is still recorded.
		p.Serve(httptest.NewRecorder(), req, nil, Labels{Backend: "sim", Model: fmt.Sprintf("file:/m/%d.gguf", i)}, Hooks{})
	}
	models := map[string]bool{}
	for _, ch := range []prometheus.Collector{p.m.requests, p.m.duration} {
		c := make(chan prometheus.Metric, 1<<12)
		ch.Collect(c)
		close(c)
		for m := range c {
			var d dto.Metric
			if err := m.Write(&d); err != nil {
				t.Fatal(err)
			}
			for _, lp := range d.GetLabel() {
				if lp.GetName() == "model" {
					models[lp.GetValue()] = true
				}
			}
		}
	}
	if len(models) != maxLabelSets+1 || !models[OtherModel] {
		t.Fatalf("%d model label values (other: %v), want %d plus %q", len(models), models[OtherModel], maxLabelSets, OtherModel)
	}
	if got := testutil.ToFloat64(p.m.requests.WithLabelValues("sim", OtherModel, StatusError)); got != 2*maxLabelSets {
		t.Errorf("requests under %q = %v, want %d", OtherModel, got, 2*maxLabelSets)
	}
}

// Data lines with no blank line between them must not grow the event being
// parsed without bound; the next events still count.
func TestStreamEventDataBounded(t *testing.T) {
	st := &stream{ttft: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "x"})}
	now := time.Now()
	line := []byte("data: " + strings.Repeat("x", 1000) + "\n")
	for range 4096 { // 4 MB of one event
		st.feed(line, true, now, now)
		if len(st.data) > maxLine || cap(st.data) > 2*maxLine {
			t.Fatalf("event buffer grew to %d (cap %d), want at most %d", len(st.data), cap(st.data), maxLine)
		}
	}
	for _, l := range []string{"\n", `data: {"type":"token","t":"a","i":0}` + "\n", "\n", "data: [DONE]\n", "\n"} {
		st.feed([]byte(l), true, now, now)
	}
	if st.tokens != 1 || !st.done {
		t.Fatalf("after the oversized event: tokens %d done %v, want 1 true", st.tokens, st.done)
	}
}

// Inference never goes through an HTTP proxy from the environment.
func TestDefaultTransportIgnoresEnvProxy(t *testing.T) {
	p, err := New(prometheus.NewRegistry(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	tr, ok := p.client.Transport.(*http.Transport)
	if !ok || tr.Proxy != nil {
		t.Fatalf("default transport %T uses a proxy func", p.client.Transport)
	}
}
