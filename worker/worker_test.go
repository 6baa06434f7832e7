package worker

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// receiver is a minimal hive-side socket (SO_PASSCRED) so these tests do not
// depend on supervisor/notify.
type receiver struct {
	conn *net.UnixConn
}

func listen(t *testing.T, name string) *receiver {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	raw, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatal(err, serr)
	}
	return &receiver{conn: c}
}

func (r *receiver) recv(t *testing.T, timeout time.Duration) (string, int32) {
	t.Helper()
	buf := make([]byte, 8192)
	oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
	r.conn.SetReadDeadline(time.Now().Add(timeout))
	n, oobn, _, _, err := r.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatalf("recv: %v", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		t.Fatalf("control messages: %v %d", err, len(msgs))
	}
	cred, err := unix.ParseUnixCredentials(&msgs[0])
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n]), cred.Pid
}

func (r *receiver) none(t *testing.T, within time.Duration) {
	t.Helper()
	buf := make([]byte, 8192)
	r.conn.SetReadDeadline(time.Now().Add(within))
	if n, _, err := r.conn.ReadFromUnix(buf); err == nil {
		t.Fatalf("unexpected datagram %q", buf[:n])
	}
}

func sockPath(t *testing.T) string { return filepath.Join(t.TempDir(), "notify.sock") }

func TestParseEnv(t *testing.T) {
	me := strconv.Itoa(os.Getpid())
	tests := []struct {
		name    string
		env     map[string]string
		want    Env
		mode    Mode
		every   time.Duration
		wantErr bool
	}{
		{"empty", nil, Env{}, ModeNone, DefaultHeartbeatInterval, false},
		{"socket", map[string]string{"NOTIFY_SOCKET": "/run/x.sock", "WATCHDOG_USEC": "60000000", "RBEE_WORKER_ID": "w-1"},
			Env{WorkerID: "w-1", NotifySocket: "/run/x.sock", Watchdog: time.Minute}, ModeSocket, 30 * time.Second, false},
		{"abstract", map[string]string{"NOTIFY_SOCKET": "@hive"}, Env{NotifySocket: "@hive"}, ModeSocket, DefaultHeartbeatInterval, false},
		{"socket wins over http", map[string]string{"NOTIFY_SOCKET": "/s", "RBEE_HIVE_URL": "http://h", "RBEE_WORKER_TOKEN": "t"},
			Env{NotifySocket: "/s", HiveURL: "http://h", Token: "t"}, ModeSocket, DefaultHeartbeatInterval, false},
		{"http", map[string]string{"RBEE_HIVE_URL": "http://h", "RBEE_WORKER_TOKEN": "t", "WATCHDOG_USEC": "2000000"},
			Env{HiveURL: "http://h", Token: "t", Watchdog: 2 * time.Second}, ModeHTTP, time.Second, false},
		{"http without token is none", map[string]string{"RBEE_HIVE_URL": "http://h"}, Env{HiveURL: "http://h"}, ModeNone, DefaultHeartbeatInterval, false},
		{"watchdog pid is us", map[string]string{"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": me}, Env{Watchdog: time.Second}, ModeNone, 500 * time.Millisecond, false},
		{"watchdog pid is another", map[string]string{"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}, Env{}, ModeNone, DefaultHeartbeatInterval, false},
		{"bad usec", map[string]string{"WATCHDOG_USEC": "soon"}, Env{}, ModeNone, 0, true},
		{"zero usec", map[string]string{"WATCHDOG_USEC": "0"}, Env{}, ModeNone, 0, true},
		{"negative usec", map[string]string{"WATCHDOG_USEC": "-5"}, Env{}, ModeNone, 0, true},
		{"huge usec", map[string]string{"WATCHDOG_USEC": "99999999999999999"}, Env{}, ModeNone, 0, true},
		{"relative socket", map[string]string{"NOTIFY_SOCKET": "rel.sock"}, Env{}, ModeNone, 0, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseEnv(func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok })
			if tt.wantErr {
				if err == nil {
					t.Fatalf("want error, got %+v", got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tt.want {
				t.Fatalf("got %+v, want %+v", got, tt.want)
			}
			if got.Mode() != tt.mode {
				t.Fatalf("mode %v, want %v", got.Mode(), tt.mode)
			}
			if got.HeartbeatInterval() != tt.every {
				t.Fatalf("interval %v, want %v", got.HeartbeatInterval(), tt.every)
			}
		})
	}
}

func TestSocketMessages(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name string
		send func(n *Notifier) error
		want string
	}{
		{"ready", func(n *Notifier) error { return n.Ready(ctx, ReadyInfo{URL: "http://x"}) }, "READY=1"},
		{"status", func(n *Notifier) error { return n.Status(ctx, "loading\nlayer 3") }, "STATUS=loading layer 3"},
		{"stopping", func(n *Notifier) error { return n.Stopping(ctx) }, "STOPPING=1"},
		{"long status cut to fit", func(n *Notifier) error { return n.Status(ctx, strings.Repeat("é", MaxDatagram)) },
			"STATUS=" + strings.Repeat("é", (MaxDatagram-len("STATUS="))/2)},
		{"heartbeat default healthy", func(n *Notifier) error { return n.Heartbeat(ctx, Health{}) }, "WATCHDOG=1\nRBEE_HEALTH=healthy"},
		{"heartbeat degraded figures", func(n *Notifier) error {
			return n.Heartbeat(ctx, Health{Status: Degraded, Figures: map[string]string{
				"tokens_per_sec": "41.5", "RBEE_VRAM_BYTES": "123", "bad key": "x", "RBEE_NL": "a\nb", "RBEE_HEALTH": "healthy",
			}})
		}, "WATCHDOG=1\nRBEE_HEALTH=degraded\nRBEE_VRAM_BYTES=123\nRBEE_TOKENS_PER_SEC=41.5"},
		{"unknown status is healthy", func(n *Notifier) error { return n.Heartbeat(ctx, Health{Status: "meh"}) }, "WATCHDOG=1\nRBEE_HEALTH=healthy"},
		// The hive drops a whole datagram that is not UTF-8 or has a key over
		// 64 bytes, so such figures must not cost the heartbeat.
		{"heartbeat skips figures the hive would refuse", func(n *Notifier) error {
			return n.Heartbeat(ctx, Health{Figures: map[string]string{
				"RBEE_BIN": "caf\xe9", strings.Repeat("K", 60): "1", "ok": "1",
			}})
		}, "WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_OK=1"},
		{"status not UTF-8", func(n *Notifier) error { return n.Status(ctx, "caf\xe9 ok") }, "STATUS=caf\uFFFD ok"},
	}
	for _, abstract := range []bool{false, true} {
		for _, tt := range tests {
			t.Run(fmt.Sprintf("%s/abstract=%v", tt.name, abstract), func(t *testing.T) {
				name := sockPath(t)
				if abstract {
					name = fmt.Sprintf("@rbee-worker-test-%d-%d", os.Getpid(), time.Now().UnixNano())
				}
				r := listen(t, name)
				n := New(Env{NotifySocket: name})
				if err := tt.send(n); err != nil {
					t.Fatal(err)
				}
				got, pid := r.recv(t, 2*time.Second)
				if got != tt.want {
					t.Fatalf("got %q, want %q", got, tt.want)
				}
				if pid != int32(os.Getpid()) {
					t.Fatalf("pid %d, want %d", pid, os.Getpid())
				}
			})
		}
	}
}

// TestSameBytesAsSdNotify: for the same state both clients put the same
// bytes on the wire, and both reach the same socket (path and abstract).
func TestSameBytesAsSdNotify(t *testing.T) {
	for _, name := range []string{"", fmt.Sprintf("@rbee-sdcompat-%d", os.Getpid())} {
		if name == "" {
			name = sockPath(t)
		}
		r := listen(t, name)
		t.Setenv("NOTIFY_SOCKET", name)
		for _, state := range []string{daemon.SdNotifyReady, daemon.SdNotifyWatchdog, "STATUS=x y", daemon.SdNotifyStopping} {
			sent, err := daemon.SdNotify(false, state)
			if !sent || err != nil {
				t.Fatalf("SdNotify: %v %v", sent, err)
			}
			theirs, _ := r.recv(t, 2*time.Second)
			n, err := FromEnv()
			if err != nil {
				t.Fatal(err)
			}
			if err := n.Notify(context.Background(), state); err != nil {
				t.Fatal(err)
			}
			ours, _ := r.recv(t, 2*time.Second)
			if ours != theirs || ours != state {
				t.Fatalf("%s: ours %q, go-systemd %q", name, ours, theirs)
			}
		}
	}
}

func TestNoHive(t *testing.T) {
	ctx := context.Background()
	t.Run("no socket is silent", func(t *testing.T) {
		n := New(Env{})
		for _, err := range []error{n.Ready(ctx, ReadyInfo{}), n.Status(ctx, "x"), n.Stopping(ctx), n.Heartbeat(ctx, Health{}), n.Notify(ctx, "READY=1")} {
			if err != nil {
				t.Fatal(err)
			}
		}
		done := make(chan error, 1)
		go func() { done <- n.RunHeartbeat(ctx, nil, nil) }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(2 * time.Second):
			t.Fatal("RunHeartbeat with no hive should return at once")
		}
	})
	stale := sockPath(t)
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: stale, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	c.Close() // the file stays: a hive that died without cleaning up
	if _, err := os.Stat(stale); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name  string
		path  string
		errno syscall.Errno
	}{
		{"missing socket file", filepath.Join(t.TempDir(), "gone.sock"), syscall.ENOENT},
		{"stale socket file", stale, syscall.ECONNREFUSED},
		{"abstract nobody bound", fmt.Sprintf("@rbee-nobody-%d", os.Getpid()), syscall.ECONNREFUSED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			n := New(Env{NotifySocket: tt.path})
			err := n.Ready(ctx, ReadyInfo{})
			if !errors.Is(err, ErrHiveUnavailable) || !errors.Is(err, tt.errno) {
				t.Fatalf("got %v, want ErrHiveUnavailable wrapping %v", err, tt.errno)
			}
		})
	}
}

func TestOversizeRefused(t *testing.T) {
	r := listen(t, sockPath(t))
	n := New(Env{NotifySocket: r.conn.LocalAddr().String()})
	if err := n.Notify(context.Background(), "STATUS="+strings.Repeat("x", MaxDatagram)); err == nil {
		t.Fatal("want error for an oversize message")
	}
	r.none(t, 100*time.Millisecond)
	big := map[string]string{}
	for i := range 200 {
		big[fmt.Sprintf("RBEE_F%03d", i)] = strings.Repeat("9", 30)
	}
	msg := HeartbeatMessage(Healthy, big)
	if len(msg) > MaxDatagram || !strings.HasPrefix(msg, "WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_F000=") {
		t.Fatalf("trimmed heartbeat: %d bytes, starts %q", len(msg), msg[:40])
	}
}

// TestHeartbeatLoop: first beat at once, then every WATCHDOG_USEC/2, the
// health callback is asked each time, and the loop survives the hive going
// away and coming back.
func TestHeartbeatLoop(t *testing.T) {
	path := sockPath(t)
	r := listen(t, path)
	n := New(Env{NotifySocket: path, Watchdog: 200 * time.Millisecond})
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	calls := 0
	var errs []error
	done := make(chan error, 1)
	start := time.Now()
	go func() {
		done <- n.RunHeartbeat(ctx, func(context.Context) Health {
			mu.Lock()
			defer mu.Unlock()
			calls++
			st := Healthy
			if calls%2 == 0 {
				st = Degraded
			}
			return Health{Status: st, Figures: map[string]string{"beat": strconv.Itoa(calls)}}
		}, func(err error) { mu.Lock(); errs = append(errs, err); mu.Unlock() })
	}()
	for i := 1; i <= 3; i++ {
		got, _ := r.recv(t, 2*time.Second)
		st := "healthy"
		if i%2 == 0 {
			st = "degraded"
		}
		if want := fmt.Sprintf("WATCHDOG=1\nRBEE_HEALTH=%s\nRBEE_BEAT=%d", st, i); got != want {
			t.Fatalf("beat %d: %q, want %q", i, got, want)
		}
		if i == 1 && time.Since(start) > 80*time.Millisecond {
			t.Fatalf("first heartbeat took %v, want immediate", time.Since(start))
		}
	}
	if el := time.Since(start); el < 180*time.Millisecond {
		t.Fatalf("3 beats in %v: interval shorter than 100ms", el)
	}
	// Hive restarts: socket gone for a while, then bound again.
	r.conn.Close()
	os.Remove(path)
	time.Sleep(250 * time.Millisecond)
	r2 := listen(t, path)
	if got, _ := r2.recv(t, 2*time.Second); !strings.HasPrefix(got, "WATCHDOG=1\n") {
		t.Fatalf("after restart: %q", got)
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("loop did not stop with ctx")
	}
	mu.Lock()
	defer mu.Unlock()
	if len(errs) == 0 {
		t.Fatal("want errors reported while the hive was away")
	}
	for _, err := range errs {
		if !errors.Is(err, ErrHiveUnavailable) {
			t.Fatalf("unexpected error kind: %v", err)
		}
	}
}

func TestHTTPFallback(t *testing.T) {
	type got struct {
		path, auth, ctype string
		body              map[string]any
	}
	reqs := make(chan got, 16)
	status := http.StatusOK
	var mu sync.Mutex
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		var m map[string]any
		if err := json.Unmarshal(b, &m); err != nil {
			t.Errorf("body %q: %v", b, err)
		}
		reqs <- got{r.URL.Path, r.Header.Get("Authorization"), r.Header.Get("Content-Type"), m}
		mu.Lock()
		defer mu.Unlock()
		w.WriteHeader(status)
	}))
	defer srv.Close()
	env, err := ParseEnv(func(k string) (string, bool) {
		v, ok := map[string]string{EnvHiveURL: srv.URL + "/", EnvWorkerToken: "s3cret", EnvWorkerID: "w-abc", EnvWatchdogUSec: "200000"}[k]
		return v, ok
	})
	if err != nil {
		t.Fatal(err)
	}
	n := New(env)
	fixed := time.Date(2026, 11, 27, 10, 0, 0, 0, time.FixedZone("x", 3600))
	n.now = func() time.Time { return fixed }
	ctx := context.Background()

	if err := n.Ready(ctx, ReadyInfo{URL: "http://127.0.0.1:8081", ModelRef: "hf:x/y", Backend: "cpu", Device: 1}); err != nil {
		t.Fatal(err)
	}
	r := <-reqs
	wantReady := map[string]any{"worker_id": "w-abc", "url": "http://127.0.0.1:8081", "model_ref": "hf:x/y", "backend": "cpu", "device": float64(1)}
	if r.path != "/v1/workers/ready" || r.auth != "Bearer s3cret" || r.ctype != "application/json" || fmt.Sprint(r.body) != fmt.Sprint(wantReady) {
		t.Fatalf("ready: %+v", r)
	}
	if err := n.Heartbeat(ctx, Health{Status: Degraded}); err != nil {
		t.Fatal(err)
	}
	r = <-reqs
	wantHB := map[string]any{"worker_id": "w-abc", "timestamp": "2026-11-27T09:00:00Z", "health_status": "degraded"}
	if r.path != "/v1/heartbeat" || r.auth != "Bearer s3cret" || fmt.Sprint(r.body) != fmt.Sprint(wantHB) {
		t.Fatalf("heartbeat: %+v", r)
	}
	if err := n.Status(ctx, "x"); err != nil {
		t.Fatal(err)
	}
	if err := n.Stopping(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-reqs:
		t.Fatalf("status/stopping must not POST over HTTP: %+v", r)
	default:
	}
	for _, tc := range []struct {
		code        int
		unavailable bool
	}{{401, false}, {404, false}, {503, true}} {
		mu.Lock()
		status = tc.code
		mu.Unlock()
		err := n.Heartbeat(ctx, Health{})
		<-reqs
		if err == nil || errors.Is(err, ErrHiveUnavailable) != tc.unavailable || !strings.Contains(err.Error(), strconv.Itoa(tc.code)) {
			t.Fatalf("status %d: %v", tc.code, err)
		}
	}
	srv.Close()
	if err := n.Heartbeat(ctx, Health{}); !errors.Is(err, ErrHiveUnavailable) {
		t.Fatalf("hive down: %v", err)
	}
}
