package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/admission/estimate"
	"github.com/rbee/rbee-hive/internal/ggufwrite"
)

// servedBackend is rbee-simworker as an OpenAI engine on the fake GPU.
const servedBackend = `
[backends.simgpu]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}", "--model-ref", "{model_ref}"]
health = "notify"
api = "openai"
cuda = true
load_timeout = "30s"
memory_limit = "256MiB"
%s
`

// servedBackendConf is servedBackend with env, plus models.file_roots
// covering the temp dir tinyModel writes to: file: refs must lie below a
// root.
func servedBackendConf(env string) string {
	return fmt.Sprintf(servedBackend, env) + "\n[models]\nfile_roots = [" + strconv.Quote(filepath.Clean(os.TempDir())) + "]\n"
}

// tinyModel writes a tiny llama GGUF (the simworker ignores its content;
// admission estimates its VRAM from it) and returns its path and estimate.
func tinyModel(t *testing.T, name string) (string, uint64) {
	t.Helper()
	kvs, tensors, err := ggufwrite.Llama{}.Model()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), name+".gguf")
	if err := ggufwrite.WriteFile(path, kvs, tensors); err != nil {
		t.Fatal(err)
	}
	est, err := estimate.EstimateWith(path, estimate.Options{ContextSize: 4096})
	if err != nil || est.VRAMBytes == 0 {
		t.Fatalf("estimate of %s: %+v %v", path, est, err)
	}
	return path, est.VRAMBytes
}

// openai sends a request to the OpenAI endpoint with the hive's token.
func (d *daemon) openai(method, path, body string) (*http.Response, error) {
	req, err := http.NewRequest(method, d.url+path, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Authorization", "Bearer "+d.token())
	req.Header.Set("Content-Type", "application/json")
	return http.DefaultClient.Do(req)
}

type answer struct {
	status int
	header http.Header
	body   string
}

func (d *daemon) chat(model string, tokens int, stream bool) answer {
	d.t.Helper()
	resp, err := d.openai("POST", "/openai/v1/chat/completions",
		fmt.Sprintf(`{"model":%q,"messages":[{"role":"user","content":"hi"}],"max_tokens":%d,"stream":%v}`, model, tokens, stream))
	if err != nil {
		d.t.Error(err)
		return answer{}
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return answer{resp.StatusCode, resp.Header, string(b)}
}

// metric is the value of one exact series on /metrics (-1: absent).
func (d *daemon) metric(series string) float64 {
	d.t.Helper()
	resp, err := http.Get(d.url + "/metrics")
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return -1
}

type servedWorker struct {
	ID     string `json:"id"`
	Served string `json:"served"`
	State  string `json:"state"`
	PID    *int   `json:"pid"`
}

// servedWorkers lists the hive's workers of a served model.
func (d *daemon) servedWorkers(served string) []servedWorker {
	d.t.Helper()
	code, body := d.request("GET", "/v1/workers/list", "")
	var list struct{ Workers []servedWorker }
	if err := json.Unmarshal(body, &list); code != 200 || err != nil {
		d.t.Fatalf("list: %d %v %s", code, err, body)
	}
	var out []servedWorker
	for _, w := range list.Workers {
		if w.Served == served && w.State != "stopped" && w.State != "failed" {
			out = append(out, w)
		}
	}
	return out
}

func waitUntil(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

var openAIError = regexp.MustCompile(`^\{"error":\{"message":"[^"]+","type":"[a-z_]+","param":null,"code":"([a-z_]+)"\}\}\n$`)

// TestOpenAIEndpoint drives the hive's OpenAI endpoint with real
// simworkers on a fake GPU sized for one served model at a time: on-demand
// load (one for ten concurrent requests), streaming, the served name on the
// worker and in the metrics, no eviction of a busy worker, eviction of an
// idle one, unknown models, a crash mid-stream.
func TestOpenAIEndpoint(t *testing.T) {
	pathA, estA := tinyModel(t, "alpha")
	pathB, _ := tinyModel(t, "beta")
	margin := uint64(16 << 20)
	// One model (estimate + margin) fits, two do not: the fake GPU reports
	// no per-process memory, so a loaded worker's claim stays counted for
	// admission's settle time (30 s), longer than this test needs it.
	total := estA + margin + estA/2
	d := startDaemon(t, fmt.Sprintf(`
[resources]
vram_margin = "16MiB"

[gpu]
driver = "fake"

[[gpu.fake]]
name = "Fake GPU"
uuid = "GPU-0a0a0a0a-0000-0000-0000-000000000000"
memory_total = "%dKiB"
`+servedBackendConf(`env = { RBEE_SIM_LOAD_TIME = "300ms", RBEE_SIM_TOKENS_PER_SECOND = "100" }`)+`
[served.alpha]
model = %q
backend = "simgpu"

[served.beta]
model = %q
backend = "simgpu"
`, total/1024, pathA, pathB))

	// Unknown model, unknown route: OpenAI's error shape.
	a := d.chat("gpt-4", 1, false)
	if m := openAIError.FindStringSubmatch(a.body); a.status != 404 || m == nil || m[1] != "model_not_found" {
		t.Errorf("unknown model: %d %q", a.status, a.body)
	}
	if resp, err := d.openai("GET", "/openai/v1/nosuch", ""); err != nil || resp.StatusCode != 404 {
		t.Errorf("unknown route: %v %v", resp, err)
	} else {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if m := openAIError.FindStringSubmatch(string(b)); m == nil || m[1] != "not_found" {
			t.Errorf("unknown route body %q", b)
		}
	}
	if resp, err := http.Post(d.url+"/openai/v1/chat/completions", "application/json", strings.NewReader(`{"model":"alpha"}`)); err != nil || resp.StatusCode != 401 {
		t.Errorf("without a token: %v %v", resp, err)
	} else {
		resp.Body.Close()
	}

	// Ten concurrent first requests: one load, ten answers.
	var wg sync.WaitGroup
	answers := make([]answer, 10)
	for i := range answers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			answers[i] = d.chat("alpha", 3, i%2 == 0)
		}()
	}
	wg.Wait()
	for i, a := range answers {
		switch {
		case a.status != 200:
			t.Errorf("request %d: %d %s", i, a.status, a.body)
		case i%2 == 0 && !strings.HasSuffix(a.body, "data: [DONE]\n\n"):
			t.Errorf("stream %d does not end in [DONE]: %q", i, a.body)
		case i%2 == 1 && !strings.Contains(a.body, `"completion_tokens":3`):
			t.Errorf("answer %d: %s", i, a.body)
		}
	}
	if n := d.metric(`rbee_hive_openai_loads_total{model="alpha",reason="request"}`); n != 1 {
		t.Errorf("loads for 10 concurrent first requests: %v, want 1", n)
	}
	ws := d.servedWorkers("alpha")
	if len(ws) != 1 {
		t.Fatalf("workers of alpha: %+v", ws)
	}
	alpha := ws[0].ID
	code, body := d.request("GET", "/v1/workers/"+alpha, "")
	if code != 200 || !strings.Contains(string(body), `"served":"alpha"`) {
		t.Errorf("GET /v1/workers/%s lacks served: %d %s", alpha, code, body)
	}
	// The requests count as the worker's inference, labelled by the served model.
	if n := d.metric(`rbee_hive_inference_requests_total{backend="simgpu",model="alpha",status="ok"}`); n != 10 {
		t.Errorf("inference requests of alpha: %v, want 10", n)
	}
	if n := d.metric(`rbee_hive_openai_queue_wait_seconds_count{model="alpha"}`); n != 10 {
		t.Errorf("queue wait observations: %v, want 10", n)
	}
	if n := d.metric(`rbee_hive_openai_cold_start_seconds_count{model="alpha"}`); n != 1 {
		t.Errorf("cold starts: %v, want 1", n)
	}

	// A busy worker is never evicted: beta gets 503 no_room while alpha streams.
	resp, err := d.openai("POST", "/openai/v1/chat/completions", `{"model":"alpha","messages":[{"role":"user","content":"hi"}],"max_tokens":300,"stream":true}`)
	if err != nil {
		t.Fatal(err)
	}
	rd := bufio.NewReader(resp.Body)
	if _, err := rd.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	a = d.chat("beta", 2, false)
	if m := openAIError.FindStringSubmatch(a.body); a.status != 503 || m == nil || m[1] != "no_room" || a.header.Get("Retry-After") == "" {
		t.Errorf("beta while alpha is busy: %d %v %q", a.status, a.header, a.body)
	}
	rest, _ := io.ReadAll(rd)
	resp.Body.Close()
	if !strings.HasSuffix(string(rest), "data: [DONE]\n\n") {
		t.Errorf("alpha's stream was cut while beta asked for room: %q", rest)
	}

	// Idle now: beta evicts it.
	if a := d.chat("beta", 2, false); a.status != 200 {
		t.Fatalf("beta after alpha went idle: %d %s", a.status, a.body)
	}
	if ws := d.servedWorkers("alpha"); len(ws) != 0 {
		t.Errorf("alpha not evicted: %+v", ws)
	}
	for series, want := range map[string]float64{
		`rbee_hive_openai_evictions_total{model="alpha",reason="vram"}`:  1,
		`rbee_hive_openai_unloads_total{model="alpha",reason="evicted"}`: 1,
		`rbee_hive_openai_loads_total{model="beta",reason="request"}`:    1,
		`rbee_hive_openai_rejected_total{model="beta",reason="no_room"}`: 1,
	} {
		if got := d.metric(series); got != want {
			t.Errorf("%s = %v, want %v", series, got, want)
		}
	}

	// A crash mid-stream: an error event, and the next request is served.
	ws = d.servedWorkers("beta")
	if len(ws) != 1 || ws[0].PID == nil {
		t.Fatalf("beta workers: %+v", ws)
	}
	resp, err = d.openai("POST", "/openai/v1/chat/completions", `{"model":"beta","messages":[{"role":"user","content":"hi"}],"max_tokens":1000,"stream":true}`)
	if err != nil {
		t.Fatal(err)
	}
	rd = bufio.NewReader(resp.Body)
	if _, err := rd.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(*ws[0].PID, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	rest, _ = io.ReadAll(rd)
	resp.Body.Close()
	if !strings.Contains(string(rest), `"error":{`) || !strings.Contains(string(rest), `"type":"server_error"`) {
		t.Errorf("no error event after the worker died: %q", rest)
	}
	if a := d.chat("beta", 2, true); a.status != 200 || !strings.HasSuffix(a.body, "data: [DONE]\n\n") {
		t.Errorf("after the crash: %d %q", a.status, a.body)
	}

	// The models list shows what is loaded.
	resp, err = d.openai("GET", "/openai/v1/models", "")
	if err != nil {
		t.Fatal(err)
	}
	var list struct {
		Object string
		Data   []struct {
			ID    string
			Ready bool
		}
	}
	_ = json.NewDecoder(resp.Body).Decode(&list)
	resp.Body.Close()
	if list.Object != "list" || len(list.Data) != 2 || list.Data[0].ID != "alpha" || list.Data[0].Ready || !list.Data[1].Ready {
		t.Errorf("models: %+v", list)
	}
}

// TestOpenAIQueueAndTTL: a full queue answers 503 with Retry-After while
// the model loads; an idle worker is stopped after its ttl.
func TestOpenAIQueueAndTTL(t *testing.T) {
	path, _ := tinyModel(t, "gamma")
	d := startDaemon(t, fmt.Sprintf(`
[gpu]
driver = "fake"

[[gpu.fake]]
name = "Fake GPU"
uuid = "GPU-0b0b0b0b-0000-0000-0000-000000000000"
memory_total = "8GiB"
`+servedBackendConf(`env = { RBEE_SIM_LOAD_TIME = "2s" }`)+`
[served.gamma]
model = %q
backend = "simgpu"
queue = 1
ttl = "1s"
`, path))

	first := make(chan answer, 1)
	go func() { first <- d.chat("gamma", 2, false) }()
	waitUntil(t, 20*time.Second, "the first request to wait in the queue", func() bool {
		return d.metric(`rbee_hive_openai_queue_length{model="gamma"}`) == 1
	})
	a := d.chat("gamma", 2, false)
	if m := openAIError.FindStringSubmatch(a.body); a.status != 503 || m == nil || m[1] != "queue_full" || a.header.Get("Retry-After") != "1" {
		t.Errorf("over the queue: %d %v %q", a.status, a.header, a.body)
	}
	if a := <-first; a.status != 200 {
		t.Fatalf("queued request: %d %s", a.status, a.body)
	}
	if n := d.metric(`rbee_hive_openai_rejected_total{model="gamma",reason="queue_full"}`); n != 1 {
		t.Errorf("queue_full rejections: %v", n)
	}
	waitUntil(t, 30*time.Second, "the ttl unload", func() bool {
		return d.metric(`rbee_hive_openai_unloads_total{model="gamma",reason="ttl"}`) == 1
	})
	waitUntil(t, 30*time.Second, "the worker to be gone", func() bool { return len(d.servedWorkers("gamma")) == 0 })
	// And the next request loads it again.
	if a := d.chat("gamma", 1, false); a.status != 200 {
		t.Errorf("after the ttl unload: %d %s", a.status, a.body)
	}
	if n := d.metric(`rbee_hive_openai_loads_total{model="gamma",reason="request"}`); n != 2 {
		t.Errorf("loads: %v, want 2", n)
	}
}
