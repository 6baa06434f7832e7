package sim

import (
	"bufio"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"regexp"
	"syscall"
	"testing"
	"time"
)

// TestProcessHTTPFallback: with RBEE_HIVE_URL + RBEE_WORKER_TOKEN and no
// NOTIFY_SOCKET the worker POSTs its ready callback and heartbeats.
func TestProcessHTTPFallback(t *testing.T) {
	type call struct {
		path, auth string
		body       map[string]any
	}
	calls := make(chan call, 64)
	hive := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var m map[string]any
		json.Unmarshal(b, &m)
		calls <- call{r.URL.Path, r.Header.Get("Authorization"), m}
	}))
	defer hive.Close()
	cmd := exec.Command(simBinary(t), "--port", "0", "--model", "/m/tiny.gguf", "--backend", "cuda", "--device", "1")
	cmd.Env = []string{"RBEE_HIVE_URL=" + hive.URL, "RBEE_WORKER_TOKEN=tok", "RBEE_WORKER_ID=w-http", "WATCHDOG_USEC=200000"}
	stderr, _ := cmd.StderrPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	addr := make(chan string, 1)
	go func() {
		re := regexp.MustCompile(`msg=listening .*addr=(\S+)`)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				addr <- m[1]
			}
		}
	}()
	next := func() call {
		select {
		case c := <-calls:
			return c
		case <-time.After(5 * time.Second):
			t.Fatal("no call to the hive")
			return call{}
		}
	}
	a := <-addr
	c := next()
	if c.path != "/v1/workers/ready" || c.auth != "Bearer tok" || c.body["worker_id"] != "w-http" || c.body["url"] != "http://"+a ||
		c.body["model_ref"] != "/m/tiny.gguf" || c.body["backend"] != "cuda" || c.body["device"] != float64(1) {
		t.Fatalf("ready callback %+v (addr %s)", c, a)
	}
	for range 2 {
		c = next()
		if c.path != "/v1/heartbeat" || c.body["worker_id"] != "w-http" || c.body["health_status"] != "healthy" || c.body["timestamp"] == "" {
			t.Fatalf("heartbeat %+v", c)
		}
		if _, err := time.Parse(time.RFC3339, c.body["timestamp"].(string)); err != nil {
			t.Fatal(err)
		}
	}
	cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
}
