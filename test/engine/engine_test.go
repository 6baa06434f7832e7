package engine

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
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
	"github.com/rbee/rbee-hive/internal/testkit"
)

// Context and slots of the llama backend: 1024 tokens shared by 2 slots.
const (
	ctxSize  = 1024
	parallel = 2
	oomCtx   = 262144 // the oom backend's context: a 64 MiB KV cache, cleared (touched) at load
)

// backends is the shipped llama-server example from docs/engines.md, run
// with the test's binary, plus the same with a 262144-token context for the
// oom case.
func backends(t testing.TB, bin string) string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/engines.md")
	if err != nil {
		t.Fatal(err)
	}
	_, rest, ok := strings.Cut(string(doc), "```toml\n[backends.llama-server]\n")
	block, _, ok2 := strings.Cut(rest, "```")
	if !ok || !ok2 {
		t.Fatal("docs/engines.md has no [backends.llama-server] toml block")
	}
	block = "[backends.llama-server]\n" + strings.ReplaceAll(block, `"/usr/local/bin/llama-server"`, strconv.Quote(bin))
	// -lv 4: llama-server logs its model, KV and compute buffer sizes (the
	// estimate is compared with them) only above the default verbosity.
	block = strings.Replace(block, `"-t", "1"]`, `"-t", "1", "-lv", "4"]`, 1)
	for _, want := range []string{fmt.Sprintf(`"-c", "%d"`, ctxSize), fmt.Sprintf(`"--parallel", "%d"`, parallel), `api = "openai"`} {
		if !strings.Contains(block, want) {
			t.Fatalf("the docs/engines.md example lacks %s", want)
		}
	}
	big := strings.Replace(block, "[backends.llama-server]", "[backends.llama-big-context]", 1)
	big = strings.Replace(big, fmt.Sprintf(`"-c", "%d"`, ctxSize), fmt.Sprintf(`"-c", "%d"`, oomCtx), 1)
	big = strings.Replace(big, fmt.Sprintf("context_size = %d", ctxSize), fmt.Sprintf("context_size = %d", oomCtx), 1)
	return "\n" + block + "\n" + big
}

// writeModel writes the test's llama model: the reference's tiny shape
// scaled to 4 layers, embedding 512 (8 heads / 4 KV heads), feed-forward
// 2048, 61 MiB of F32 weights, so that llama-server decodes at about 150
// tokens/s on one thread: slow enough that a stream, a hang-up and two
// busy slots can be seen while they happen, where the 0.5 MB model
// finishes 48 tokens in 10 ms.
func writeModel(t testing.TB, dir string) string {
	t.Helper()
	p := filepath.Join(dir, "small-llama.gguf")
	if err := (ggufwrite.Llama{Layers: 4, Embedding: 512, Heads: 8, KVHeads: 4, FF: 2048, Context: ctxSize}).WriteFile(p); err != nil {
		t.Fatal(err)
	}
	return p
}

// event is one SSE event the client received and when.
type event struct {
	data string
	at   time.Time
}

// stream posts a streamed request through the hive and returns its events;
// after stop events (0: all) it hangs up.
func (h *hive) stream(ctx context.Context, path string, body map[string]any, stop int) ([]event, error) {
	resp, err := h.Request(ctx, "POST", path, body)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/event-stream") {
		return nil, fmt.Errorf("status %d, content type %q", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	var evs []event
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		if d, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			evs = append(evs, event{d, time.Now()})
			if stop > 0 && len(evs) == stop {
				return evs, nil
			}
		}
	}
	return evs, sc.Err()
}

// metric sums the samples of name whose labels contain sel.
func metric(text, name, sel string) float64 {
	var sum float64
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") || !strings.Contains(line, sel) {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum
}

// engineSlots reads llama-server's own /slots: how many are processing.
func engineSlots(t testing.TB, workerURL string) (processing int, decoded []int) {
	t.Helper()
	resp, err := http.Get(workerURL + "/slots")
	if err != nil {
		t.Fatalf("engine /slots: %v", err)
	}
	defer resp.Body.Close()
	var slots []struct {
		IsProcessing bool `json:"is_processing"`
		NextToken    []struct {
			NDecoded int `json:"n_decoded"`
		} `json:"next_token"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&slots); err != nil {
		t.Fatalf("engine /slots: %v", err)
	}
	for _, s := range slots {
		if s.IsProcessing {
			processing++
		}
		for _, n := range s.NextToken {
			decoded = append(decoded, n.NDecoded)
		}
	}
	return processing, decoded
}

func TestLlamaServerThroughTheHive(t *testing.T) {
	bin := llamaServer(t)
	dir := testkit.PassableTempDir(t)
	modelPath := writeModel(t, dir)
	h := startHive(t, backends(t, bin))
	const sel = `backend="llama-server"`

	// Spawn: loading, then idle once llama-server's /health says 200.
	code, body := h.Do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "file:" + modelPath, "backend": "llama-server", "device": 0})
	if code != http.StatusOK {
		t.Fatalf("spawn: %d %s", code, body)
	}
	var sp struct {
		WorkerID string `json:"worker_id"`
		State    string `json:"state"`
	}
	_ = json.Unmarshal(body, &sp)
	if sp.State != "loading" {
		t.Errorf("spawned in state %q, want loading", sp.State)
	}
	id := sp.WorkerID
	var wi workerInfo
	testkit.WaitFor(t, 60*time.Second, "the worker to be idle", func() bool {
		wi, _ = h.worker(id)
		if wi.State == "failed" || wi.State == "stopped" {
			t.Fatalf("worker %s: %+v", wi.State, wi)
		}
		return wi.State == "idle"
	})
	if wi.SlotsTotal != parallel || wi.SlotsAvailable != parallel || wi.ContextSize == 0 {
		t.Errorf("engine details: slots %d/%d, context %d; want %d/%d and the engine's context", wi.SlotsAvailable, wi.SlotsTotal, wi.ContextSize, parallel, parallel)
	}
	if wi.PID == nil {
		t.Fatal("no pid")
	}

	t.Run("estimate beside what llama-server uses", func(t *testing.T) {
		est, err := estimate.EstimateWith(modelPath, estimate.Options{ContextSize: ctxSize, Parallel: parallel, CPU: true})
		if err != nil {
			t.Fatal(err)
		}
		// One request first, so every buffer has been touched.
		if code, body := h.Do("POST", "/v1/workers/"+id+"/v1/completions", map[string]any{"prompt": "warm", "max_tokens": 4}); code != http.StatusOK {
			t.Fatalf("completion: %d %s", code, body)
		}
		rss, hwm := procStatus(t, *wi.PID)
		_, logs := h.Do("GET", "/v1/workers/"+id+"/logs", nil)
		buf := logBuffers(string(logs))
		ratio := float64(est.RAMBytes) / float64(hwm)
		report := fmt.Sprintf("estimate (ctx %d, parallel %d, CPU): RAM %d B = weights %d + KV %d + compute %d + overhead %d\n"+
			"llama-server: VmRSS %d B, VmHWM %d B; logged buffers %v\n"+
			"estimate / VmHWM = %.2f; KV estimate / logged KV = %.2f; compute estimate / logged compute = %.2f\n",
			ctxSize, parallel, est.RAMBytes, est.WeightsBytes, est.KVCacheBytes, est.ComputeBytes, est.OverheadBytes,
			rss, hwm, buf, ratio, float64(est.KVCacheBytes)/buf["KV"], float64(est.ComputeBytes)/buf["compute"])
		t.Log(report)
		if p := os.Getenv("RBEE_ENGINE_REPORT"); p != "" {
			_ = os.WriteFile(p, []byte(report), 0o644)
		}
		if buf["KV"] == 0 {
			t.Errorf("no KV buffer in llama-server's log")
		} else if r := float64(est.KVCacheBytes) / buf["KV"]; r < 0.5 || r > 2 {
			t.Errorf("KV estimate %d vs llama-server's %v: ratio %.2f", est.KVCacheBytes, buf["KV"], r)
		}
	})

	chat := "/v1/workers/" + id + "/v1/chat/completions"
	t.Run("streamed chat arrives token by token", func(t *testing.T) {
		m0 := string(h.Metrics())
		evs, err := h.stream(context.Background(), chat, map[string]any{
			"messages": []map[string]string{{"role": "user", "content": "Hello"}}, "max_tokens": 48, "stream": true}, 0)
		if err != nil {
			t.Fatal(err)
		}
		var content []event
		for _, e := range evs {
			var c struct {
				Choices []struct {
					Delta struct {
						Content string `json:"content"`
					} `json:"delta"`
				} `json:"choices"`
				Usage any `json:"usage"`
			}
			if json.Unmarshal([]byte(e.data), &c) == nil {
				if len(c.Choices) > 0 && c.Choices[0].Delta.Content != "" {
					content = append(content, e)
				}
				if c.Usage != nil && len(c.Choices) == 0 {
					t.Errorf("the client did not ask for usage but got %s", e.data)
				}
			}
		}
		if len(content) < 10 {
			t.Fatalf("%d content chunks, want many: %v", len(content), evs)
		}
		if last := evs[len(evs)-1]; last.data != "[DONE]" {
			t.Errorf("last event %q, want [DONE]", last.data)
		}
		first, lastC := content[0].at, content[len(content)-1].at
		if !first.Before(lastC) {
			t.Errorf("first chunk at %v, last at %v: the stream was buffered", first, lastC)
		}
		t.Logf("%d content chunks over %v", len(content), lastC.Sub(first))
		m := string(h.Metrics())
		moved := func(name, sel string) float64 { return metric(m, name, sel) - metric(m0, name, sel) }
		for _, name := range []string{"rbee_hive_inference_time_to_first_token_seconds_count", "rbee_hive_inference_duration_seconds_count",
			"rbee_hive_inference_tokens_per_second_count", "rbee_hive_inference_tokens_total", "rbee_hive_inference_prompt_tokens_total"} {
			if moved(name, sel) < 1 {
				t.Errorf("%s did not move", name)
			}
		}
		if got := moved("rbee_hive_inference_tokens_total", sel); got != 48 {
			t.Errorf("tokens_total moved by %v, want 48 (the engine's usage)", got)
		}
		if moved("rbee_hive_inference_finish_reasons_total", `reason="length"`) != 1 {
			t.Error("finish reason length not counted")
		}
		if moved("rbee_hive_inference_time_to_first_token_seconds_count", sel) != 1 {
			t.Error("time to first token not observed exactly once")
		}
	})

	t.Run("non-streamed completion", func(t *testing.T) {
		code, body := h.Do("POST", "/v1/workers/"+id+"/v1/completions", map[string]any{"prompt": "abc", "max_tokens": 8})
		if code != http.StatusOK {
			t.Fatalf("%d %s", code, body)
		}
		var r struct {
			Choices []struct {
				Text string `json:"text"`
			} `json:"choices"`
			Usage struct {
				CompletionTokens int `json:"completion_tokens"`
			} `json:"usage"`
		}
		if err := json.Unmarshal(body, &r); err != nil || len(r.Choices) != 1 || r.Choices[0].Text == "" || r.Usage.CompletionTokens != 8 {
			t.Errorf("completion %s (%v)", body, err)
		}
		code, body = h.Do("POST", "/v1/workers/"+id+"/completion", map[string]any{"prompt": "abc", "n_predict": 4})
		if code != http.StatusOK || !strings.Contains(string(body), `"content"`) {
			t.Errorf("native /completion: %d %s", code, body)
		}
		code, _ = h.Do("POST", "/v1/workers/"+id+"/inference", map[string]any{"prompt": "abc"})
		if code != http.StatusNotFound {
			t.Errorf("rbee route on an OpenAI engine: %d, want 404", code)
		}
	})

	t.Run("client hang-up frees the engine's slot", func(t *testing.T) {
		before := metric(string(h.Metrics()), "rbee_hive_inference_requests_total", `status="cancelled"`)
		ctx, cancel := context.WithCancel(context.Background())
		const maxTokens = 400
		evs, err := h.stream(ctx, chat, map[string]any{
			"messages": []map[string]string{{"role": "user", "content": "Go on"}}, "max_tokens": maxTokens, "stream": true}, 3)
		cancel()
		if err != nil || len(evs) != 3 {
			t.Fatalf("%d events, %v", len(evs), err)
		}
		testkit.WaitFor(t, 30*time.Second, "the engine to free its slot", func() bool {
			n, _ := engineSlots(t, wi.URL)
			return n == 0
		})
		if _, decoded := engineSlots(t, wi.URL); len(decoded) > 0 {
			for _, n := range decoded {
				if n >= maxTokens {
					t.Errorf("a slot decoded %d tokens: it ran to the end instead of stopping at the hang-up", n)
				}
			}
		}
		testkit.WaitFor(t, 10*time.Second, "the hive to count the cancel", func() bool {
			return metric(string(h.Metrics()), "rbee_hive_inference_requests_total", `status="cancelled"`) == before+1
		})
		w, _ := h.worker(id)
		if w.State != "idle" || w.SlotsAvailable != parallel {
			t.Errorf("after the hang-up: state %s, slots %d/%d", w.State, w.SlotsAvailable, w.SlotsTotal)
		}
	})

	t.Run("4 concurrent requests on 2 slots", func(t *testing.T) {
		var wg sync.WaitGroup
		errs := make(chan error, 4)
		running := make(chan struct{})
		for i := range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				evs, err := h.stream(context.Background(), chat, map[string]any{
					"messages": []map[string]string{{"role": "user", "content": fmt.Sprint("n", i)}}, "max_tokens": 150, "stream": true}, 0)
				if err == nil && (len(evs) == 0 || evs[len(evs)-1].data != "[DONE]") {
					err = fmt.Errorf("stream %d did not end with [DONE]", i)
				}
				errs <- err
			}()
		}
		go func() { wg.Wait(); close(running) }()
		maxInFlight, minSlots, busy := 0, parallel, false
	poll:
		for {
			select {
			case <-running:
				break poll
			case <-time.After(20 * time.Millisecond):
			}
			w, _ := h.worker(id)
			maxInFlight = max(maxInFlight, w.InFlight)
			if w.State == "busy" {
				busy = true
			}
			if w.SlotsTotal == parallel {
				minSlots = min(minSlots, w.SlotsAvailable)
			}
		}
		close(errs)
		for err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		t.Logf("max in flight %d, fewest free slots %d", maxInFlight, minSlots)
		if !busy || maxInFlight < 3 || minSlots != 0 {
			t.Errorf("busy %v, max in flight %d (want ≥ 3), fewest free slots %d (want 0)", busy, maxInFlight, minSlots)
		}
		testkit.WaitFor(t, 10*time.Second, "idle again", func() bool {
			w, _ := h.worker(id)
			return w.State == "idle" && w.InFlight == 0
		})
	})

	t.Run("kill -9 restarts and serves again", func(t *testing.T) {
		w, _ := h.worker(id)
		if err := syscall.Kill(*w.PID, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		testkit.WaitFor(t, 60*time.Second, "a restart to idle", func() bool {
			w, _ = h.worker(id)
			return w.RestartCount >= 1 && w.State == "idle"
		})
		code, body := h.Do("POST", "/v1/workers/"+id+"/v1/completions", map[string]any{"prompt": "x", "max_tokens": 4})
		if code != http.StatusOK {
			t.Errorf("after restart: %d %s", code, body)
		}
		wi = w
	})

	t.Run("memory limit below the need: oom", func(t *testing.T) {
		// The KV cache of a 262144-token context alone (64 MiB, cleared at
		// load) is beyond this limit, and so is the estimate.
		// A model trained for that context, so llama-server takes -c as given.
		bigPath := filepath.Join(dir, "tiny-256k.gguf")
		if err := (ggufwrite.Llama{Context: oomCtx}).WriteFile(bigPath); err != nil {
			t.Fatal(err)
		}
		est, err := estimate.EstimateWith(bigPath, estimate.Options{ContextSize: oomCtx, Parallel: parallel, CPU: true})
		if err != nil {
			t.Fatal(err)
		}
		limit := int64(est.KVCacheBytes / 2)
		t.Logf("oom backend: estimate %d B (KV %d B), memory limit %d B", est.RAMBytes, est.KVCacheBytes, limit)
		code, body := h.Do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "file:" + bigPath, "backend": "llama-big-context",
			"device": 0, "memory_limit_bytes": limit})
		if code != http.StatusOK {
			t.Fatalf("spawn: %d %s", code, body)
		}
		var sp struct {
			WorkerID string `json:"worker_id"`
		}
		_ = json.Unmarshal(body, &sp)
		var w workerInfo
		testkit.WaitFor(t, 60*time.Second, "an oom exit", func() bool {
			w, _ = h.worker(sp.WorkerID)
			return w.ExitReason == "oom"
		})
		if code, _ := h.Do("DELETE", "/v1/workers/"+sp.WorkerID, nil); code != http.StatusOK {
			t.Errorf("DELETE oom worker: %d", code)
		}
	})

	t.Run("the 0.5 MB tiny model loads and never stops early", func(t *testing.T) {
		tiny := filepath.Join(dir, "tiny.gguf")
		if err := ggufwrite.TinyLlama(tiny); err != nil {
			t.Fatal(err)
		}
		code, body := h.Do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "file:" + tiny, "backend": "llama-server", "device": 0})
		if code != http.StatusOK {
			t.Fatalf("spawn: %d %s", code, body)
		}
		var sp struct {
			WorkerID string `json:"worker_id"`
		}
		_ = json.Unmarshal(body, &sp)
		testkit.WaitFor(t, 60*time.Second, "the tiny worker to be idle", func() bool {
			w, _ := h.worker(sp.WorkerID)
			return w.State == "idle"
		})
		// The output bias keeps </s> and byte tokens from ever being
		// sampled: every request runs to max_tokens.
		for range 3 {
			code, body = h.Do("POST", "/v1/workers/"+sp.WorkerID+"/v1/completions", map[string]any{"prompt": "Once", "max_tokens": 200})
			var r struct {
				Choices []struct {
					FinishReason string `json:"finish_reason"`
				} `json:"choices"`
				Usage struct {
					CompletionTokens int `json:"completion_tokens"`
				} `json:"usage"`
			}
			if code != http.StatusOK || json.Unmarshal(body, &r) != nil || r.Usage.CompletionTokens != 200 || len(r.Choices) != 1 || r.Choices[0].FinishReason != "length" {
				t.Errorf("tiny model completion: %d %s", code, body)
			}
		}
		if code, _ := h.Do("DELETE", "/v1/workers/"+sp.WorkerID, nil); code != http.StatusOK {
			t.Errorf("DELETE tiny worker: %d", code)
		}
	})

	t.Run("DELETE: gone, leaf removed", func(t *testing.T) {
		var leaves []string
		for _, d := range testkit.CgroupDirs(h.CgroupRoot) {
			if _, err := os.Stat(filepath.Join(d, "workers", id)); err == nil {
				leaves = append(leaves, filepath.Join(d, "workers", id))
			}
		}
		if len(leaves) == 0 {
			t.Errorf("no cgroup leaf for %s before DELETE", id)
		}
		if code, body := h.Do("DELETE", "/v1/workers/"+id, nil); code != http.StatusOK {
			t.Fatalf("DELETE: %d %s", code, body)
		}
		if _, code := h.worker(id); code != http.StatusNotFound {
			t.Errorf("GET after DELETE: %d, want 404", code)
		}
		for _, l := range leaves {
			if _, err := os.Stat(l); err == nil {
				t.Errorf("leaf %s still there", l)
			}
		}
		if err := syscall.Kill(*wi.PID, 0); err == nil {
			t.Errorf("llama-server %d still alive", *wi.PID)
		}
	})
}

// procStatus reads a process's resident memory and its peak.
func procStatus(t testing.TB, pid int) (rss, hwm uint64) {
	t.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, _ := strconv.ParseUint(f[1], 10, 64)
		switch f[0] {
		case "VmRSS:":
			rss = v << 10
		case "VmHWM:":
			hwm = v << 10
		}
	}
	return rss, hwm
}

var bufferLine = regexp.MustCompile(`(\S+) (KV|compute|model) buffer size =\s*([0-9.]+) MiB`)

// logBuffers sums the buffer sizes llama-server logs at load, by kind.
func logBuffers(logs string) map[string]float64 {
	out := map[string]float64{}
	for _, m := range bufferLine.FindAllStringSubmatch(logs, -1) {
		v, _ := strconv.ParseFloat(m[3], 64)
		out[m[2]] += v * (1 << 20)
	}
	return out
}
