package notify

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// serve runs l.Serve in the background, collecting messages.
type collector struct {
	ch chan Message
}

func serve(t *testing.T, l *Listener) *collector {
	t.Helper()
	c := &collector{ch: make(chan Message, 64)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- l.Serve(ctx, func(m Message) {
			select {
			case c.ch <- m.Clone():
			default:
			}
		})
	}()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil && !errors.Is(err, net.ErrClosed) {
				t.Errorf("Serve: %v", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("Serve did not return after cancel")
		}
		l.Close()
	})
	return c
}

func (c *collector) next(t *testing.T) Message {
	t.Helper()
	select {
	case m := <-c.ch:
		return m
	case <-time.After(5 * time.Second):
		t.Fatal("no message")
		return Message{}
	}
}

func (c *collector) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case m := <-c.ch:
		t.Fatalf("unexpected message %+v", m)
	case <-time.After(d):
	}
}

func tempListener(t *testing.T) (*Listener, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "run", "rbee-hive", "notify.sock")
	l, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	return l, path
}

func waitStats(t *testing.T, l *Listener, cond func(Stats) bool) Stats {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if s := l.Stats(); cond(s) {
			return s
		}
		time.Sleep(2 * time.Millisecond)
	}
	t.Fatalf("stats never matched: %+v", l.Stats())
	return Stats{}
}

func TestParse(t *testing.T) {
	tests := []struct {
		name string
		in   string
		want map[string]string
	}{
		{"ready", "READY=1", map[string]string{"READY": "1"}},
		{"heartbeat", "WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_TOKENS_PER_SEC=41.5\n", map[string]string{"WATCHDOG": "1", "RBEE_HEALTH": "healthy", "RBEE_TOKENS_PER_SEC": "41.5"}},
		{"value with = and spaces", "STATUS=a=b c ", map[string]string{"STATUS": "a=b c "}},
		{"empty value", "STATUS=", map[string]string{"STATUS": ""}},
		{"blank lines", "\n\nREADY=1\n\n", map[string]string{"READY": "1"}},
		{"last wins", "STATUS=a\nSTATUS=b", map[string]string{"STATUS": "b"}},
		{"unknown kept", "X_FOO=bar\nlower=ok", map[string]string{"X_FOO": "bar", "lower": "ok"}},
		{"utf8 status", "STATUS=ünïcode ✓", map[string]string{"STATUS": "ünïcode ✓"}},
		{"empty", "", nil},
		{"only newlines", "\n\n", nil},
		{"no equals", "READY", nil},
		{"one bad line", "READY=1\nWATCHDOG", nil},
		{"empty key", "=1", nil},
		{"space in key", "RE ADY=1", nil},
		{"dash in key", "X-Y=1", nil},
		{"key too long", strings.Repeat("K", MaxKeyLen+1) + "=1", nil},
		{"key at limit", strings.Repeat("K", MaxKeyLen) + "=1", map[string]string{strings.Repeat("K", MaxKeyLen): "1"}},
		{"NUL", "READY=1\x00", nil},
		{"invalid utf8", "STATUS=\xff\xfe", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := Parse([]byte(tt.in))
			if tt.want == nil {
				if err == nil || !errors.Is(err, ErrMalformed) {
					t.Fatalf("want ErrMalformed, got %v %v", got, err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !maps.Equal(got, tt.want) {
				t.Fatalf("got %v, want %v", got, tt.want)
			}
		})
	}
}

// TestFieldsReuse: one Fields parses message after message (as the receive
// loop does) with no state left over, keeps repeated keys in order with the
// last one winning in Lookup, and a failed parse leaves it empty.
func TestFieldsReuse(t *testing.T) {
	var f Fields
	steps := []struct {
		in      string
		ok      bool
		keys    []string
		lookups map[string]string // key → last value; "" with ok false: absent
	}{
		{"WATCHDOG=1\nSTATUS=a\nSTATUS=b=c\n", true, []string{"WATCHDOG", "STATUS", "STATUS"}, map[string]string{"STATUS": "b=c", "WATCHDOG": "1", "READY": ""}},
		{"READY=1", true, []string{"READY"}, map[string]string{"READY": "1", "STATUS": ""}},
		{"READY=1\nbad line", false, nil, map[string]string{"READY": ""}},
		{"\nX=\n", true, []string{"X"}, map[string]string{"X": ""}},
	}
	for i, st := range steps {
		err := f.Parse([]byte(st.in))
		if (err == nil) != st.ok {
			t.Fatalf("step %d: err %v", i, err)
		}
		if f.Len() != len(st.keys) {
			t.Fatalf("step %d: %d fields, want %d", i, f.Len(), len(st.keys))
		}
		for j, k := range st.keys {
			if string(f.Key(j)) != k {
				t.Fatalf("step %d: key %d %q, want %q", i, j, f.Key(j), k)
			}
		}
		for k, want := range st.lookups {
			v, ok := f.Lookup(k)
			if string(v) != want || ok != (want != "" || (st.ok && k == "X")) {
				t.Fatalf("step %d: Lookup(%s) = %q %v, want %q", i, k, v, ok, want)
			}
		}
	}
	if !f.Is("X", "") || f.Is("X", "1") {
		t.Fatal("Is")
	}
	c := f.Clone()
	f.Parse([]byte("Y=2"))
	if got := c.Map(); !maps.Equal(got, map[string]string{"X": ""}) {
		t.Fatalf("clone changed with its source: %v", got)
	}
}

// TestFieldsParseAllocs: parsing a heartbeat into a used Fields allocates
// nothing.
func TestFieldsParseAllocs(t *testing.T) {
	var f Fields
	msg := []byte("WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_BUSY=0\nSTATUS=serving\n")
	if n := testing.AllocsPerRun(100, func() {
		if err := f.Parse(msg); err != nil {
			t.Fatal(err)
		}
	}); n != 0 {
		t.Fatalf("%v allocations per parse, want 0", n)
	}
}

func FuzzParse(f *testing.F) {
	for _, s := range []string{"READY=1", "WATCHDOG=1\nRBEE_HEALTH=healthy\n", "STATUS=a=b", "", "\n", "=", "A=\x00", "K=\xff", "READY=1\nMAINPID=42", "BARRIER=1"} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		m, err := Parse(b)
		if err != nil {
			if m != nil || !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v with map %v", err, m)
			}
			return
		}
		if len(m) == 0 {
			t.Fatal("accepted with no fields")
		}
		// Re-serialise and parse again: the same map (order aside).
		var sb strings.Builder
		for k, v := range m {
			if !validKey([]byte(k)) || strings.ContainsAny(v, "\n\x00") {
				t.Fatalf("bad pair %q=%q", k, v)
			}
			sb.WriteString(k + "=" + v + "\n")
		}
		m2, err := Parse([]byte(sb.String()))
		if err != nil || !maps.Equal(m, m2) {
			t.Fatalf("round trip: %v %v vs %v", err, m2, m)
		}
	})
}

// TestSenders: every kind of sd_notify client reaches the socket, and the
// kernel-attested pid is the sending process.
func TestSenders(t *testing.T) {
	shell := func(script string) func(sock string) *exec.Cmd {
		return func(sock string) *exec.Cmd {
			c := exec.Command("/bin/sh", "-c", script)
			c.Env = []string{"NOTIFY_SOCKET=" + sock, "PATH=/usr/bin:/bin"}
			return c
		}
	}
	tests := []struct {
		name     string
		cmd      func(sock string) *exec.Cmd
		want     []map[string]string
		abstract bool
		needs    string
	}{
		{"worker package", func(sock string) *exec.Cmd { return helper("worker", "NOTIFY_SOCKET="+sock) }, []map[string]string{
			{"READY": "1"},
			{"WATCHDOG": "1", "RBEE_HEALTH": "degraded", "RBEE_TOKENS_PER_SEC": "12.5"},
			{"STOPPING": "1"},
		}, false, ""},
		{"worker package abstract", func(sock string) *exec.Cmd { return helper("worker", "NOTIFY_SOCKET="+sock) }, []map[string]string{
			{"READY": "1"}, {"WATCHDOG": "1", "RBEE_HEALTH": "degraded", "RBEE_TOKENS_PER_SEC": "12.5"}, {"STOPPING": "1"},
		}, true, ""},
		{"go-systemd SdNotify", func(sock string) *exec.Cmd { return helper("sdnotify", "NOTIFY_SOCKET="+sock) }, []map[string]string{
			{"READY": "1"}, {"WATCHDOG": "1", "RBEE_HEALTH": "healthy", "STATUS": "serving 3 requests"},
		}, false, ""},
		{"go-systemd SdNotify abstract", func(sock string) *exec.Cmd { return helper("sdnotify", "NOTIFY_SOCKET="+sock) }, []map[string]string{
			{"READY": "1"}, {"WATCHDOG": "1", "RBEE_HEALTH": "healthy", "STATUS": "serving 3 requests"},
		}, true, ""},
		// --pid=$$: the datagram carries the shell's credentials (we run as
		// root; see the package doc). --no-block skips BARRIER=1.
		{"systemd-notify --pid=$$", shell(`systemd-notify --pid=$$ --no-block --ready STATUS=loaded`), []map[string]string{
			{"READY": "1", "STATUS": "loaded", "MAINPID": "<pid>"},
		}, false, "/usr/bin/systemd-notify"},
		// Without --pid, systemd-notify (v252) claims its parent's pid: from
		// a shell that is the shell, which is what a worker wants.
		{"systemd-notify from a shell", shell(`systemd-notify --no-block WATCHDOG=1 RBEE_HEALTH=healthy; true`), []map[string]string{
			{"WATCHDOG": "1", "RBEE_HEALTH": "healthy"},
		}, false, "/usr/bin/systemd-notify"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.needs != "" {
				testkit.RequireCommand(t, tt.needs)
			}
			var l *Listener
			var sock string
			if tt.abstract {
				sock = fmt.Sprintf("@rbee-notify-test-%d-%d", os.Getpid(), time.Now().UnixNano())
				var err error
				if l, err = Listen(sock); err != nil {
					t.Fatal(err)
				}
			} else {
				l, sock = tempListener(t)
			}
			c := serve(t, l)
			cmd := tt.cmd(sock)
			if err := cmd.Run(); err != nil {
				t.Fatalf("sender: %v", err)
			}
			pid := int32(cmd.Process.Pid)
			for i, w := range tt.want {
				m := c.next(t)
				w = maps.Clone(w)
				if w["MAINPID"] == "<pid>" {
					w["MAINPID"] = fmt.Sprint(pid)
				}
				if !maps.Equal(m.Fields.Map(), w) {
					t.Fatalf("message %d: %v, want %v", i, m.Fields, w)
				}
				if m.PID != pid || m.UID != uint32(os.Getuid()) || m.GID != uint32(os.Getgid()) {
					t.Fatalf("message %d from pid %d uid %d gid %d, want pid %d uid %d", i, m.PID, m.UID, m.GID, pid, os.Getuid())
				}
				if time.Since(m.Received) > 10*time.Second || m.Received.After(time.Now()) {
					t.Fatalf("Received %v", m.Received)
				}
			}
			c.none(t, 50*time.Millisecond)
			s := l.Stats()
			if s.Delivered != uint64(len(tt.want)) || s.DroppedTotal() != 0 || s.Received != s.Delivered {
				t.Fatalf("stats %+v", s)
			}
		})
	}
}

// TestSystemdNotifyBarrier: plain `systemd-notify --ready` (v246+) follows
// with BARRIER=1 carrying a pipe fd and waits up to 5 s for the receiver to
// close it. Our control buffer only fits credentials, so the kernel never
// installs that fd here and closes it at once: the barrier completes fast
// and the hive leaks no fds.
func TestSystemdNotifyBarrier(t *testing.T) {
	testkit.RequireCommand(t, "/usr/bin/systemd-notify")
	l, sock := tempListener(t)
	c := serve(t, l)
	fdsBefore := countFDs(t)
	cmd := exec.Command("/bin/sh", "-c", "systemd-notify --pid=$$ --ready; true")
	cmd.Env = []string{"NOTIFY_SOCKET=" + sock, "PATH=/usr/bin:/bin"}
	start := time.Now()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("systemd-notify: %v %s", err, out)
	}
	if el := time.Since(start); el > 3*time.Second {
		t.Fatalf("systemd-notify took %v: barrier fd was not released", el)
	}
	ready, barrier := c.next(t), c.next(t)
	if ready.Fields.Map()["READY"] != "1" || ready.PID != int32(cmd.Process.Pid) {
		t.Fatalf("first: %+v, want READY=1 from the shell %d", ready, cmd.Process.Pid)
	}
	// BARRIER=1 comes from systemd-notify itself, not --pid.
	if barrier.Fields.Map()["BARRIER"] != "1" || barrier.PID == 0 {
		t.Fatalf("second: %+v, want BARRIER=1", barrier)
	}
	if after := countFDs(t); after > fdsBefore {
		t.Fatalf("fds %d -> %d: a passed fd leaked into the receiver", fdsBefore, after)
	}
}

// TestExecSystemdNotifyTrap documents a trap: `exec systemd-notify` makes
// systemd-notify claim its parent's pid, which is then the hive (or here,
// the test), not the worker, so the hive would reject it as unknown_sender.
func TestExecSystemdNotifyTrap(t *testing.T) {
	testkit.RequireCommand(t, "/usr/bin/systemd-notify")
	l, sock := tempListener(t)
	c := serve(t, l)
	cmd := exec.Command("/bin/sh", "-c", "exec systemd-notify --no-block WATCHDOG=1")
	cmd.Env = []string{"NOTIFY_SOCKET=" + sock, "PATH=/usr/bin:/bin"}
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	if m := c.next(t); m.PID != int32(os.Getpid()) {
		t.Fatalf("pid %d; expected systemd-notify to claim its parent %d", m.PID, os.Getpid())
	}
}

func countFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestDropped: size limit exactly at MaxDatagram (MSG_TRUNC detects the
// rest) and malformed payloads, each counted by reason, none delivered.
func TestDropped(t *testing.T) {
	l, sock := tempListener(t)
	c := serve(t, l)
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	pad := func(n int) string { return "STATUS=" + strings.Repeat("s", n-len("STATUS=")) }
	tests := []struct {
		name    string
		payload string
		reason  string // "" = delivered
	}{
		{"exactly 4096", pad(MaxDatagram), ""},
		{"4097", pad(MaxDatagram + 1), ReasonOversize},
		{"64 KiB", pad(64 << 10), ReasonOversize},
		{"empty datagram", "", ReasonMalformed},
		{"garbage", "\x01\x02\x03", ReasonMalformed},
		{"no equals", "READY", ReasonMalformed},
		{"ok after drops", "READY=1", ""},
	}
	var want Stats
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := conn.Write([]byte(tt.payload)); err != nil {
				t.Fatal(err)
			}
			want.Received++
			switch tt.reason {
			case "":
				want.Delivered++
				m := c.next(t)
				if len(tt.payload) == MaxDatagram && len(m.Fields.Map()["STATUS"]) != MaxDatagram-len("STATUS=") {
					t.Fatalf("4096-byte message truncated to %d", len(m.Fields.Map()["STATUS"]))
				}
			case ReasonOversize:
				want.Oversize++
			case ReasonMalformed:
				want.Malformed++
			}
			got := waitStats(t, l, func(s Stats) bool { return s.Received == want.Received })
			if got != want {
				t.Fatalf("stats %+v, want %+v", got, want)
			}
			if tt.reason != "" {
				c.none(t, 20*time.Millisecond)
				if got.Dropped()[tt.reason] == 0 {
					t.Fatalf("Dropped() %v lacks %s", got.Dropped(), tt.reason)
				}
			}
		})
	}
}

// TestNoCredentials: a receiver in its own pid namespace cannot name a
// sender outside it; the kernel attests pid 0 and the datagram is dropped
// as no_credentials, while one from inside the namespace is delivered.
// TestQueuedBatch: datagrams queued before Serve starts are read several
// per recvmmsg call; each is still judged on its own (a malformed and an
// oversize one among them are dropped and counted) and the rest arrive in
// order with their own fields.
func TestQueuedBatch(t *testing.T) {
	l, path := tempListener(t)
	conn, err := net.Dial("unixgram", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The kernel queues at most net.unix.max_dgram_qlen (default 10)
	// datagrams for a socket nobody reads; 10 span two batches.
	const n = 10
	want := []string{}
	for i := range n {
		msg := fmt.Sprintf("RBEE_SEQ=%d", i)
		switch i {
		case 3:
			msg = "not an assignment"
		case recvBatch + 1: // in the second batch
			msg = "STATUS=" + strings.Repeat("x", MaxDatagram)
		default:
			want = append(want, strconv.Itoa(i))
		}
		if _, err := conn.Write([]byte(msg)); err != nil {
			t.Fatal(err)
		}
	}
	c := serve(t, l)
	for _, w := range want {
		m := c.next(t)
		if got := m.Fields.Map()["RBEE_SEQ"]; got != w || m.PID != int32(os.Getpid()) {
			t.Fatalf("got seq %q from %d, want %s", got, m.PID, w)
		}
	}
	st := waitStats(t, l, func(s Stats) bool { return s.Received == n })
	if want := (Stats{Received: n, Delivered: n - 2, Malformed: 1, Oversize: 1}); st != want {
		t.Fatalf("stats %+v, want %+v", st, want)
	}
}

func TestNoCredentials(t *testing.T) {
	testkit.RequireCommand(t, "unshare")
	if err := exec.Command("unshare", "--pid", "--fork", "true").Run(); err != nil {
		testkit.Skip(t, "cannot create a pid namespace here: %v", err)
	}
	sock := filepath.Join(t.TempDir(), "ns.sock")
	cmd := exec.Command("unshare", "--pid", "--fork", os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=nsrecv", "NOTIFY_SOCKET="+sock)
	cmd.Stderr = os.Stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	rd := bufio.NewReader(stdout)
	if line, err := rd.ReadString('\n'); err != nil || line != "listening\n" {
		t.Fatalf("helper: %q %v", line, err)
	}
	conn, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write([]byte("WATCHDOG=1")); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	stdin.Write([]byte("go\n"))
	var res struct {
		Stats Stats
		Self  int
	}
	if err := json.NewDecoder(rd).Decode(&res); err != nil {
		t.Fatal(err)
	}
	cmd.Wait()
	want := Stats{Received: 2, Delivered: 1, NoCredentials: 1}
	if res.Stats != want {
		t.Fatalf("stats %+v, want %+v", res.Stats, want)
	}
	if res.Self != 1 {
		t.Fatalf("helper pid %d in its namespace, want 1 (not namespaced?)", res.Self)
	}
}

// TestFlood: 100 000 datagrams from one non-blocking sender. Every one is
// accounted for — delivered, dropped by reason, or refused by the kernel at
// the sender — and the receiver's heap stays bounded.
func TestFlood(t *testing.T) {
	const n = 100_000
	l, sock := tempListener(t)
	var delivered atomic.Uint64
	var lastSeq atomic.Value
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- l.Serve(ctx, func(m Message) {
			delivered.Add(1)
			v, _ := m.Fields.Lookup("RBEE_SEQ")
			lastSeq.Store(string(v))
		})
	}()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	heap0 := ms.HeapInuse
	var peak atomic.Uint64
	stopSample := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var ms runtime.MemStats
		for {
			select {
			case <-stopSample:
				return
			case <-time.After(20 * time.Millisecond):
			}
			runtime.ReadMemStats(&ms)
			if ms.HeapInuse > peak.Load() {
				peak.Store(ms.HeapInuse)
			}
		}
	}()
	cmd := helper("flood", "NOTIFY_SOCKET="+sock, fmt.Sprintf("FLOOD_N=%d", n))
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("flood sender: %v", err)
	}
	var res floodResult
	if err := json.Unmarshal(out, &res); err != nil {
		t.Fatalf("%q: %v", out, err)
	}
	expect := uint64(res.SentTotal - res.RefusedTotal)
	waitStats(t, l, func(s Stats) bool { return s.Received >= expect })
	close(stopSample)
	<-sampled
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	s := l.Stats()
	t.Logf("sent %d, refused at sender %d (%v), receiver %+v, heap in use %d KiB -> peak %d KiB",
		res.SentTotal, res.RefusedTotal, res.Refused, s, heap0>>10, peak.Load()>>10)
	if res.SentTotal != n {
		t.Fatalf("sent %d", res.SentTotal)
	}
	if s.Received != expect || s.Received != s.Delivered+s.DroppedTotal() || s.Delivered != delivered.Load() {
		t.Fatalf("accounting: sent %d refused %d, stats %+v, handler saw %d", res.SentTotal, res.RefusedTotal, s, delivered.Load())
	}
	if got := s.Delivered + s.DroppedTotal() + uint64(res.RefusedTotal); got != n {
		t.Fatalf("delivered+dropped+refused = %d, want %d", got, n)
	}
	for reason, got := range map[string]uint64{"ok": s.Delivered, ReasonOversize: s.Oversize, ReasonMalformed: s.Malformed} {
		if want := uint64(res.Sent[reason] - res.Refused[reason]); got != want {
			t.Fatalf("%s: receiver %d, sender accepted %d", reason, got, want)
		}
	}
	if s.NoCredentials != 0 || s.ReadErrors != 0 {
		t.Fatalf("unexpected drops %+v", s)
	}
	if p := peak.Load(); p > heap0+16<<20 {
		t.Fatalf("heap grew from %d KiB to %d KiB during the flood", heap0>>10, p>>10)
	}
}

func TestListen(t *testing.T) {
	t.Run("creates dir, mode 0660, Close removes", func(t *testing.T) {
		l, path := tempListener(t)
		fi, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != SocketMode {
			t.Fatalf("mode %v", fi.Mode())
		}
		if l.Addr() != path {
			t.Fatalf("Addr %q", l.Addr())
		}
		if err := l.Close(); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(path); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("socket file left: %v", err)
		}
	})
	t.Run("stale socket replaced", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "s.sock")
		old, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		old.Close() // file stays: a hive that crashed
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		if m := readyRoundTrip(t, serve(t, l), path); m.Fields.Map()["READY"] != "1" || m.PID != int32(os.Getpid()) {
			t.Fatalf("%+v", m)
		}
	})
	t.Run("live socket refused", func(t *testing.T) {
		l, path := tempListener(t)
		defer l.Close()
		if l2, err := Listen(path); err == nil {
			l2.Close()
			t.Fatal("second Listen on a live socket succeeded")
		}
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("live socket removed: %v", err)
		}
	})
	t.Run("regular file refused", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "file")
		os.WriteFile(path, []byte("keep"), 0o644)
		if _, err := Listen(path); err == nil {
			t.Fatal("Listen over a regular file succeeded")
		}
		if b, _ := os.ReadFile(path); string(b) != "keep" {
			t.Fatal("regular file clobbered")
		}
	})
	t.Run("Close keeps a replaced file", func(t *testing.T) {
		l, path := tempListener(t)
		os.Remove(path)
		other, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
		if err != nil {
			t.Fatal(err)
		}
		defer other.Close()
		l.Close()
		if _, err := os.Stat(path); err != nil {
			t.Fatalf("Close removed a socket it did not create: %v", err)
		}
	})
	t.Run("Serve returns on ctx end", func(t *testing.T) {
		l, _ := tempListener(t)
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		start := time.Now()
		if err := l.Serve(ctx, func(Message) {}); err != nil {
			t.Fatal(err)
		}
		if el := time.Since(start); el > 2*time.Second {
			t.Fatalf("Serve returned after %v", el)
		}
		// and can serve again
		readyRoundTrip(t, serve(t, l), l.Addr())
	})
	t.Run("Serve on a closed listener errors", func(t *testing.T) {
		l, _ := tempListener(t)
		l.Close()
		if err := l.Serve(context.Background(), func(Message) {}); err == nil {
			t.Fatal("want error")
		}
	})
}

func TestFromFile(t *testing.T) {
	dir := t.TempDir()
	tests := []struct {
		name    string
		typ     int
		wantErr bool
	}{
		{"unixgram", unix.SOCK_DGRAM, false},
		{"stream socket refused", unix.SOCK_STREAM, true},
		{"seqpacket refused", unix.SOCK_SEQPACKET, true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(dir, fmt.Sprintf("%d.sock", i))
			fd, err := unix.Socket(unix.AF_UNIX, tt.typ|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Bind(fd, &unix.SockaddrUnix{Name: path}); err != nil {
				t.Fatal(err)
			}
			if tt.typ != unix.SOCK_DGRAM {
				unix.Listen(fd, 1)
			}
			f := os.NewFile(uintptr(fd), path)
			l, err := FromFile(f)
			f.Close()
			if tt.wantErr {
				if err == nil {
					l.Close()
					t.Fatal("want error")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m := readyRoundTrip(t, serve(t, l), path); m.PID != int32(os.Getpid()) {
				t.Fatalf("SO_PASSCRED not set on a handed-over socket: pid %d", m.PID)
			}
			l.Close()
			if _, err := os.Stat(path); err != nil {
				t.Fatal("Close removed a socket it did not create")
			}
		})
	}
}

// TestSocketActivation: a systemd-owned socket (here systemd-socket-activate,
// as a .socket unit would) queues datagrams while no hive runs, and the hive
// started on it takes it over via FromActivation. Finding: a datagram queued
// before anyone set SO_PASSCRED carries no credentials and is dropped as
// no_credentials, so such a .socket unit needs PassCredentials=yes
// (systemd-socket-activate cannot set it).
func TestSocketActivation(t *testing.T) {
	bin := testkit.RequireCommand(t, "systemd-socket-activate")
	path := filepath.Join(t.TempDir(), "activated.sock")
	cmd := exec.Command(bin, "--datagram", "-l", path, "-E", helperEnv+"=activated", os.Args[0], "-test.run=^$")
	stderr, _ := cmd.StderrPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	if line, err := bufio.NewReader(stderr).ReadString('\n'); err != nil || !strings.HasPrefix(line, "Listening on") {
		t.Fatalf("systemd-socket-activate: %q %v", line, err)
	}
	send := func(s string) {
		t.Helper()
		conn, err := net.Dial("unixgram", path)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if _, err := conn.Write([]byte(s)); err != nil {
			t.Fatal(err)
		}
	}
	send("READY=1") // queued while nothing reads; this starts the hive
	rd := bufio.NewReader(stdout)
	if line, err := rd.ReadString('\n'); err != nil || line != "serving\n" {
		t.Fatalf("activated hive: %q %v", line, err)
	}
	send("WATCHDOG=1\nRBEE_HEALTH=healthy")
	var res struct {
		PID    int32
		Fields map[string]string
		Stats  Stats
	}
	if err := json.NewDecoder(rd).Decode(&res); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("activated hive: %v", err)
	}
	if res.PID != int32(os.Getpid()) || res.Fields["RBEE_HEALTH"] != "healthy" {
		t.Fatalf("got %+v, want the heartbeat from pid %d", res, os.Getpid())
	}
	if want := (Stats{Received: 2, Delivered: 1, NoCredentials: 1}); res.Stats != want {
		t.Fatalf("stats %+v, want %+v", res.Stats, want)
	}
}

// readyRoundTrip sends READY=1 to the socket at path and returns what c
// received.
func readyRoundTrip(t *testing.T, c *collector, path string) Message {
	t.Helper()
	conn, err := net.Dial("unixgram", path)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte("READY=1")); err != nil {
		t.Fatal(err)
	}
	return c.next(t)
}
