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
	// 30 tokens at 20/s: about 1.5 s of stream.
	s := startDrainStream(t, "20", `{"job_id":"drain-1","prompt":"hello","max_tokens":30}`)
	events := s.before
	after, err := s.readToDone()
	events = append(events, after...)
	if err != nil {
		t.Fatalf("stream cut during the drain after %d events: %v", len(events), err)
	}
	var sawEnd bool
	for _, ev := range events {
		sawEnd = sawEnd || strings.Contains(ev, `"type":"end"`)
	}
	if !sawEnd {
		t.Errorf("no end event before [DONE]: %q", events)
	}
	s.waitExit0(t, 30*time.Second)
}

// drainStream is an inference stream from a simworker whose hive got
// SIGTERM once the first token had arrived.
type drainStream struct {
	rd     *bufio.Reader
	before []string // the events up to and with the first token
	exited chan int // the hive's exit code
}

// startDrainStream starts a hive with a simworker backend that makes
// tokensPerSecond, streams an inference with the request body, reads it to
// its first token (so SIGTERM lands mid-stream) and sends the hive SIGTERM.
func startDrainStream(t *testing.T, tokensPerSecond, body string) *drainStream {
	t.Helper()
	d := startDaemon(t, `
[backends.slow]
command = ["{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--tokens-per-second", "`+tokensPerSecond+`"]
health = "notify"
memory_limit = "256MiB"
`)
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, resBody := d.request("POST", "/v1/workers/spawn", `{"model_ref":"file:`+model+`","backend":"slow","device":0,"model_path":""}`)
	if code != 200 {
		t.Fatalf("spawn: %d %s", code, resBody)
	}
	var res struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(resBody, &res)
	waitCLI(t, "worker idle", func() bool {
		_, b := d.request("GET", "/v1/workers/"+res.WorkerID, "")
		return strings.Contains(string(b), `"state":"idle"`)
	})

	req, _ := http.NewRequest("POST", d.url+"/v1/workers/"+res.WorkerID+"/inference", strings.NewReader(body))
	req.Header.Set("Authorization", "Bearer "+d.token())
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { resp.Body.Close() })
	if resp.StatusCode != 200 {
		b, _ := io.ReadAll(resp.Body)
		t.Fatalf("inference: %d %s", resp.StatusCode, b)
	}
	s := &drainStream{rd: bufio.NewReader(resp.Body), exited: make(chan int, 1)}
	for {
		ev, err := s.readEvent()
		if err != nil {
			t.Fatalf("stream ended before the first token: %v", err)
		}
		s.before = append(s.before, ev)
		if strings.Contains(ev, `"type":"token"`) {
			break
		}
	}
	go func() { c, _ := d.stop(syscall.SIGTERM); s.exited <- c }()
	return s
}

// readEvent returns the next SSE event's data.
func (s *drainStream) readEvent() (string, error) {
	for {
		line, err := s.rd.ReadString('\n')
		if err != nil {
			return "", err
		}
		if data, ok := strings.CutPrefix(strings.TrimSpace(line), "data: "); ok {
			return data, nil
		}
	}
}

// readToDone reads events up to and with [DONE]; on an error it returns
// those read so far.
func (s *drainStream) readToDone() ([]string, error) {
	var events []string
	for {
		ev, err := s.readEvent()
		if err != nil {
			return events, err
		}
		events = append(events, ev)
		if ev == "[DONE]" {
			return events, nil
		}
	}
}

// waitExit0 fails the test unless the hive exits 0 within timeout.
func (s *drainStream) waitExit0(t *testing.T, timeout time.Duration) {
	t.Helper()
	select {
	case c := <-s.exited:
		if c != 0 {
			t.Errorf("exit code %d", c)
		}
	case <-time.After(timeout):
		t.Fatal("hive did not exit after the drain")
	}
}
