package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestSIGTERMEndsLongStream: a stream longer than the shutdown drain is
// not cut: at the drain deadline it gets the HIVE_SHUTTING_DOWN error event
// and [DONE], then the response ends and the hive exits 0.
func TestSIGTERMEndsLongStream(t *testing.T) {
	d := startDaemon(t, `
[backends.slow]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--tokens-per-second", "5"]
health = "notify"
memory_limit = "256MiB"
`)
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, body := d.request("POST", "/v1/workers/spawn", `{"model_ref":"file:`+model+`","backend":"slow","device":0,"model_path":""}`)
	if code != 200 {
		t.Fatalf("spawn: %d %s", code, body)
	}
	var res struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(body, &res)
	waitCLI(t, "worker idle", func() bool {
		_, b := d.request("GET", "/v1/workers/"+res.WorkerID, "")
		return strings.Contains(string(b), `"state":"idle"`)
	})

	// 2000 tokens at 5/s: far longer than the drain.
	req, _ := http.NewRequest("POST", d.url+"/v1/workers/"+res.WorkerID+"/inference",
		strings.NewReader(`{"job_id":"drain-long","prompt":"hello","max_tokens":2000}`))
	req.Header.Set("Authorization", "Bearer "+d.token())
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("inference: %d %s", resp.StatusCode, b)
	}
	rd := bufio.NewReader(resp.Body)
	readEvent := func() (string, error) {
		for {
			line, err := rd.ReadString('\n')
			if err != nil {
				return "", err
			}
			if data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: "); ok {
				return data, nil
			}
		}
	}
	for {
		ev, err := readEvent()
		if err != nil {
			t.Fatalf("stream ended before the first token: %v", err)
		}
		if strings.Contains(ev, `"type":"token"`) {
			break
		}
	}
	exited := make(chan int, 1)
	go func() { c, _ := d.stop(syscall.SIGTERM); exited <- c }()
	var events []string
	for {
		ev, err := readEvent()
		if err != nil {
			t.Fatalf("stream cut during the drain after %d more events (last %q): %v", len(events), lastOf(events), err)
		}
		events = append(events, ev)
		if ev == "[DONE]" {
			break
		}
	}
	if len(events) < 2 || !strings.Contains(events[len(events)-2], `"code":"HIVE_SHUTTING_DOWN"`) {
		t.Errorf("event before [DONE] %q, want the HIVE_SHUTTING_DOWN error", lastOf(events[:len(events)-1]))
	}
	if rest, err := io.ReadAll(rd); err != nil || strings.TrimSpace(string(rest)) != "" {
		t.Errorf("after [DONE]: %q, %v; want a clean end", rest, err)
	}
	select {
	case c := <-exited:
		if c != 0 {
			t.Errorf("exit code %d", c)
		}
	case <-time.After(60 * time.Second):
		t.Fatal("hive did not exit after the drain")
	}
}

func lastOf(s []string) string {
	if len(s) == 0 {
		return ""
	}
	return s[len(s)-1]
}
