package router

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func newTestRouter(t testing.TB, h Hive, models ...Model) (*Router, *httptest.Server) {
	t.Helper()
	for i := range models {
		if models[i].Queue == 0 {
			models[i].Queue = 64
		}
		if models[i].LoadTimeout == 0 {
			models[i].LoadTimeout = time.Minute
		}
	}
	r, err := New(h, &HTTPForwarder{}, models, Options{Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.Close)
	srv := httptest.NewServer(r.Handler())
	t.Cleanup(srv.Close)
	return r, srv
}

type answer struct {
	status int
	header http.Header
	body   string
}

func post(t testing.TB, url, body string) answer {
	t.Helper()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, string(b)}
}

func chatBody(model string, tokens int, stream bool) string {
	return fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hello there"}],"max_tokens":%d,"stream":%v}`, model, tokens, stream)
}

// openAIError decodes OpenAI's error shape, failing if the body is not it.
func openAIError(t testing.TB, a answer) (typ, code string) {
	t.Helper()
	var e struct {
		Error *struct {
			Message string `json:"message"`
			Type    string `json:"type"`
			Code    string `json:"code"`
		} `json:"error"`
	}
	if err := json.Unmarshal([]byte(a.body), &e); err != nil || e.Error == nil || e.Error.Message == "" {
		t.Fatalf("not an OpenAI error (status %d): %s", a.status, a.body)
	}
	return e.Error.Type, e.Error.Code
}

// waitFor polls cond until it holds; the bound only keeps a broken build
// from hanging, it asserts nothing about speed.
func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(30 * time.Second); time.Now().Before(end); time.Sleep(5 * time.Millisecond) {
		if cond() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

func TestUnloadedModelLoadsAndAnswers(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, loadTime: 50 * time.Millisecond}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true})
	if ids := h.ids("a"); len(ids) != 0 {
		t.Fatalf("workers before any request: %v", ids)
	}
	for _, path := range []string{PathChatCompletions, PathCompletions} {
		body := chatBody("a", 3, false)
		if path == PathCompletions {
			body = `{"model":"a","prompt":"one two","max_tokens":3}`
		}
		a := post(t, srv.URL+path, body)
		if a.status != 200 || !strings.Contains(a.body, `"completion_tokens":3`) {
			t.Fatalf("%s: %d %s", path, a.status, a.body)
		}
	}
	if n := h.spawnCount("a"); n != 1 {
		t.Errorf("spawns = %d, want 1 (the second request reuses the worker)", n)
	}
	if v := testutil.ToFloat64(r.m.loads.WithLabelValues("a", ReasonRequest)); v != 1 {
		t.Errorf("loads_total{request} = %v", v)
	}
	if n := testutil.CollectAndCount(r.m.coldStart); n != 1 {
		t.Errorf("cold start series = %d", n)
	}
	// A streamed request through the router ends with [DONE].
	a := post(t, srv.URL+PathChatCompletions, chatBody("a", 4, true))
	if a.status != 200 || !strings.HasSuffix(a.body, "data: [DONE]\n\n") || strings.Count(a.body, `"content":`) < 4 {
		t.Errorf("stream: %d %q", a.status, a.body)
	}
}

func TestConcurrentFirstRequestsLoadOnce(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, loadTime: 300 * time.Millisecond, slots: 2}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true})
	var wg sync.WaitGroup
	answers := make([]answer, 10)
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = post(t, srv.URL+PathChatCompletions, chatBody("a", 2, i%2 == 0))
		}()
	}
	wg.Wait()
	for i, a := range answers {
		if a.status != 200 {
			t.Errorf("request %d: %d %s", i, a.status, a.body)
		}
	}
	if n := h.spawnCount("a"); n != 1 {
		t.Errorf("10 concurrent first requests spawned %d workers, want 1", n)
	}
	if v := testutil.ToFloat64(r.m.loads.WithLabelValues("a", ReasonRequest)); v != 1 {
		t.Errorf("loads_total = %v, want 1", v)
	}
}

func TestEvictsIdleNeverBusy(t *testing.T) {
	// The fake GPU holds one of the two models at a time.
	h := newFakeHive(t, 1000, map[string]simModel{
		"a": {memMiB: 600, tps: 200},
		"b": {memMiB: 600, tps: 200},
	})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true}, Model{Name: "b", Autoload: true})
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 {
		t.Fatalf("a: %d %s", a.status, a.body)
	}
	idleA := h.ids("a")
	// b does not fit: the idle a is stopped, b loads and answers.
	if a := post(t, srv.URL+PathChatCompletions, chatBody("b", 1, false)); a.status != 200 {
		t.Fatalf("b: %d %s", a.status, a.body)
	}
	if ids := h.ids("a"); len(ids) != 0 {
		t.Errorf("idle a (%v) not evicted: %v", idleA, ids)
	}
	if v := testutil.ToFloat64(r.m.evictions.WithLabelValues("a", "vram")); v != 1 {
		t.Errorf("evictions{a,vram} = %v", v)
	}
	if v := testutil.ToFloat64(r.m.unloads.WithLabelValues("a", ReasonEvicted)); v != 1 {
		t.Errorf("unloads{a,evicted} = %v", v)
	}

	// Now b is busy with a long stream: a request for a must not evict it.
	resp, err := http.Post(srv.URL+PathChatCompletions, "application/json", strings.NewReader(chatBody("b", 100, true)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	if _, err := rd.ReadString('\n'); err != nil { // the stream is under way
		t.Fatal(err)
	}
	busyB := h.ids("b")
	a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false))
	if a.status != http.StatusServiceUnavailable || a.header.Get("Retry-After") == "" {
		t.Fatalf("a while b busy: %d Retry-After=%q %s", a.status, a.header.Get("Retry-After"), a.body)
	}
	if _, code := openAIError(t, a); code != "no_room" || !strings.Contains(a.body, "vram") {
		t.Errorf("code %q, body %s", code, a.body)
	}
	if v := testutil.ToFloat64(r.m.rejected.WithLabelValues("a", "no_room")); v != 1 {
		t.Errorf("rejected{a,no_room} = %v, want 1", v)
	}
	if ids := h.ids("b"); len(ids) != 1 || ids[0] != busyB[0] {
		t.Errorf("busy b stopped: before %v after %v", busyB, ids)
	}
	rest, _ := io.ReadAll(rd)
	if !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Errorf("busy b's stream was cut: %q", rest)
	}
}

func TestPinnedAndManualAreNotEvicted(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"p": {memMiB: 600}, "m": {memMiB: 600}, "x": {memMiB: 600}})
	_, srv := newTestRouter(t, h, Model{Name: "p", Autoload: true, Pinned: true}, Model{Name: "m", Autoload: true}, Model{Name: "x", Autoload: true})
	if a := post(t, srv.URL+PathChatCompletions, chatBody("p", 1, false)); a.status != 200 {
		t.Fatalf("p: %d %s", a.status, a.body)
	}
	a := post(t, srv.URL+PathChatCompletions, chatBody("x", 1, false))
	if _, code := openAIError(t, a); a.status != 503 || code != "no_room" || len(h.ids("p")) != 1 {
		t.Fatalf("pinned p evicted or wrong answer: %d %s, p workers %v", a.status, a.body, h.ids("p"))
	}
	// Unload p; load m by hand: a manual load is kept like a pinned one.
	if a := post(t, srv.URL+PathModels+"/p/unload", ""); a.status != 200 || !strings.Contains(a.body, `"stopped":1`) || len(h.ids("p")) != 0 {
		t.Fatalf("unload p: %d %s", a.status, a.body)
	}
	if a := post(t, srv.URL+PathModels+"/m/load", ""); a.status != 200 || !strings.Contains(a.body, `"worker_id"`) || len(h.ids("m")) != 1 {
		t.Fatalf("load m: %d %s", a.status, a.body)
	}
	if a := post(t, srv.URL+PathChatCompletions, chatBody("x", 1, false)); a.status != 503 || len(h.ids("m")) != 1 {
		t.Fatalf("manually loaded m evicted: %d %s", a.status, a.body)
	}
}

func TestTTLUnload(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100}, "keep": {memMiB: 100}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, TTL: 200 * time.Millisecond}, Model{Name: "keep", Autoload: true})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { r.Run(ctx, 20*time.Millisecond); close(done) }()
	defer func() { cancel(); <-done }()
	for _, m := range []string{"a", "keep"} {
		if a := post(t, srv.URL+PathChatCompletions, chatBody(m, 1, false)); a.status != 200 {
			t.Fatalf("%s: %d %s", m, a.status, a.body)
		}
	}
	waitFor(t, "a's idle worker to be stopped for its ttl", func() bool {
		return testutil.ToFloat64(r.m.unloads.WithLabelValues("a", ReasonTTL)) == 1
	})
	if ids := h.ids("a"); len(ids) != 0 {
		t.Errorf("a's workers after the ttl: %v", ids)
	}
	if len(h.ids("keep")) != 1 {
		t.Error("a model without ttl was unloaded")
	}
	// The next request loads it again.
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 || h.spawnCount("a") != 2 {
		t.Fatalf("after ttl: %d %s, spawns %d", a.status, a.body, h.spawnCount("a"))
	}
}

func TestQueueOverflow(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, loadTime: 1500 * time.Millisecond}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, Queue: 2})
	var wg sync.WaitGroup
	held := make([]answer, 2)
	for i := range held {
		wg.Add(1)
		go func() { defer wg.Done(); held[i] = post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)) }()
	}
	waitFor(t, "two queued requests", func() bool { return testutil.ToFloat64(r.m.queueLen.WithLabelValues("a")) == 2 })
	a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false))
	if a.status != http.StatusServiceUnavailable || a.header.Get("Retry-After") != "1" {
		t.Fatalf("third request: %d Retry-After=%q %s", a.status, a.header.Get("Retry-After"), a.body)
	}
	if typ, code := openAIError(t, a); code != "queue_full" || typ != "server_error" {
		t.Errorf("type %q code %q", typ, code)
	}
	wg.Wait()
	for i, a := range held {
		if a.status != 200 {
			t.Errorf("queued request %d: %d %s", i, a.status, a.body)
		}
	}
	if v := testutil.ToFloat64(r.m.rejected.WithLabelValues("a", "queue_full")); v != 1 {
		t.Errorf("rejected{queue_full} = %v", v)
	}
}

func TestLoadTimeoutAndAutoloadOff(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"slow": {memMiB: 100, loadTime: time.Minute}, "off": {memMiB: 100}})
	_, srv := newTestRouter(t, h, Model{Name: "slow", Autoload: true, LoadTimeout: 300 * time.Millisecond}, Model{Name: "off"})
	a := post(t, srv.URL+PathChatCompletions, chatBody("slow", 1, false))
	if _, code := openAIError(t, a); a.status != 503 || code != "load_timeout" || a.header.Get("Retry-After") == "" {
		t.Fatalf("slow: %d %s", a.status, a.body)
	}
	waitFor(t, "the abandoned load to be killed", func() bool { return len(h.ids("slow")) == 0 })

	a = post(t, srv.URL+PathChatCompletions, chatBody("off", 1, false))
	if _, code := openAIError(t, a); a.status != 503 || code != "model_not_loaded" || h.spawnCount("off") != 0 {
		t.Fatalf("autoload off: %d %s", a.status, a.body)
	}
	if a := post(t, srv.URL+PathModels+"/off/load", ""); a.status != 200 {
		t.Fatalf("load: %d %s", a.status, a.body)
	}
	if a := post(t, srv.URL+PathChatCompletions, chatBody("off", 1, false)); a.status != 200 {
		t.Fatalf("after load: %d %s", a.status, a.body)
	}
}

func TestRequestErrors(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100}})
	_, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true})
	tests := []struct {
		name, path, body string
		status           int
		typ, code        string
	}{
		{"unknown model", PathChatCompletions, chatBody("gpt-4", 1, false), 404, "invalid_request_error", "model_not_found"},
		{"unknown model (completions)", PathCompletions, `{"model":"nope","prompt":"x"}`, 404, "invalid_request_error", "model_not_found"},
		{"no model", PathChatCompletions, `{"messages":[]}`, 400, "invalid_request_error", "model_missing"},
		{"not json", PathChatCompletions, `{"model":`, 400, "invalid_request_error", "invalid_json"},
		{"too large", PathChatCompletions, `{"model":"a","pad":"` + strings.Repeat("x", DefaultMaxBodyBytes) + `"}`, 413, "invalid_request_error", "request_too_large"},
		{"load unknown", PathModels + "/nope/load", "", 404, "invalid_request_error", "model_not_found"},
		{"unload unknown", PathModels + "/nope/unload", "", 404, "invalid_request_error", "model_not_found"},
		{"no such route", "/openai/v1/embeddings", "{}", 404, "invalid_request_error", "not_found"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a := post(t, srv.URL+tc.path, tc.body)
			typ, code := openAIError(t, a)
			if a.status != tc.status || typ != tc.typ || code != tc.code {
				t.Errorf("got %d %s/%s, want %d %s/%s: %s", a.status, typ, code, tc.status, tc.typ, tc.code, a.body)
			}
		})
	}
	if h.spawnCount("a") != 0 {
		t.Error("a bad request loaded a model")
	}
	resp, err := http.Get(srv.URL + PathModels)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var list struct {
		Object string `json:"object"`
		Data   []struct {
			ID, Object, OwnedBy string
		} `json:"data"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&list); err != nil || list.Object != "list" || len(list.Data) != 1 || list.Data[0].ID != "a" || list.Data[0].Object != "model" {
		t.Errorf("models list: %v %+v", err, list)
	}
}

func TestWorkerCrashMidStream(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, tps: 50}})
	_, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true})
	first, rest := crashMidStream(t, srv.URL, h)
	if !strings.Contains(string(rest), `"code":"worker_stream_broken"`) || strings.Contains(string(rest), "[DONE]") {
		t.Fatalf("client did not get an error event: %q", rest)
	}
	a := post(t, srv.URL+PathChatCompletions, chatBody("a", 2, false))
	if a.status != 200 {
		t.Fatalf("after crash: %d %s", a.status, a.body)
	}
	if ids := h.ids("a"); len(ids) != 1 || ids[0] == first[0] || h.spawnCount("a") != 2 {
		t.Errorf("not served by a new worker: before %v after %v spawns %d", first, ids, h.spawnCount("a"))
	}
}

// crashMidStream starts a long chat stream for model "a", reads its first
// line, kills the worker serving it and returns that worker (first of
// h.ids("a")) and the rest of the stream.
func crashMidStream(t *testing.T, url string, h *fakeHive) (first []string, rest []byte) {
	t.Helper()
	resp, err := http.Post(url+PathChatCompletions, "application/json", strings.NewReader(chatBody("a", 1000, true)))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	if _, err := rd.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	first = h.ids("a")
	h.kill(first[0])
	rest, _ = io.ReadAll(rd)
	return first, rest
}

// TestPicksLeastLoaded: with two ready workers, a new request goes to the
// one with fewer requests in flight, and a full worker gets none.
func TestPicksLeastLoaded(t *testing.T) {
	r, err := New(staticHive{}, &HTTPForwarder{}, []Model{{Name: "a", Queue: 1}}, Options{})
	if err != nil {
		t.Fatal(err)
	}
	ws := []Worker{
		{ID: "busy", State: StateReady, Slots: 4, InFlight: 3, URL: mustURL("http://127.0.0.1:1")},
		{ID: "loading", State: StateLoading, Slots: 4, URL: mustURL("http://127.0.0.1:2")},
		{ID: "light", State: StateReady, Slots: 4, InFlight: 1, URL: mustURL("http://127.0.0.1:3")},
		{ID: "full", State: StateReady, Slots: 1, URL: mustURL("http://127.0.0.1:4")},
	}
	r.track("full", "a").inFlight = 1 // ours, though the hive counts none
	tests := []struct {
		ours map[string]int
		want string
	}{
		{nil, "light"},
		{map[string]int{"light": 3}, "busy"},
		{map[string]int{"light": 4, "busy": 4}, ""},
	}
	for _, tc := range tests {
		for id, n := range tc.ours {
			r.track(id, "a").inFlight = n
		}
		w, ok := r.pick(ws)
		if got := map[bool]string{true: w.ID}[ok]; got != tc.want {
			t.Errorf("ours %v: picked %q, want %q", tc.ours, got, tc.want)
		}
	}
}

type staticHive struct{}

func (staticHive) Workers(context.Context, string) ([]Worker, error) { return nil, nil }
func (staticHive) Spawn(context.Context, string) (Worker, error) {
	return Worker{}, fmt.Errorf("static")
}
func (staticHive) Stop(context.Context, string) error { return nil }

func mustURL(s string) *url.URL {
	u, err := url.Parse(s)
	if err != nil {
		panic(err)
	}
	return u
}

// TestWaitsForWorkerLoadingUnderHive: a worker the hive is loading itself
// (a restart, a spawn through its own API) is waited for, not duplicated.
func TestWaitsForWorkerLoadingUnderHive(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, loadTime: 400 * time.Millisecond}})
	_, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, LoadTimeout: 10 * time.Second})
	spawned := make(chan error, 1)
	go func() { _, err := h.Spawn(context.Background(), "a"); spawned <- err }()
	waitFor(t, "the hive's own worker to be loading", func() bool { return len(h.ids("a")) == 1 })
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 {
		t.Fatalf("%d %s", a.status, a.body)
	}
	if err := <-spawned; err != nil {
		t.Fatal(err)
	}
	if n := h.spawnCount("a"); n != 1 {
		t.Errorf("spawns = %d, want 1", n)
	}
}

// TestScaleOutAndTTLSparesBusy: with one slot per worker and max_workers 2,
// two concurrent streams get a worker each and a third waits for a free
// slot; the ttl stops neither worker while it streams, both once idle.
func TestScaleOutAndTTLSparesBusy(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, tps: 40, slots: 1}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, MaxWorkers: 2, TTL: 50 * time.Millisecond})
	type stream struct {
		rd   *bufio.Reader
		body io.Closer
	}
	open := func() stream {
		resp, err := http.Post(srv.URL+PathChatCompletions, "application/json", strings.NewReader(chatBody("a", 20, true)))
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 {
			t.Fatalf("status %d", resp.StatusCode)
		}
		rd := bufio.NewReader(resp.Body)
		if _, err := rd.ReadString('\n'); err != nil {
			t.Fatal(err)
		}
		return stream{rd, resp.Body}
	}
	s1, s2 := open(), open()
	if n := h.spawnCount("a"); n != 2 {
		t.Fatalf("two concurrent streams on one-slot workers: %d spawns, want 2", n)
	}
	third := make(chan answer, 1)
	go func() { third <- post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)) }()
	waitFor(t, "the third request to queue", func() bool { return testutil.ToFloat64(r.m.queueLen.WithLabelValues("a")) == 1 })

	time.Sleep(100 * time.Millisecond) // both workers' last use is now older than the ttl
	r.expire(context.Background())
	if v := testutil.ToFloat64(r.m.unloads.WithLabelValues("a", ReasonTTL)); v != 0 || len(h.ids("a")) != 2 {
		t.Fatalf("ttl stopped a busy worker: unloads %v, workers %v", v, h.ids("a"))
	}
	for _, s := range []stream{s1, s2} {
		rest, _ := io.ReadAll(s.rd)
		s.body.Close()
		if !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
			t.Errorf("stream cut: %q", rest)
		}
	}
	if a := <-third; a.status != 200 {
		t.Fatalf("third: %d %s", a.status, a.body)
	}
	if n := h.spawnCount("a"); n != 2 {
		t.Errorf("max_workers 2 exceeded: %d spawns", n)
	}
	time.Sleep(100 * time.Millisecond)
	r.expire(context.Background())
	if v := testutil.ToFloat64(r.m.unloads.WithLabelValues("a", ReasonTTL)); v != 2 || len(h.ids("a")) != 0 {
		t.Errorf("idle workers past ttl: unloads %v, workers %v", v, h.ids("a"))
	}
}

// TestQueuedClientLeaves: a request that gives up while queued frees its
// place, and the load it started still serves the next one.
func TestQueuedClientLeaves(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, loadTime: 300 * time.Millisecond}})
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, Queue: 1})
	ctx, cancel := context.WithCancel(context.Background())
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, srv.URL+PathChatCompletions, strings.NewReader(chatBody("a", 1, false)))
	gone := make(chan error, 1)
	go func() {
		resp, err := http.DefaultClient.Do(req)
		if err == nil {
			resp.Body.Close()
		}
		gone <- err
	}()
	waitFor(t, "the request to queue", func() bool { return testutil.ToFloat64(r.m.queueLen.WithLabelValues("a")) == 1 })
	cancel()
	if err := <-gone; err == nil {
		t.Fatal("cancelled request succeeded")
	}
	waitFor(t, "its place to be freed", func() bool { return testutil.ToFloat64(r.m.queueLen.WithLabelValues("a")) == 0 })
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 {
		t.Fatalf("%d %s", a.status, a.body)
	}
	if n := h.spawnCount("a"); n != 1 {
		t.Errorf("spawns = %d, want 1: the load outlives the request that started it", n)
	}
}

// slowStopHive holds every Stop until release is closed.
type slowStopHive struct {
	*fakeHive
	release chan struct{}
}

func (s slowStopHive) Stop(ctx context.Context, id string) error {
	<-s.release
	return s.fakeHive.Stop(ctx, id)
}

// TestLoadWaitsForWorkerBeingStopped: a load that finds no room while a
// worker is on its way out (here its ttl) waits for it instead of
// answering 503 no_room.
func TestLoadWaitsForWorkerBeingStopped(t *testing.T) {
	fh := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 600}, "b": {memMiB: 600}})
	h := slowStopHive{fh, make(chan struct{})}
	r, srv := newTestRouter(t, h, Model{Name: "a", Autoload: true, TTL: 10 * time.Millisecond}, Model{Name: "b", Autoload: true})
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 1, false)); a.status != 200 {
		t.Fatalf("a: %d %s", a.status, a.body)
	}
	time.Sleep(20 * time.Millisecond) // a's last use is older than its ttl
	expired := make(chan struct{})
	go func() { r.expire(context.Background()); close(expired) }()
	waitFor(t, "a to be marked for its ttl", r.stopping)
	got := make(chan answer, 1)
	go func() { got <- post(t, srv.URL+PathChatCompletions, chatBody("b", 1, false)) }()
	waitFor(t, "b's request to wait or be answered", func() bool {
		return len(got) > 0 || testutil.ToFloat64(r.m.queueLen.WithLabelValues("b")) == 1
	})
	close(h.release)
	<-expired
	if a := <-got; a.status != 200 {
		t.Fatalf("b while a was stopping: %d %s", a.status, a.body)
	}
	if v := testutil.ToFloat64(r.m.evictions.WithLabelValues("a", "vram")); v != 0 {
		t.Errorf("evictions{a} = %v: a was already stopping", v)
	}
}
