package supervisor

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/testkit"
)

// TestWorkerLogFilesLifetime: the files of workers an earlier hive left
// behind are removed when the supervisor starts (other files stay), and a
// worker's files go with the worker on DELETE.
func TestWorkerLogFilesLifetime(t *testing.T) {
	var dir string
	stale := []string{"w-0ld0ld0ld0ld.log", "w-0ld0ld0ld0ld.log.1", "w-0ld0ld0ld0ld.log.3"}
	h := newHarness(t, func(cfg *config.Config) {
		dir = filepath.Join(cfg.StateDir, "workers")
		if err := os.MkdirAll(dir, 0o750); err != nil {
			t.Fatal(err)
		}
		for _, name := range append([]string{"notes.txt"}, stale...) {
			if err := os.WriteFile(filepath.Join(dir, name), []byte("old output\n"), 0o640); err != nil {
				t.Fatal(err)
			}
		}
	})
	for _, name := range stale {
		if _, err := os.Stat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left from an earlier hive: %v", name, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "notes.txt")); err != nil {
		t.Errorf("a file that is no worker log was removed: %v", err)
	}

	res := h.spawn(map[string]any{"backend": "sim"})
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)
	path := filepath.Join(dir, res.WorkerID+".log")
	h.waitFor("worker log file", 5*time.Second, func() bool {
		st, err := os.Stat(path)
		return err == nil && st.Size() > 0
	})
	if code, body := h.do("DELETE", "/v1/workers/"+res.WorkerID, nil); code != 200 {
		t.Fatalf("DELETE: %d %s", code, body)
	}
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), res.WorkerID) {
			t.Errorf("%s still there after DELETE", e.Name())
		}
	}
}

// TestLogFileRecoversFromDiskFull: a full disk pauses a worker's file
// logging, not ends it: lines are dropped and counted, the failure is
// logged once, and after the pause the file takes lines again once there
// is room. A real tmpfs fills up.
func TestLogFileRecoversFromDiskFull(t *testing.T) {
	dir := testkit.MountTmpfs(t, "64k")
	filler, err := os.Create(filepath.Join(dir, "filler"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := make([]byte, 4096)
	for {
		if _, err := filler.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the tmpfs: %v", err)
			}
			break
		}
	}
	filler.Close()

	logs := &testkit.SyncBuffer{}
	dropped := prometheus.NewCounter(prometheus.CounterOpts{Name: "dropped"})
	l := newLogSink("w-disk", dir, 1<<20, 1, nil)
	l.log, l.dropped = slog.New(slog.NewTextHandler(logs, nil)), dropped
	l.retryAfter = time.Hour // the test ends the pause itself
	line := []byte(strings.Repeat("x", 5000))
	for range 3 {
		l.write("stdout", line)
	}
	if err := os.Remove(filepath.Join(dir, "filler")); err != nil {
		t.Fatal(err)
	}
	l.write("stdout", []byte("paused")) // within the pause: dropped, no retry yet
	if got := testutil.ToFloat64(dropped); got != 4 {
		t.Errorf("dropped lines = %v, want 4", got)
	}
	l.mu.Lock()
	l.retryAt = time.Now() // the pause is over
	l.mu.Unlock()
	l.write("stdout", []byte("after the disk was freed"))
	l.close()

	data, err := os.ReadFile(filepath.Join(dir, "w-disk.log"))
	if err != nil || !strings.HasSuffix(string(data), "after the disk was freed\n") || strings.Contains(string(data), "paused") {
		t.Errorf("log file after recovery: %q (%v)", tailOf(data), err)
	}
	if got := testutil.ToFloat64(dropped); got != 4 {
		t.Errorf("dropped lines = %v, want 4", got)
	}
	out := logs.String()
	if n := strings.Count(out, "write failed"); n != 1 {
		t.Errorf("%d failure lines, want 1 per episode:\n%s", n, out)
	}
	if !strings.Contains(out, "writable again") || !strings.Contains(out, "lines_dropped=4") {
		t.Errorf("no recovery line with the count:\n%s", out)
	}
	// The tail kept every line throughout.
	if tail := string(l.tail("")); !strings.Contains(tail, "paused\n") {
		t.Errorf("tail lost lines: %q", tailOf([]byte(tail)))
	}
}

func tailOf(b []byte) string {
	if len(b) > 80 {
		return "…" + string(b[len(b)-80:])
	}
	return string(b)
}
