package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestDaemonUnderSystemd plays systemd: the hive must say READY=1 only once
// it serves, keep a STATUS line, ping the watchdog at half of WATCHDOG_USEC,
// and say STOPPING=1 on SIGTERM.
func TestDaemonUnderSystemd(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "systemd-notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	msgs := make(chan string, 1024)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, _, err := conn.ReadFromUnix(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	next := func(want string, within time.Duration) string {
		t.Helper()
		deadline := time.After(within)
		for {
			select {
			case m, ok := <-msgs:
				if !ok {
					t.Fatalf("socket closed waiting for %q", want)
				}
				if strings.Contains(m, want) {
					return m
				}
			case <-deadline:
				t.Fatalf("no %q within %v", want, within)
			}
		}
	}

	// startDaemon returns once /v1/health answers; READY must already be
	// there or come right after, never before the API is up.
	d := startDaemon(t, "", "NOTIFY_SOCKET="+sock, "WATCHDOG_USEC=400000")
	next("READY=1", 5*time.Second)
	if st := next("STATUS=", 5*time.Second); !strings.Contains(st, "workers") {
		t.Errorf("status line %q lacks the worker summary", st)
	}
	// 400 ms watchdog → pings every 200 ms; three in 2 s leaves slack for CI.
	for i := 0; i < 3; i++ {
		next("WATCHDOG=1", 2*time.Second)
	}
	// A worker gets the hive's notify socket and its stale threshold, never
	// what systemd gave the hive.
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	if err := os.WriteFile(model, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	code, body := d.request("POST", "/v1/workers/spawn", `{"model_ref":"file:`+model+`","backend":"sim","device":0,"model_path":""}`)
	if code != 200 {
		t.Fatalf("spawn: %d %s", code, body)
	}
	var spawned struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(body, &spawned)
	var pid int
	for deadline := time.Now().Add(10 * time.Second); pid == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		_, body = d.request("GET", "/v1/workers/"+spawned.WorkerID, "")
		var w struct {
			PID *int `json:"pid"`
		}
		if json.Unmarshal(body, &w) == nil && w.PID != nil {
			pid = *w.PID
		}
	}
	if pid == 0 {
		t.Fatalf("worker never got a pid: %s", body)
	}
	environ, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	if err != nil {
		t.Fatal(err)
	}
	env := strings.Split(string(environ), "\x00")
	hiveSock := "NOTIFY_SOCKET=" + filepath.Join(filepath.Dir(d.stateDir), "run", "notify.sock")
	for _, want := range []string{hiveSock, "WATCHDOG_USEC=60000000", "RBEE_WORKER_ID=" + spawned.WorkerID} {
		if !slices.Contains(env, want) {
			t.Errorf("worker environment lacks %s: %q", want, env)
		}
	}
	if slices.Contains(env, "NOTIFY_SOCKET="+sock) || slices.Contains(env, "WATCHDOG_USEC=400000") {
		t.Errorf("systemd's settings for the hive leaked into the worker: %q", env)
	}

	if code, _ := d.stop(syscall.SIGTERM); code != 0 {
		t.Fatalf("exit code %d", code)
	}
	next("STOPPING=1", 2*time.Second)
}
