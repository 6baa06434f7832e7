// Package workeroutput measures how a worker's stdout/stderr can reach the
// hive, for docs/adoption.md: through a pipe the hive reads (today), into a
// file the hive tails (what survives a hive restart), and into a journald
// stream. It also pins the facts the choice rests on: a pipe without its
// reader blocks the worker once full and gives EPIPE once closed; a file
// never does, and hole punching bounds its disk use without moving offsets.
package workeroutput

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/systemd/journaltest"
)

func TestMain(m *testing.M) { os.Exit(journaltest.Main(m)) }

const lineLen = 200

var line = append(bytes.Repeat([]byte("t"), lineLen-1), '\n')

// TestPipeWithoutReader: with the hive gone a pipe first fills (a blocking
// writer would hang there: the probe uses O_NONBLOCK to see where), then,
// once the last read end is closed, every write fails with EPIPE (SIGPIPE
// for a process that does not ignore it).
func TestPipeWithoutReader(t *testing.T) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	r, w := p[0], p[1]
	defer unix.Close(w)
	capacity := 0
	for {
		n, err := unix.Write(w, line)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		capacity += n
	}
	if capacity == 0 || capacity > 1<<20 {
		t.Fatalf("pipe took %d bytes before blocking", capacity)
	}
	t.Logf("a reader-less pipe blocks its writer after %d bytes (%d lines of %d B)", capacity, capacity/lineLen, lineLen)
	// A worker that ignores SIGPIPE sees EPIPE; one that does not dies.
	signal.Ignore(unix.SIGPIPE)
	defer signal.Reset(unix.SIGPIPE)
	unix.Close(r)
	if _, err := unix.Write(w, line); !errors.Is(err, unix.EPIPE) {
		t.Errorf("write after the reader closed: %v, want EPIPE", err)
	}
}

// TestFileNeedsNoReader: a worker appending to a file writes far past any
// pipe capacity with nobody reading, and the hive reading later from its
// saved offset finds every line; punching the consumed range frees the
// disk while the writer's offsets (O_APPEND) and the unread data stay.
func TestFileNeedsNoReader(t *testing.T) {
	path := filepath.Join(t.TempDir(), "w-abc.out")
	w, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	const lines = 40000 // 8 MB, 100+ pipe capacities
	for i := range lines {
		if _, err := fmt.Fprintf(w, "%08d %s", i, line[9:]); err != nil {
			t.Fatal(err)
		}
	}
	r, err := os.OpenFile(path, os.O_RDWR, 0) // punching needs a writable descriptor
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	// The hive consumed the first half before it went away.
	consumed := int64(lines / 2 * lineLen)
	before := blocks(t, r)
	if err := unix.Fallocate(int(r.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, consumed); err != nil {
		if errors.Is(err, unix.EOPNOTSUPP) {
			t.Fatalf("hole punching unsupported on the test's file system: %v", err)
		}
		t.Fatal(err)
	}
	after := blocks(t, r)
	if after >= before*6/10 {
		t.Errorf("punching half the file kept %d of %d blocks", after, before)
	}
	// The worker keeps appending at the end, not into the hole.
	fmt.Fprintf(w, "%08d %s", lines, line[9:])
	if _, err := r.Seek(consumed, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(r)
	want := lines / 2
	for sc.Scan() {
		if got := sc.Text()[:8]; got != fmt.Sprintf("%08d", want) {
			t.Fatalf("line %d reads %q", want, got)
		}
		want++
	}
	if want != lines+1 {
		t.Errorf("read up to line %d, want %d", want, lines+1)
	}
}

func blocks(t *testing.T, f *os.File) int64 {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return st.Blocks
}

// consume reads until it has n lines, like the hive's pump.
func consume(r io.Reader, n int, sink io.Writer) error {
	br := bufio.NewReaderSize(r, 16<<10)
	for got := 0; got < n; {
		l, err := br.ReadSlice('\n')
		if len(l) > 0 && l[len(l)-1] == '\n' {
			got++
			if sink != nil {
				sink.Write(l)
			}
		}
		if err != nil && err != bufio.ErrBufferFull {
			return err
		}
	}
	return nil
}

// tail reads a growing file until it has n lines: at EOF it waits for the
// writer (here a yield; the hive would use inotify), and every punchEvery
// bytes it punches out what it has read.
func tail(f *os.File, n int, punchEvery int64, sink io.Writer) error {
	buf := make([]byte, 64<<10)
	var off, punched int64
	got := 0
	for got < n {
		k, err := f.ReadAt(buf, off)
		for _, b := range buf[:k] {
			if b == '\n' {
				got++
			}
		}
		if sink != nil && k > 0 {
			sink.Write(buf[:k])
		}
		off += int64(k)
		if punchEvery > 0 && off-punched >= punchEvery {
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, punched, off-punched); err != nil {
				return err
			}
			punched = off
		}
		if err == io.EOF && k == 0 {
			syscall.Syscall(syscall.SYS_SCHED_YIELD, 0, 0, 0)
		} else if err != nil && err != io.EOF {
			return err
		}
	}
	return nil
}

// BenchmarkWorkerOutput: one line per write(2) from the "worker", until the
// "hive" has consumed every line (and, as today, copied it to a log file).
// ns/op is per line; compare the cases within one run.
func BenchmarkWorkerOutput(b *testing.B) {
	b.Run("pipe-to-hive-to-file", func(b *testing.B) {
		r, w, _ := os.Pipe()
		logf, _ := os.Create(filepath.Join(b.TempDir(), "log"))
		defer logf.Close()
		writeWhileRead(b, w, func() error { return consume(r, b.N, logf) })
		w.Close()
		r.Close()
	})
	for _, punch := range []int64{0, 1 << 20} {
		name := "file-tailed-by-hive-to-file"
		if punch > 0 {
			name = "file-tailed-by-hive-to-file+punch"
		}
		b.Run(name, func(b *testing.B) {
			path := filepath.Join(b.TempDir(), "w.out")
			w, _ := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
			r, _ := os.OpenFile(path, os.O_RDWR, 0)
			logf, _ := os.Create(filepath.Join(b.TempDir(), "log"))
			defer logf.Close()
			writeWhileRead(b, w, func() error { return tail(r, b.N, punch, logf) })
			w.Close()
			r.Close()
		})
	}
	b.Run("file-no-reader", func(b *testing.B) {
		w, _ := os.OpenFile(filepath.Join(b.TempDir(), "w.out"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
		defer w.Close()
		b.SetBytes(lineLen)
		b.ResetTimer()
		for range b.N {
			if _, err := w.Write(line); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("journald-stream", func(b *testing.B) {
		journaltest.Start(b)
		c, err := net.Dial("unix", "/run/systemd/journal/stdout")
		if err != nil {
			b.Fatal(err)
		}
		// The stream header: identifier, unit, priority, level prefix,
		// forward to syslog, kmsg, console.
		if _, err := io.WriteString(c, strings.Join([]string{"rbee-worker", "", "6", "0", "0", "0", "0"}, "\n")+"\n"); err != nil {
			b.Fatal(err)
		}
		b.SetBytes(lineLen)
		b.ResetTimer()
		for range b.N {
			if _, err := c.Write(line); err != nil {
				b.Fatal(err)
			}
		}
		c.Close()
	})
}

// writeWhileRead times writing b.N lines to w while read, in a goroutine,
// takes them.
func writeWhileRead(b *testing.B, w io.Writer, read func() error) {
	b.Helper()
	done := make(chan error, 1)
	b.SetBytes(lineLen)
	b.ResetTimer()
	go func() { done <- read() }()
	for range b.N {
		if _, err := w.Write(line); err != nil {
			b.Fatal(err)
		}
	}
	if err := <-done; err != nil {
		b.Fatal(err)
	}
}
