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

// TestSIGTERMDrainsInFlightStream: an inference stream running when SIGTERM
// arrives is served to its end ([DONE]) before the hive stops its workers
// and exits 0.
func TestSIGTERMDrainsInFlightStream(t *testing.T) {
	d := startDaemon(t, `
[backends.slow]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--tokens-per-second", "20"]
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

	// 30 tokens at 20/s: about 1.5 s of stream.
	req, _ := http.NewRequest("POST", d.url+"/v1/workers/"+res.WorkerID+"/inference",
		strings.NewReader(`{"job_id":"drain-1","prompt":"hello","max_tokens":30}`))
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
	var events []string
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
	// Wait for the first token, so SIGTERM lands mid-stream.
	for {
		ev, err := readEvent()
		if err != nil {
			t.Fatalf("stream ended before the first token: %v", err)
		}
		events = append(events, ev)
		if strings.Contains(ev, `"type":"token"`) {
			break
		}
	}
	exited := make(chan int, 1)
	go func() { c, _ := d.stop(syscall.SIGTERM); exited <- c }()
	for {
		ev, err := readEvent()
		if err != nil {
			t.Fatalf("stream cut during the drain after %d events: %v", len(events), err)
		}
		events = append(events, ev)
		if ev == "[DONE]" {
			break
		}
	}
	var sawEnd bool
	for _, ev := range events {
		sawEnd = sawEnd || strings.Contains(ev, `"type":"end"`)
	}
	if !sawEnd {
		t.Errorf("no end event before [DONE]: %q", events)
	}
	select {
	case c := <-exited:
		if c != 0 {
			t.Errorf("exit code %d", c)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("hive did not exit after the drain")
	}
}
