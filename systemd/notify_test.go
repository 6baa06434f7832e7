package systemd

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// fakeManager is a real unixgram socket playing systemd's notify socket. Like
// systemd it sets SO_PASSCRED, so every datagram carries the sender's pid.
type fakeManager struct {
	addr string
	msgs chan notifyMsg
}

type notifyMsg struct {
	payload string
	pid     int32
	at      time.Time
}

func newFakeManager(t *testing.T, abstract bool) *fakeManager {
	t.Helper()
	addr := filepath.Join(t.TempDir(), "notify")
	if abstract {
		addr = "@rbee-test-notify-" + strconv.Itoa(os.Getpid()) + "-" + strconv.FormatInt(time.Now().UnixNano(), 36)
	}
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatalf("listen %s: %v", addr, err)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		serr = syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_PASSCRED, 1)
	}); err != nil || serr != nil {
		t.Fatalf("SO_PASSCRED: %v %v", err, serr)
	}
	m := &fakeManager{addr: addr, msgs: make(chan notifyMsg, 1024)}
	done := make(chan struct{})
	t.Cleanup(func() { conn.Close(); <-done })
	go func() {
		defer close(done)
		buf, oob := make([]byte, 4096), make([]byte, 1024)
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			msg := notifyMsg{payload: string(buf[:n]), at: time.Now()}
			if cmsgs, err := syscall.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, c := range cmsgs {
					if cred, err := syscall.ParseUnixCredentials(&c); err == nil {
						msg.pid = cred.Pid
					}
				}
			}
			m.msgs <- msg
		}
	}()
	return m
}

// next returns the next datagram or fails after d.
func (m *fakeManager) next(t *testing.T, d time.Duration) notifyMsg {
	t.Helper()
	select {
	case msg := <-m.msgs:
		return msg
	case <-time.After(d):
		t.Fatalf("no datagram within %v", d)
		return notifyMsg{}
	}
}

// none asserts that nothing arrives for d.
func (m *fakeManager) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case msg := <-m.msgs:
		t.Fatalf("unexpected datagram %q", msg.payload)
	case <-time.After(d):
	}
}

// underSystemd sets the environment systemd gives a Type=notify service and
// returns a Notifier built from it.
func underSystemd(t *testing.T, m *fakeManager, watchdog time.Duration) *Notifier {
	t.Helper()
	t.Setenv("NOTIFY_SOCKET", m.addr)
	if watchdog > 0 {
		t.Setenv("WATCHDOG_USEC", strconv.FormatInt(watchdog.Microseconds(), 10))
		t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	} else {
		t.Setenv("WATCHDOG_USEC", "")
		t.Setenv("WATCHDOG_PID", "")
	}
	n, err := NewNotifier(nil)
	if err != nil {
		t.Fatalf("NewNotifier: %v", err)
	}
	return n
}

func TestNotifierMessages(t *testing.T) {
	for _, abstract := range []bool{false, true} {
		name := map[bool]string{false: "path", true: "abstract"}[abstract]
		t.Run(name, func(t *testing.T) {
			m := newFakeManager(t, abstract)
			n := underSystemd(t, m, 0)
			// The Notifier must not depend on the environment after
			// construction: the hive may scrub it for its children.
			os.Unsetenv("NOTIFY_SOCKET")

			steps := []struct {
				name string
				call func() error
				want string // "" = nothing sent
			}{
				{"ready", n.Ready, "READY=1"},
				{"status", func() error { return n.Status("2 workers running") }, "STATUS=2 workers running"},
				{"status repeated", func() error { return n.Status("2 workers running") }, ""},
				{"status changed", func() error { return n.Status("1 worker running") }, "STATUS=1 worker running"},
				{"status back", func() error { return n.Status("2 workers running") }, "STATUS=2 workers running"},
				{"status newline", func() error { return n.Status("a\nREADY=1") }, "STATUS=a READY=1"},
				{"extend", func() error { return n.ExtendTimeout(90 * time.Second) }, "EXTEND_TIMEOUT_USEC=90000000"},
				{"stopping", n.Stopping, "STOPPING=1"},
			}
			for _, s := range steps {
				if err := s.call(); err != nil {
					t.Fatalf("%s: %v", s.name, err)
				}
				if s.want == "" {
					m.none(t, 50*time.Millisecond)
					continue
				}
				got := m.next(t, 2*time.Second)
				if got.payload != s.want {
					t.Fatalf("%s: got %q, want %q", s.name, got.payload, s.want)
				}
				// NotifyAccess=main: the datagram must come from the hive's own pid.
				if got.pid != int32(os.Getpid()) {
					t.Fatalf("%s: sender pid %d, want %d", s.name, got.pid, os.Getpid())
				}
			}
			if err := n.ExtendTimeout(0); err == nil {
				t.Fatal("ExtendTimeout(0) succeeded")
			}
		})
	}
}

func TestNotifierWithoutSystemd(t *testing.T) {
	m := newFakeManager(t, false)
	t.Setenv("NOTIFY_SOCKET", "")
	// A watchdog without a socket must not start pinging anything.
	t.Setenv("WATCHDOG_USEC", "100000")
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	n, err := NewNotifier(nil)
	if err != nil {
		t.Fatal(err)
	}
	if n.Enabled() || n.WatchdogTimeout() != 0 {
		t.Fatalf("Enabled=%v WatchdogTimeout=%v without NOTIFY_SOCKET", n.Enabled(), n.WatchdogTimeout())
	}
	for _, call := range []func() error{n.Ready, n.Stopping, func() error { return n.Status("x") }, func() error { return n.ExtendTimeout(time.Second) }} {
		if err := call(); err != nil {
			t.Fatalf("call without systemd: %v", err)
		}
	}
	start := time.Now()
	if err := n.RunWatchdog(t.Context(), func(context.Context) error { return nil }); err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > time.Second {
		t.Fatalf("RunWatchdog without systemd took %v, want immediate return", d)
	}
	m.none(t, 200*time.Millisecond)
}

func TestNotifierEnvironment(t *testing.T) {
	tests := []struct {
		name         string
		socket       string
		usec, pid    string
		wantErr      bool
		wantWatchdog time.Duration
	}{
		{name: "watchdog for us", socket: "/run/x", usec: "30000000", pid: "self", wantWatchdog: 30 * time.Second},
		{name: "watchdog without pid", socket: "/run/x", usec: "20000000", wantWatchdog: 20 * time.Second},
		{name: "watchdog for another pid", socket: "/run/x", usec: "30000000", pid: "1"},
		{name: "no watchdog", socket: "/run/x"},
		{name: "bad usec", socket: "/run/x", usec: "abc", wantErr: true},
		{name: "vsock", socket: "vsock:2:1234", wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("NOTIFY_SOCKET", tt.socket)
			t.Setenv("WATCHDOG_USEC", tt.usec)
			pid := tt.pid
			if pid == "self" {
				pid = strconv.Itoa(os.Getpid())
			}
			t.Setenv("WATCHDOG_PID", pid)
			n, err := NewNotifier(nil)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if err == nil && n.WatchdogTimeout() != tt.wantWatchdog {
				t.Fatalf("WatchdogTimeout = %v, want %v", n.WatchdogTimeout(), tt.wantWatchdog)
			}
		})
	}
}

func TestWatchdogCadence(t *testing.T) {
	const timeout = 400 * time.Millisecond // pings every 200ms
	m := newFakeManager(t, false)
	n := underSystemd(t, m, timeout)
	var calls atomic.Int64
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- n.RunWatchdog(ctx, func(context.Context) error { calls.Add(1); return nil })
	}()

	var pings []time.Time
	deadline := time.After(2100 * time.Millisecond)
collect:
	for {
		select {
		case msg := <-m.msgs:
			if msg.payload != "WATCHDOG=1" {
				t.Fatalf("unexpected datagram %q", msg.payload)
			}
			pings = append(pings, msg.at)
		case <-deadline:
			break collect
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("RunWatchdog: %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("RunWatchdog did not return after cancel")
	}
	// 2.1s at 200ms: 11 pings (one at start). Allow scheduling slack on
	// shared CI cores, but never as few as one per timeout.
	if len(pings) < 8 || len(pings) > 13 {
		t.Fatalf("%d pings in 2.1s, want about 11", len(pings))
	}
	for i := 1; i < len(pings); i++ {
		if gap := pings[i].Sub(pings[i-1]); gap >= timeout {
			t.Fatalf("gap %v between pings %d and %d reaches the watchdog timeout %v", gap, i-1, i, timeout)
		}
	}
	if c := calls.Load(); c < int64(len(pings)) {
		t.Fatalf("%d pings but only %d alive checks: pings must follow checks", len(pings), c)
	}
}

func TestWatchdogWedgedLoop(t *testing.T) {
	const timeout = 400 * time.Millisecond
	tests := []struct {
		name string
		// alive for the wedged phase; release ends the phase.
		alive func(release <-chan struct{}) func(context.Context) error
	}{
		{"hangs ignoring ctx", func(release <-chan struct{}) func(context.Context) error {
			return func(context.Context) error { <-release; return nil }
		}},
		{"answers late", func(release <-chan struct{}) func(context.Context) error {
			return func(context.Context) error { time.Sleep(timeout / 2); return nil }
		}},
		{"fails", func(release <-chan struct{}) func(context.Context) error {
			return func(context.Context) error { return errors.New("reconcile stuck") }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newFakeManager(t, false)
			n := underSystemd(t, m, timeout)
			var wedged atomic.Bool
			release := make(chan struct{})
			bad := tt.alive(release)
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			go n.RunWatchdog(ctx, func(ctx context.Context) error {
				if wedged.Load() {
					return bad(ctx)
				}
				return nil
			})

			if msg := m.next(t, timeout); msg.payload != "WATCHDOG=1" {
				t.Fatalf("got %q, want WATCHDOG=1", msg.payload)
			}
			wedged.Store(true)
			// A ping for a check already under way may still arrive.
			time.Sleep(timeout / 2)
			drain(m)
			// Three timeouts without a single ping: systemd would have
			// fired the watchdog.
			m.none(t, 3*timeout)

			wedged.Store(false)
			close(release)
			for range 3 {
				if msg := m.next(t, 2*timeout); msg.payload != "WATCHDOG=1" {
					t.Fatalf("after recovery got %q, want WATCHDOG=1", msg.payload)
				}
			}
		})
	}
}

func drain(m *fakeManager) {
	for {
		select {
		case <-m.msgs:
		default:
			return
		}
	}
}

func TestKeepExtending(t *testing.T) {
	m := newFakeManager(t, false)
	n := underSystemd(t, m, 0)
	ctx, cancel := context.WithTimeout(t.Context(), 450*time.Millisecond)
	defer cancel()
	n.KeepExtending(ctx, 200*time.Millisecond) // now, 100ms, 200ms, 300ms, 400ms
	time.Sleep(100 * time.Millisecond)         // let the reader catch up
	got := 0
	for {
		select {
		case msg := <-m.msgs:
			if msg.payload != "EXTEND_TIMEOUT_USEC=200000" {
				t.Fatalf("got %q", msg.payload)
			}
			got++
			continue
		default:
		}
		break
	}
	if got < 3 || got > 6 {
		t.Fatalf("%d extensions in 450ms at 100ms, want about 5", got)
	}
}

// A manager that reads nothing (PID 1 busy, its queue full) must not block
// a send for good: STOPPING=1 comes first in the hive's shutdown.
func TestNotifierSendBounded(t *testing.T) {
	addr := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: addr, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close() // never read
	t.Setenv("NOTIFY_SOCKET", addr)
	n, err := NewNotifier(nil)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		for i := 0; i < 100000; i++ {
			if err := n.Status(strconv.Itoa(i)); err != nil {
				done <- err
				return
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err == nil {
			testkit.Skip(t, "the socket's queue never filled")
		}
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("send to a full queue = %v, want a deadline error", err)
		}
	case <-time.After(notifySendTimeout + 10*time.Second):
		t.Fatal("sd_notify blocked on a manager that reads nothing")
	}
}
