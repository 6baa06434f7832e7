package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// nextVersion is the version of the binary TestMain builds as "next".
const nextVersion = "0.1.0-next"

// copyFile copies src to dst with mode.
func copyFile(t *testing.T, src, dst string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, mode); err != nil {
		t.Fatal(err)
	}
}

// TestSIGHUPUpgradesInPlace: with a stream in flight, the binary on disk
// is replaced (as a package manager does) and the hive gets SIGHUP. The
// stream runs to its end, the hive keeps its pid and its worker (same pid,
// adopted, still answering), and /v1/health reports the new version.
func TestSIGHUPUpgradesInPlace(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "rbee-hive")
	copyFile(t, filepath.Join(bins.dir, "rbee-hive"), bin, 0o755)
	d := startDaemonFrom(t, bin, `
[backends.slow]
command = ["`+bins.dir+`/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--tokens-per-second", "10"]
health = "notify"
memory_limit = "256MiB"
`)
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	id := d.spawnBackend("slow", model, "on-failure")
	before := d.waitWorker("idle", id, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })

	req, _ := http.NewRequest("POST", d.url+"/v1/workers/"+id+"/inference", strings.NewReader(`{"job_id":"up-1","prompt":"hi","max_tokens":30}`))
	req.Header.Set("Authorization", "Bearer "+d.token())
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("inference: %v %v", err, resp)
	}
	defer resp.Body.Close()
	rd := bufio.NewReader(resp.Body)
	if _, err := rd.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	// The new release lands on disk (a rename, as dpkg does), then reload.
	next := bin + ".new"
	copyFile(t, filepath.Join(bins.dir, "next"), next, 0o755)
	if err := os.Rename(next, bin); err != nil {
		t.Fatal(err)
	}
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(rd)
	if err != nil || !strings.Contains(string(rest), "[DONE]") || !strings.Contains(string(rest), `"type":"end"`) {
		t.Fatalf("stream in flight during the upgrade: %v, ended %q", err, tail(string(rest)))
	}
	var health struct {
		Version string `json:"version"`
	}
	waitCLI(t, "new version serving", func() bool {
		r, err := http.Get(d.url + "/v1/health")
		if err != nil {
			return false
		}
		defer r.Body.Close()
		return json.NewDecoder(r.Body).Decode(&health) == nil && health.Version == nextVersion
	})
	select {
	case err := <-d.done:
		t.Fatalf("hive process ended during the upgrade: %v", err)
	default:
	}
	w := d.worker(id)
	if w.PID == nil || *w.PID != *before.PID || w.AdoptedAt == nil || w.URL != before.URL {
		t.Errorf("worker after the upgrade: %+v, before %+v", w, before)
	}
	if !strings.Contains(d.logs.String(), "upgraded in place") {
		t.Error("the new binary did not say it took the handed-over listener")
	}
	// It still serves through the upgraded hive.
	code, body := d.request("POST", "/v1/workers/"+id+"/inference", `{"job_id":"up-2","prompt":"hi","max_tokens":3}`)
	if code != 200 || !strings.Contains(string(body), "[DONE]") {
		t.Errorf("inference after the upgrade: %d %s", code, tail(string(body)))
	}
	// `rbee-hive upgrade` (ExecReload=) does the same and returns once the
	// new binary serves.
	cli := exec.Command(filepath.Join(bins.dir, "rbee-hive"), "upgrade", "--url", d.url, "--pid", strconv.Itoa(d.cmd.Process.Pid))
	cli.Env = append(os.Environ(), "MAINPID=")
	out, err := cli.CombinedOutput()
	want := fmt.Sprintf("upgraded in place: pid %d, version %s -> %s", d.cmd.Process.Pid, nextVersion, nextVersion)
	if err != nil || !strings.Contains(string(out), want) {
		t.Errorf("rbee-hive upgrade: %v: %s", err, out)
	}
	if w := d.worker(id); w.PID == nil || *w.PID != *before.PID {
		t.Errorf("worker after the second upgrade: %+v", w)
	}
	if n := strings.Count(d.logs.String(), "upgraded in place: serving"); n != 2 {
		t.Errorf("%d upgrades logged, want 2", n)
	}
}

func tail(s string) string {
	if len(s) > 200 {
		return "…" + s[len(s)-200:]
	}
	return s
}

// probeHealth hits /v1/health on fresh connections until stop closes and
// returns the longest time the API did not answer: the longest request
// plus, for failed ones (refused), the time until the next success.
func probeHealth(url string, stop <-chan struct{}) (worst time.Duration, failed int) {
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}
	var downSince time.Time
	for {
		select {
		case <-stop:
			return worst, failed
		default:
		}
		t0 := time.Now()
		resp, err := c.Get(url + "/v1/health")
		if err == nil {
			resp.Body.Close()
		}
		now := time.Now()
		switch {
		case err != nil || resp.StatusCode != 200:
			failed++
			if downSince.IsZero() {
				downSince = t0
			}
			time.Sleep(time.Millisecond)
		default:
			gap := now.Sub(t0)
			if !downSince.IsZero() {
				gap = now.Sub(downSince)
				downSince = time.Time{}
			}
			worst = max(worst, gap)
		}
	}
}

// BenchmarkReloadVsRestart: how long the API does not answer during an
// in-place upgrade (SIGHUP; connections wait in the backlog) against a
// full restart (SIGTERM, a new process, adoption), same round, a worker
// running. One round per b.N (run with -benchtime 1x).
func BenchmarkReloadVsRestart(b *testing.B) {
	for range b.N {
		d := startDaemonBin(b, "", "http", nil, `
[backends.slow]
command = ["`+bins.dir+`/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}"]
health = "notify"
memory_limit = "256MiB"
`)
		model := filepath.Join(d.stateDir, "models", "m.gguf")
		if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
			b.Fatal(err)
		}
		id := d.spawnBackend("slow", model, "on-failure")
		d.waitWorker("idle", id, 20*time.Second, func(w apiWorker) bool { return w.State == "idle" })
		started := func() string {
			var h healthView
			r, err := http.Get(d.url + "/v1/health")
			if err != nil {
				return ""
			}
			defer r.Body.Close()
			_ = json.NewDecoder(r.Body).Decode(&h)
			return h.StartedAt
		}
		measure := func(act func()) (time.Duration, int) {
			stop := make(chan struct{})
			res := make(chan [2]int64, 1)
			go func() { w, f := probeHealth(d.url, stop); res <- [2]int64{int64(w), int64(f)} }()
			time.Sleep(200 * time.Millisecond)
			act()
			time.Sleep(200 * time.Millisecond)
			close(stop)
			r := <-res
			return time.Duration(r[0]), int(r[1])
		}
		s0 := started()
		reload, rfail := measure(func() {
			if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				b.Fatal(err)
			}
			for deadline := time.Now().Add(60 * time.Second); started() == s0 || started() == ""; time.Sleep(5 * time.Millisecond) {
				if time.Now().After(deadline) {
					b.Fatal("no upgrade")
				}
			}
		})
		var d2 *daemon
		restart, sfail := measure(func() {
			d.stop(syscall.SIGKILL)
			d2 = d.restart()
		})
		if w := d2.worker(id); w.AdoptedAt == nil {
			b.Fatalf("worker not adopted after the restart: %+v", w)
		}
		b.ReportMetric(float64(reload.Microseconds())/1000, "reload-ms")
		b.ReportMetric(float64(rfail), "reload-refused")
		b.ReportMetric(float64(restart.Microseconds())/1000, "restart-ms")
		b.ReportMetric(float64(sfail), "restart-refused")
		b.ReportMetric(float64(reload)/float64(restart), "reload/restart")
	}
}
