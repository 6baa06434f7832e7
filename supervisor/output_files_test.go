package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// readLines is a sink's log file as lines.
func readLines(t *testing.T, sink *logSink) []string {
	t.Helper()
	sink.close()
	data, err := os.ReadFile(sink.path)
	if err != nil {
		t.Fatal(err)
	}
	if len(data) == 0 {
		return nil
	}
	return strings.Split(strings.TrimSuffix(string(data), "\n"), "\n")
}

// openTailed opens path for the tailer as openOutputFiles does.
func openTailed(t *testing.T, path string) *os.File {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	return f
}

// TestOutputTailerManyFiles: one tailer follows many files written at
// once, each file's lines arrive whole and in order while the writers
// still write (before finish), finish ships the rest with a last line
// that has no newline, and the shipped offsets end at the files' sizes.
func TestOutputTailerManyFiles(t *testing.T) {
	const files, lines = 40, 300
	tl := &outputTailer{}
	defer tl.close()
	dir := t.TempDir()
	sinks := make([]*logSink, files)
	tailed := make([]*tailedFile, files)
	shipped := make([]atomic.Int64, files)
	writers := make([]*os.File, files)
	for i := range files {
		p := filepath.Join(dir, fmt.Sprintf("w-t%d.stdout", i))
		w, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		writers[i] = w
		sinks[i] = newLogSink(fmt.Sprintf("w-t%d", i), dir, 1<<30, 1, nil)
		tailed[i], err = tl.add(openTailed(t, p), 0, outStream{sink: sinks[i], stream: streamStdout}, &shipped[i], nil)
		if err != nil {
			t.Fatal(err)
		}
	}
	var wg sync.WaitGroup
	for i, w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range lines {
				fmt.Fprintf(w, "file %d line %d %s\n", i, j, strings.Repeat("q", j*5))
			}
			fmt.Fprintf(w, "last of %d", i) // no newline
			w.Close()
		}()
	}
	wg.Wait()
	// Tailed while running: every ended line is shipped without finish.
	deadline := time.Now().Add(30 * time.Second)
	for i := range files {
		st, err := os.Stat(filepath.Join(dir, fmt.Sprintf("w-t%d.stdout", i)))
		if err != nil {
			t.Fatal(err)
		}
		want := st.Size() - int64(len(fmt.Sprintf("last of %d", i)))
		for shipped[i].Load() != want {
			if time.Now().After(deadline) {
				t.Fatalf("file %d: %d bytes shipped before finish, want %d", i, shipped[i].Load(), want)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	for i := range files {
		got := tl.finish(tailed[i])
		st, err := os.Stat(filepath.Join(dir, fmt.Sprintf("w-t%d.stdout", i)))
		if err != nil {
			t.Fatal(err)
		}
		if got != st.Size() || shipped[i].Load() != st.Size() {
			t.Errorf("file %d: shipped %d (stored %d), size %d", i, got, shipped[i].Load(), st.Size())
		}
		all := readLines(t, sinks[i])
		if len(all) != lines+1 || all[lines] != fmt.Sprintf("last of %d", i) {
			t.Fatalf("file %d: %d lines, last %.40q", i, len(all), all[len(all)-1])
		}
		for j := range lines {
			if want := fmt.Sprintf("file %d line %d %s", i, j, strings.Repeat("q", j*5)); all[j] != want {
				t.Fatalf("file %d line %d: %.80q", i, j, all[j])
			}
		}
	}
	tl.mu.Lock()
	defer tl.mu.Unlock()
	if len(tl.byWD) != 0 {
		t.Errorf("%d files still watched after finish", len(tl.byWD))
	}
}

// TestOutputFileNeedsNoReader: a worker whose output is a file writes far
// more than a pipe holds (64 KiB) with nobody reading and exits by itself;
// a tailer started afterwards at the shipped offset of an earlier hive
// ships exactly the lines past it. The same writer on a pipe nobody reads
// blocks (the control).
func TestOutputFileNeedsNoReader(t *testing.T) {
	const lines = 2000 // 2000 × 101 B ≈ 200 KB
	script := `i=0; while [ $i -lt 2000 ]; do printf '%0100d\n' $i; i=$((i+1)); done`
	dir := t.TempDir()
	cmd := exec.Command("/bin/sh", "-c", script)
	of, err := openOutputFiles(dir, "w-nohive", cmd)
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	of.closeWriteEnds()
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("writer: %v", err)
		}
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatal("writer to a file nobody reads did not finish")
	}

	// The control: the same writer on a pipe with no reader blocks.
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pr.Close()
	ctl := exec.Command("/bin/sh", "-c", script)
	ctl.Stdout = pw
	if err := ctl.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	ctlDone := make(chan struct{})
	go func() { _ = ctl.Wait(); close(ctlDone) }()
	select {
	case <-ctlDone:
		t.Fatal("the control writer finished on a pipe nobody reads")
	case <-time.After(time.Second):
	}
	_ = ctl.Process.Kill()
	<-ctlDone

	// An earlier hive shipped the first 500 lines.
	const resume = 500 * 101
	tl := &outputTailer{}
	defer tl.close()
	sink := newLogSink("w-nohive", dir, 1<<30, 1, nil)
	var shipped atomic.Int64
	tf, err := tl.add(of.r[0], resume, outStream{sink: sink, stream: streamStdout}, &shipped, nil)
	if err != nil {
		t.Fatal(err)
	}
	of.r[0] = nil
	of.close()
	if got := tl.finish(tf); got != lines*101 {
		t.Errorf("shipped %d, want %d", got, lines*101)
	}
	all := readLines(t, sink)
	if len(all) != lines-500 || all[0] != fmt.Sprintf("%0100d", 500) || all[len(all)-1] != fmt.Sprintf("%0100d", lines-1) {
		t.Fatalf("%d lines shipped after resume, first %.20q", len(all), all[0])
	}
}

// TestOutputTailerPunchesHoles: once punchEvery bytes are shipped, the
// shipped part of the file stops using disk while its size (the writer's
// append offset) stays; every line still arrives.
func TestOutputTailerPunchesHoles(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "w-punch.stderr")
	w, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	tl := &outputTailer{punchEvery: 256 << 10}
	defer tl.close()
	sink := newLogSink("w-punch", dir, 1<<30, 1, nil)
	var shipped atomic.Int64
	tf, err := tl.add(openTailed(t, p), 0, outStream{sink: sink, stream: streamStderr}, &shipped, nil)
	if err != nil {
		t.Fatal(err)
	}
	line := strings.Repeat("h", 1023) + "\n"
	const n = 4096 // 4 MiB
	for range n {
		if _, err := w.WriteString(line); err != nil {
			t.Fatal(err)
		}
	}
	if got := tl.finish(tf); got != n*1024 {
		t.Fatalf("shipped %d, want %d", got, n*1024)
	}
	if tl.noPunch.Load() {
		t.Fatal("the file system under TempDir cannot punch holes") // tmpfs, ext4, xfs and btrfs can
	}
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != n*1024 {
		t.Errorf("size %d, want %d (punching must keep it)", st.Size, n*1024)
	}
	if used := st.Blocks * 512; used > 1<<20 {
		t.Errorf("file uses %d bytes on disk after shipping 4 MiB with a hole every 256 KiB", used)
	}
	if all := readLines(t, sink); len(all) != n {
		t.Errorf("%d lines shipped, want %d", len(all), n)
	}
}
