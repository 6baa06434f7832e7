package systemd

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/systemd/journaltest"
)

// Every test in this package runs in a private mount namespace so that the
// journald tests own /run/systemd/journal (see journaltest).
func TestMain(m *testing.M) { os.Exit(journaltest.Main(m)) }

// waitDropped polls until the drop counter reaches want (the sender goroutine
// counts failed sends asynchronously).
func waitDropped(t *testing.T, dropped func() uint64, want uint64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for dropped() < want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if got := dropped(); got != want {
		t.Fatalf("Dropped() = %d, want %d", got, want)
	}
}

func TestJournalHandlerEntries(t *testing.T) {
	j := journaltest.Start(t)
	h := NewJournalHandler(JournalOptions{Level: slog.LevelDebug})
	log := slog.New(h).With("backend", "llama", "device", "GPU-0")

	tests := []struct {
		level    slog.Level
		id       string
		wantPri  string
		msg      string
		attrs    []any
		want     map[string]string
		wantNone []string
	}{
		{slog.LevelDebug, "w-debug", "7", "probe", nil, nil, nil},
		{slog.LevelInfo, "w-info", "6", "worker ready", []any{"state", "ready"}, map[string]string{"STATE": "ready"}, nil},
		{LevelNotice, "w-notice", "5", "worker restarted", []any{"reason", "oom_kill"}, map[string]string{"REASON": "oom_kill"}, nil},
		{slog.LevelWarn, "w-warn", "4", "heartbeat missed", []any{slog.Duration("silent", 1500*time.Millisecond)}, map[string]string{"SILENT": "1.5s"}, nil},
		{slog.LevelError, "w-error", "3", "spawn failed", []any{"error", fmt.Errorf("exec: %w", errors.New("no such file"))}, map[string]string{"ERROR": "exec: no such file"}, nil},
		{LevelCritical, "w-crit", "2", "cgroup tree gone", nil, nil, nil},
		{slog.LevelInfo, "w-group", "6", "request", []any{slog.Group("req", "id", "r-1", slog.Group("http", "status", 200)), slog.Group("", "inlined", "yes"), slog.Group("empty")},
			map[string]string{"REQ_ID": "r-1", "REQ_HTTP_STATUS": "200", "INLINED": "yes"}, []string{"EMPTY"}},
		{slog.LevelInfo, "w-reserved", "6", "real message", []any{"message", "fake", "priority", "0", "_pid", "1"},
			map[string]string{"X_MESSAGE": "fake", "X_PRIORITY": "0", "PID": "1"}, nil},
		{slog.LevelInfo, "w-multiline", "6", "line one\nline two", nil, nil, nil},
	}
	for _, tt := range tests {
		log.Log(t.Context(), tt.level, tt.msg, append([]any{"worker_id", tt.id}, tt.attrs...)...)
	}
	// WithGroup applies to later attributes, WithAttrs before it stays flat.
	log.WithGroup("spawn").Info("grouped", "worker_id", "w-withgroup")

	for _, tt := range tests {
		t.Run(tt.id, func(t *testing.T) {
			es := j.WaitFor(t, 1, 5*time.Second, "WORKER_ID="+tt.id)
			e := es[0]
			want := map[string]string{
				"MESSAGE":           tt.msg,
				"PRIORITY":          tt.wantPri,
				"SYSLOG_IDENTIFIER": "rbee-hive",
				"BACKEND":           "llama",
				"DEVICE":            "GPU-0",
				"_TRANSPORT":        "journal", // native protocol, not stdout
				"_PID":              strconv.Itoa(os.Getpid()),
				"CODE_FUNC":         "github.com/rbee/rbee-hive/systemd.TestJournalHandlerEntries",
			}
			for k, v := range tt.want {
				want[k] = v
			}
			for k, v := range want {
				if e[k] != v {
					t.Errorf("%s = %q, want %q", k, e[k], v)
				}
			}
			for _, k := range tt.wantNone {
				if _, ok := e[k]; ok {
					t.Errorf("unexpected field %s", k)
				}
			}
			if !strings.HasSuffix(e["CODE_FILE"], "systemd/journal_test.go") || e["CODE_LINE"] == "" {
				t.Errorf("CODE_FILE=%q CODE_LINE=%q", e["CODE_FILE"], e["CODE_LINE"])
			}
		})
	}
	es := j.WaitFor(t, 1, 5*time.Second, "SPAWN_WORKER_ID=w-withgroup")
	if es[0]["BACKEND"] != "llama" {
		t.Errorf("WithAttrs before WithGroup: BACKEND=%q", es[0]["BACKEND"])
	}
	if h.Dropped() != 0 {
		t.Fatalf("Dropped() = %d with a healthy journald", h.Dropped())
	}
}

func TestJournalHandlerLevelFilter(t *testing.T) {
	j := journaltest.Start(t)
	h := NewJournalHandler(JournalOptions{Level: slog.LevelWarn, Identifier: "rbee-test"})
	log := slog.New(h)
	log.Info("below threshold", "worker_id", "w-lvl")
	log.Warn("at threshold", "worker_id", "w-lvl")
	h.Close()
	j.WaitFor(t, 1, 5*time.Second, "WORKER_ID=w-lvl", "SYSLOG_IDENTIFIER=rbee-test")
	time.Sleep(200 * time.Millisecond) // a second entry would have arrived with the first
	if es := j.Entries(t, "WORKER_ID=w-lvl"); len(es) != 1 || es[0]["MESSAGE"] != "at threshold" {
		t.Fatalf("entries %v, want only the warning", es)
	}
	log.Warn("after close", "worker_id", "w-lvl")
	if h.Dropped() != 1 {
		t.Fatalf("Dropped() = %d after logging past Close, want 1", h.Dropped())
	}
}

func TestJournalHandlerLargeEntry(t *testing.T) {
	// Larger than a datagram may be: go-systemd passes it as a file
	// descriptor instead, which journald must accept.
	j := journaltest.Start(t)
	h := NewJournalHandler(JournalOptions{})
	big := strings.Repeat("x", 1<<20)
	slog.New(h).Info(big, "worker_id", "w-big")
	es := j.WaitFor(t, 1, 5*time.Second, "WORKER_ID=w-big")
	if len(es[0]["MESSAGE"]) != len(big) {
		t.Fatalf("MESSAGE has %d bytes, want %d", len(es[0]["MESSAGE"]), len(big))
	}
}

func TestNewLogHandlerJournal(t *testing.T) {
	j := journaltest.Start(t)
	// JOURNAL_STREAM naming our own stderr is what systemd sets when a
	// service's stderr is connected to the journal.
	var st syscall.Stat_t
	if err := syscall.Fstat(2, &st); err != nil {
		t.Fatal(err)
	}
	stream := fmt.Sprintf("%d:%d", st.Dev, st.Ino)

	tests := []struct {
		name, mode, journalStream string
		journaldDown              bool
		wantJournal               bool
	}{
		{"journal", "journal", "", false, true},
		{"auto under systemd", "auto", stream, false, true},
		{"auto in a terminal", "auto", "", false, false},
		{"auto, stream of another fd", "auto", "1:1", false, false},
		{"json stays json", "json", stream, false, false},
		{"journal without journald", "journal", "", true, false},
		{"auto without journald", "auto", stream, true, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Setenv("JOURNAL_STREAM", tt.journalStream)
			if tt.journaldDown {
				j.Kill(t)
				defer j.Restart(t)
			}
			var buf bytes.Buffer
			h, closeFn, err := NewLogHandler(tt.mode, slog.LevelInfo, &buf)
			if err != nil {
				t.Fatal(err)
			}
			_, isJournal := h.(*JournalHandler)
			if isJournal != tt.wantJournal {
				t.Fatalf("journal handler = %v, want %v (stderr output %q)", isJournal, tt.wantJournal, buf.String())
			}
			id := "w-" + strings.ReplaceAll(strings.ReplaceAll(tt.name, " ", ""), ",", "")
			slog.New(h).Info("hello", "worker_id", id)
			closeFn()
			if tt.wantJournal {
				j.WaitFor(t, 1, 5*time.Second, "WORKER_ID="+id)
				if buf.Len() != 0 {
					t.Fatalf("journal mode wrote to stderr: %q", buf.String())
				}
				return
			}
			if !strings.Contains(buf.String(), id) {
				t.Fatalf("stderr %q lacks the record", buf.String())
			}
			if tt.journaldDown && !strings.Contains(buf.String(), "journald socket not reachable") {
				t.Fatalf("fallback not announced: %q", buf.String())
			}
		})
	}
}

func TestWorkerJournalEntries(t *testing.T) {
	j := journaltest.Start(t)
	wj := NewWorkerJournal(WorkerJournalOptions{})
	a := wj.Worker("w-a1", map[string]string{"backend": "llama", "MODEL": "qwen2.5-0.5b", "RBEE_WORKER_ID": "w-forged"})
	lines := []struct {
		stream, line string
		wantMsg      string
		wantPri      string
	}{
		{"stdout", "loading model\n", "loading model", "6"},
		// stderr is where llama-server writes its INFO lines: info, not warning.
		{"stderr", "slow tokenizer\r\n", "slow tokenizer", "6"},
		{"stderr", "<4>context shift", "context shift", "4"},
		{"stderr", "<3>CUDA error: out of memory", "CUDA error: out of memory", "3"},
		{"stdout", "<7>debug detail", "debug detail", "7"},
		{"stdout", "<9>not a level", "<9>not a level", "6"},
		{"stdout", "", "", "6"},
	}
	for _, l := range lines {
		a.WriteLine(l.stream, []byte(l.line))
	}
	wj.WriteLine("w-b2", "stdout", []byte("other worker"))
	long := bytes.Repeat([]byte("y"), MaxLineBytes+100)
	wj.WriteLine("w-long", "stdout", long)

	es := j.WaitFor(t, len(lines), 5*time.Second, "RBEE_WORKER_ID=w-a1")
	if len(es) != len(lines) {
		t.Fatalf("%d entries for w-a1, want %d", len(es), len(lines))
	}
	for i, l := range lines {
		e := es[i] // journalctl prints in order of arrival
		want := map[string]string{
			"MESSAGE": l.wantMsg, "PRIORITY": l.wantPri, "RBEE_STREAM": l.stream,
			"SYSLOG_IDENTIFIER": "rbee-worker", "BACKEND": "llama", "MODEL": "qwen2.5-0.5b",
			"RBEE_WORKER_ID": "w-a1",
		}
		for k, v := range want {
			if e[k] != v {
				t.Errorf("line %d: %s = %q, want %q", i, k, e[k], v)
			}
		}
	}
	// journalctl -p warning shows the lines that say they are warnings or
	// worse, not every stderr line.
	var warned []string
	for _, e := range j.Entries(t, "RBEE_WORKER_ID=w-a1", "-p", "warning") {
		warned = append(warned, e["MESSAGE"])
	}
	if got, want := strings.Join(warned, "|"), "context shift|CUDA error: out of memory"; got != want {
		t.Errorf("journalctl -p warning: %q, want %q", got, want)
	}
	// journalctl -t rbee-worker (as in docs/operations.md) sees both workers.
	j.WaitFor(t, len(lines)+2, 5*time.Second, "-t", "rbee-worker")
	if es := j.Entries(t, "RBEE_WORKER_ID=w-b2"); len(es) != 1 || es[0]["MESSAGE"] != "other worker" || es[0]["BACKEND"] != "" {
		t.Fatalf("w-b2 entries %v", es)
	}
	if es := j.Entries(t, "RBEE_WORKER_ID=w-long"); len(es) != 1 || len(es[0]["MESSAGE"]) != MaxLineBytes {
		t.Fatalf("long line: %d entries", len(es))
	}
	if wj.Dropped() != 0 {
		t.Fatalf("Dropped() = %d", wj.Dropped())
	}
}

// sinkUnderTest adapts both sinks to one shape for the failure tests.
type sinkUnderTest struct {
	name    string
	new     func(queue int) (write func(i int), dropped func() uint64, close func())
	matchID string // entries carry WORKER_ID or RBEE_WORKER_ID = this
	field   string
}

func sinksUnderTest() []sinkUnderTest {
	return []sinkUnderTest{
		{
			name: "log handler", field: "WORKER_ID", matchID: "w-h",
			new: func(queue int) (func(int), func() uint64, func()) {
				h := NewJournalHandler(JournalOptions{QueueSize: queue})
				log := slog.New(h)
				return func(i int) { log.Info("entry "+strconv.Itoa(i), "worker_id", "w-h") }, h.Dropped, h.Close
			},
		},
		{
			name: "worker journal", field: "RBEE_WORKER_ID", matchID: "w-w",
			new: func(queue int) (func(int), func() uint64, func()) {
				wj := NewWorkerJournal(WorkerJournalOptions{QueueSize: queue})
				w := wj.Worker("w-w", nil)
				return func(i int) { w.WriteLine("stdout", []byte("line "+strconv.Itoa(i))) }, wj.Dropped, wj.Close
			},
		},
	}
}

// timedWrites writes n entries and returns the slowest single call. It
// fails the test if the writes do not finish within 10s: a sink that waits
// for a stalled journald would block for ever.
func timedWrites(t *testing.T, write func(int), from, n int) time.Duration {
	t.Helper()
	done := make(chan time.Duration, 1)
	go func() {
		var slowest time.Duration
		for i := from; i < from+n; i++ {
			start := time.Now()
			write(i)
			if d := time.Since(start); d > slowest {
				slowest = d
			}
		}
		done <- slowest
	}()
	select {
	case d := <-done:
		return d
	case <-time.After(10 * time.Second):
		t.Fatalf("%d writes did not return within 10s: the caller blocks on journald", n)
		return 0
	}
}

// A call that stays under this never waited for journald: one enqueue is
// microseconds; the margin is for GC pauses on shared CI cores.
const promptCall = 250 * time.Millisecond

func TestJournaldKilledMidRun(t *testing.T) {
	for _, s := range sinksUnderTest() {
		t.Run(s.name, func(t *testing.T) {
			j := journaltest.Start(t)
			write, dropped, closeFn := s.new(0)
			defer closeFn()
			timedWrites(t, write, 0, 10)
			j.WaitFor(t, 10, 5*time.Second, s.field+"="+s.matchID)

			j.Kill(t)
			const n = 2000
			if slowest := timedWrites(t, write, 10, n); slowest > promptCall {
				t.Fatalf("slowest call with journald dead took %v", slowest)
			}
			// Every entry is lost, and every loss is counted: a failed
			// send or a full queue.
			waitDropped(t, dropped, n)

			// A new journald gets entries again without a new handler.
			j.Restart(t)
			write(n + 10)
			j.WaitFor(t, 11, 5*time.Second, s.field+"="+s.matchID)
			if got := dropped(); got != n {
				t.Fatalf("Dropped() = %d after recovery, want %d", got, n)
			}
		})
	}
}

func TestJournaldStalled(t *testing.T) {
	for _, s := range sinksUnderTest() {
		t.Run(s.name, func(t *testing.T) {
			j := journaltest.Start(t)
			const queue, n = 64, 3000
			write, dropped, closeFn := s.new(queue)
			j.Pause(t)
			// journald reads nothing: its socket queue fills (the kernel's
			// max_dgram_qlen, 512 by default), the sender blocks in its
			// send, our queue fills, and the rest is dropped.
			if slowest := timedWrites(t, write, 0, n); slowest > promptCall {
				j.Resume(t)
				t.Fatalf("slowest call with journald stalled took %v", slowest)
			}
			if dropped() == 0 {
				j.Resume(t)
				t.Fatal("no drops while journald was stalled")
			}
			j.Resume(t)
			closeFn() // flushes what was queued
			// Nothing vanishes silently: every entry was delivered or counted.
			deadline := time.Now().Add(10 * time.Second)
			for {
				got := len(j.Entries(t, s.field+"="+s.matchID))
				if uint64(got)+dropped() == n {
					t.Logf("%d delivered, %d dropped", got, dropped())
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%d delivered + %d dropped != %d written", got, dropped(), n)
				}
				time.Sleep(100 * time.Millisecond)
			}
		})
	}
}

func TestWorkerJournalFallback(t *testing.T) {
	j := journaltest.Start(t)
	j.Kill(t) // journald absent when the sink is built
	var buf bytes.Buffer
	wj := NewWorkerJournal(WorkerJournalOptions{Fallback: &buf})
	wj.WriteLine("w-fb", "stderr", []byte("boom\n"))
	wj.Close()
	if got, want := buf.String(), "rbee-worker[w-fb] stderr: boom\n"; got != want {
		t.Fatalf("fallback output %q, want %q", got, want)
	}

	nowhere := NewWorkerJournal(WorkerJournalOptions{})
	nowhere.WriteLine("w-fb", "stdout", []byte("lost"))
	nowhere.Close()
	if nowhere.Dropped() != 1 {
		t.Fatalf("Dropped() = %d without journald or fallback, want 1", nowhere.Dropped())
	}
}
