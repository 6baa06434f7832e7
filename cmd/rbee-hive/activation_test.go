package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// TestDaemonSocketActivation runs the hive the way rbee-hive-notify.socket
// does: systemd-socket-activate owns the notify socket (at a path the config
// does not name), a datagram starts the hive, and the hive's workers must
// heartbeat to that socket, not to the configured one.
func TestDaemonSocketActivation(t *testing.T) {
	bin := testkit.RequireCommand(t, "systemd-socket-activate")
	testkit.RequireRoot(t)
	dir := passableTempDir(t)
	sock := filepath.Join(dir, "activated.sock")
	port := testkit.FreePort(t)
	cfgPath := filepath.Join(dir, "hive.toml")
	cfg := fmt.Sprintf("listen = \"127.0.0.1:%d\"\nstate_dir = %q\nruntime_dir = %q\nlog_format = \"json\"\n",
		port, filepath.Join(dir, "state"), filepath.Join(dir, "run"))
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "--datagram", "-l", sock, filepath.Join(bins.dir, "rbee-hive"), "daemon", "--config", cfgPath)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logs := make(chan string, 1024)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			logs <- sc.Text()
		}
		close(logs)
	}()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
		}
	})
	waitLine := func(want string) string {
		t.Helper()
		deadline := time.After(20 * time.Second)
		for {
			select {
			case l, ok := <-logs:
				if !ok {
					t.Fatalf("log closed before %q", want)
				}
				if strings.Contains(l, want) {
					return l
				}
			case <-deadline:
				t.Fatalf("no log line with %q", want)
			}
		}
	}
	waitLine("Listening on")
	// The first datagram makes systemd-socket-activate start the hive.
	conn, err := net.Dial("unixgram", sock)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = conn.Write([]byte("WATCHDOG=1"))
	conn.Close()
	if l := waitLine("notify socket ready"); !strings.Contains(l, sock) {
		t.Errorf("hive did not take over the activated socket: %s", l)
	}
	d := &daemon{t: t, url: fmt.Sprintf("http://127.0.0.1:%d", port), stateDir: filepath.Join(dir, "state")}
	waitCLI(t, "the API", func() bool {
		_, err := net.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		return err == nil
	})
	model := filepath.Join(d.stateDir, "models", "m.gguf") // below models.file_roots (default: model_dir)
	_ = os.WriteFile(model, []byte("x"), 0o600)
	code, body := d.request("POST", "/v1/workers/spawn", `{"model_ref":"file:`+model+`","backend":"sim","device":0,"model_path":""}`)
	if code != 200 {
		t.Fatalf("spawn: %d %s", code, body)
	}
	var res struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(body, &res)
	// READY=1 can only arrive through the activated socket.
	waitCLI(t, "worker idle via the activated socket", func() bool {
		_, b := d.request("GET", "/v1/workers/"+res.WorkerID, "")
		return strings.Contains(string(b), `"state":"idle"`)
	})
}
