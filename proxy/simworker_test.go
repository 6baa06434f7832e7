package proxy

import (
	"bufio"
	"encoding/json"
	"net/http"
	"net/url"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// buildSimworker compiles the real synthetic worker once for the caller.
func buildSimworker(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "rbee-simworker")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/rbee/rbee-hive/cmd/rbee-simworker").CombinedOutput()
	if err != nil {
		t.Fatalf("go build rbee-simworker: %v\n%s", err, out)
	}
	return bin
}

// startSimworker runs the worker on a free port and returns its URL.
func startSimworker(t *testing.T, bin string, args ...string) *url.URL {
	t.Helper()
	cmd := exec.Command(bin, append([]string{"--port", "0", "--api-token", "worker-token", "--model", "tiny"}, args...)...)
	cmd.Env = []string{"RBEE_WORKER_ID=w-proxytest"} // no NOTIFY_SOCKET: no hive to report to
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
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
	var u *url.URL
	select {
	case a := <-addr:
		if u, err = url.Parse("http://" + a); err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("rbee-simworker did not start listening")
	}
	// It listens before it is loaded and answers 503 until then: on a busy
	// machine a request right after "listening" got that 503.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if resp, err := http.Get(u.JoinPath("/health").String()); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return u
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("rbee-simworker did not become ready")
		}
	}
}

// The proxy against the real synthetic worker: a whole stream, a
// validation refusal, a crash mid-stream and a wedge mid-stream.
func TestProxyWithSimworker(t *testing.T) {
	bin := buildSimworker(t)

	t.Run("stream", func(t *testing.T) {
		rg := newRigURL(t, startSimworker(t, bin, "--tokens-per-second", "200"), Options{})
		resp := rg.post(t.Context(), `{"job_id":"job-1","prompt":"hello","max_tokens":12}`)
		evs := readAll(t, resp.Body)
		rg.waitEnd()
		if resp.StatusCode != http.StatusOK || len(evs) < 3 || evs[len(evs)-1] != "[DONE]" {
			t.Fatalf("status %d, events %q", resp.StatusCode, evs)
		}
		var end struct {
			Type      string `json:"type"`
			TokensOut int    `json:"tokens_out"`
		}
		if err := json.Unmarshal([]byte(evs[len(evs)-2]), &end); err != nil || end.Type != "end" || end.TokensOut != 12 {
			t.Errorf("end event %q (%v)", evs[len(evs)-2], err)
		}
		rg.outcomes(StatusOK, "")
		if got := rg.counter(rg.p.m.tokens); got != 12 {
			t.Errorf("tokens_total = %v, want 12", got)
		}
		for _, name := range []string{"rbee_hive_inference_duration_seconds", "rbee_hive_inference_time_to_first_token_seconds", "rbee_hive_inference_tokens_per_second"} {
			if n := histCount(t, rg.reg, name); n != 1 {
				t.Errorf("%s count = %d, want 1", name, n)
			}
		}
	})

	t.Run("validation error passes through", func(t *testing.T) {
		rg := newRigURL(t, startSimworker(t, bin), Options{})
		resp := rg.post(t.Context(), `{"job_id":"job-1","prompt":"hello","max_tokens":5000}`)
		rg.waitEnd()
		var env struct {
			Error struct {
				Code    string         `json:"code"`
				Details map[string]any `json:"details"`
			} `json:"error"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
			t.Fatal(err)
		}
		wb, _ := env.Error.Details["worker_body"].(map[string]any)
		if resp.StatusCode != http.StatusBadRequest || env.Error.Code != "VALIDATION_ERROR" || wb["errors"] == nil {
			t.Errorf("got %d %+v", resp.StatusCode, env)
		}
		rg.outcomes(StatusRejected, "")
	})

	t.Run("worker crashes mid-stream", func(t *testing.T) {
		rg := newRigURL(t, startSimworker(t, bin, "--tokens-per-second", "20", "--crash-after", "2s"), Options{})
		evs := readAll(t, rg.post(t.Context(), `{"job_id":"job-1","prompt":"hello","max_tokens":200}`).Body)
		rg.waitEnd()
		if len(evs) < 2 || evs[len(evs)-1] != "[DONE]" || !strings.Contains(evs[len(evs)-2], `"code":"`+CodeStreamError+`"`) {
			t.Fatalf("events %q", evs)
		}
		rg.outcomes(StatusError, ErrorTypeStream)
		if got := rg.counter(rg.p.m.tokens); got < 1 || got >= 200 {
			t.Errorf("tokens_total = %v, want the tokens sent before the crash", got)
		}
	})

	t.Run("worker wedges mid-stream", func(t *testing.T) {
		rg := newRigURL(t, startSimworker(t, bin, "--tokens-per-second", "20", "--hang-after", "2s"), Options{IdleTimeout: 500 * time.Millisecond})
		evs := readAll(t, rg.post(t.Context(), `{"job_id":"job-1","prompt":"hello","max_tokens":200}`).Body)
		rg.waitEnd()
		if len(evs) < 2 || evs[len(evs)-1] != "[DONE]" || !strings.Contains(evs[len(evs)-2], `"code":"`+CodeStreamTimeout+`"`) {
			t.Fatalf("events %q", evs)
		}
		rg.outcomes(StatusError, ErrorTypeTimeout)
	})
}
