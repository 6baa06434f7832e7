package main

import (
	"bytes"
	"context"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// TestServeErrorStopsWorkers: when the HTTP server fails (here its listener
// is closed under it) the hive still drains its workers before returning
// the error; it used to return straight away, leaving them unsupervised.
func TestServeErrorStopsWorkers(t *testing.T) {
	tests := []struct {
		name    string
		fail    bool // close the listener rather than cancel ctx
		wantErr bool
	}{
		{"server fails", true, true},
		{"signal", false, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			srv := &http.Server{Handler: http.NotFoundHandler()}
			serveErr := make(chan error, 1)
			go func() { serveErr <- srv.Serve(ln) }()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			if tc.fail {
				ln.Close()
			} else {
				cancel()
			}
			stopped := 0
			var logs bytes.Buffer
			err = serveUntil(ctx, slog.New(slog.NewTextHandler(&logs, nil)), srv, serveErr, func() { stopped++ }, nil, nil, nil)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, want error %v", err, tc.wantErr)
			}
			if stopped != 1 {
				t.Fatalf("workers stopped %d times, want 1\n%s", stopped, logs.String())
			}
		})
	}
}

// TestDaemonSIGHUPUpgradesTwice: SIGHUP used to end the hive abruptly
// (Go's default action), without the ordered drain. It now upgrades the
// hive in place (upgrade.go), any number of times, and SIGTERM still
// drains and exits 0 afterwards.
func TestDaemonSIGHUPUpgradesTwice(t *testing.T) {
	d := startDaemon(t, "")
	for i := 1; i <= 2; i++ {
		if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		waitCLI(t, "upgraded in place", func() bool {
			return strings.Count(d.logs.String(), "upgraded in place") == i
		})
	}
	select {
	case err := <-d.done:
		t.Fatalf("hive exited on SIGHUP: %v\n%s", err, d.logs.String())
	default:
	}
	resp, err := http.Get(d.url + "/v1/health")
	if err != nil {
		t.Fatalf("hive does not answer after SIGHUP: %v", err)
	}
	resp.Body.Close()
	if code, _ := d.stop(syscall.SIGTERM); code != 0 || !strings.Contains(d.logs.String(), "hive stopped") {
		t.Fatalf("exit %d after SIGTERM\n%s", code, d.logs.String())
	}
}

// TestDaemonMissingBackendProgram: a backend whose program is missing or
// not executable stops the start with an error naming the backend, instead
// of failing every spawn later.
func TestDaemonMissingBackendProgram(t *testing.T) {
	dir := t.TempDir()
	plain := filepath.Join(dir, "plain")
	if err := os.WriteFile(plain, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	tests := []struct{ prog, want string }{
		{filepath.Join(dir, "llama-server"), "backend llama: command " + filepath.Join(dir, "llama-server") + ": stat"},
		{plain, "backend llama: command " + plain + " is not executable"},
	}
	for _, tc := range tests {
		p := filepath.Join(t.TempDir(), "hive.toml")
		body := "listen = \"127.0.0.1:0\"\nstate_dir = \"" + filepath.Join(dir, "state") + "\"\nruntime_dir = \"" + filepath.Join(dir, "run") +
			"\"\n[backends.llama]\ncommand = [\"" + tc.prog + "\", \"{port}\"]\n"
		if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
		var stderr bytes.Buffer
		cmd := exec.Command(filepath.Join(bins.dir, "rbee-hive"), "daemon", "--config", p)
		cmd.Stderr = &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			t.Fatalf("hive started with backend program %s", tc.prog)
		}
		if cmd.ProcessState.ExitCode() != 1 || !strings.Contains(stderr.String(), tc.want) {
			t.Errorf("exit %d, stderr %q; want 1 and %q", cmd.ProcessState.ExitCode(), stderr.String(), tc.want)
		}
	}
}

// TestDaemonWithoutSimworker: the built-in demo backend's program missing
// (a hive installed alone) is a warning, not a failed start.
func TestDaemonWithoutSimworker(t *testing.T) {
	dir := t.TempDir()
	b, err := os.ReadFile(filepath.Join(bins.dir, "rbee-hive"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "rbee-hive"), b, 0o755); err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(dir, "hive.toml")
	body := "listen = \"127.0.0.1:0\"\nstate_dir = \"" + filepath.Join(dir, "state") + "\"\nruntime_dir = \"" + filepath.Join(dir, "run") + "\"\n"
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	var logs testkit.SyncBuffer
	cmd := exec.Command(filepath.Join(dir, "rbee-hive"), "daemon", "--config", p)
	cmd.Stderr = &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	waitCLI(t, "hive listening", func() bool { return strings.Contains(logs.String(), "hive listening") })
	if !strings.Contains(logs.String(), "built-in backend unavailable") {
		t.Errorf("no warning about the missing simworker:\n%s", logs.String())
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("hive did not stop")
	}
	if cmd.ProcessState.ExitCode() != 0 {
		t.Errorf("exit %d\n%s", cmd.ProcessState.ExitCode(), logs.String())
	}
}
