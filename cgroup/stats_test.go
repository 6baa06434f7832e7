package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"
)

// leafFDs lists this process's descriptors whose target lies in one of l's
// directories.
func leafFDs(t testing.TB, l Leaf) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, e := range ents {
		target, err := os.Readlink("/proc/self/fd/" + e.Name())
		if err != nil {
			continue
		}
		for _, d := range leafDirsOf(l) {
			if strings.HasPrefix(target, d+"/") {
				out = append(out, e.Name()+"->"+filepath.Base(strings.TrimSuffix(target, " (deleted)")))
			}
		}
	}
	return out
}

func statReaderOf(l Leaf) *statReader {
	switch ll := l.(type) {
	case *v1Leaf:
		return ll.stats
	case *v2Leaf:
		return ll.stats
	}
	return nil
}

// TestStatsPersistentFDs: Stats reads through fds it opens once and keeps,
// and every read sees the leaf's current numbers (pids appear and go, CPU
// grows), over many calls on the same fds; Delete closes them all.
func TestStatsPersistentFDs(t *testing.T) {
	_, l := newTestLeaf(t, "w-fds", Limits{MemoryMax: 128 << 20, PidsMax: 16})
	if fds := leafFDs(t, l); len(fds) != 0 {
		t.Fatalf("fds before the first Stats: %v, want none", fds)
	}
	st, err := l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.PidsCurrent != 0 {
		t.Errorf("empty leaf: PidsCurrent = %d", st.PidsCurrent)
	}
	first := leafFDs(t, l)
	if len(first) < 3 || len(first) != statReaderOf(l).open() {
		t.Fatalf("after Stats: fds %v, reader holds %d; want ≥ 3 (current, oom, peak at least) and equal", first, statReaderOf(l).open())
	}

	sleeper := helperCmd("sleep")
	if err := l.Start(sleeper); err != nil {
		t.Fatal(err)
	}
	st, err = l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	wantPids := pidsDirOf(l) != ""
	// pids.current counts tasks: the Go helper's threads too.
	if wantPids && st.PidsCurrent == 0 || st.MemoryCurrent == 0 {
		t.Errorf("with a sleeper: %+v, want its tasks and memory in use", st)
	}
	ctx, cancel := contextTimeout(10 * time.Second)
	defer cancel()
	if err := l.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	_ = sleeper.Wait()

	// Many calls on the same fds: values never go backwards, and CPU burnt
	// in the leaf shows up.
	before, err := l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if before.PidsCurrent != 0 {
		t.Errorf("after Kill: PidsCurrent = %d, want 0", before.PidsCurrent)
	}
	for i := range 3 {
		burn := helperCmd("burn")
		if err := l.Start(burn); err != nil {
			t.Fatal(err)
		}
		if err := burn.Wait(); err != nil {
			t.Fatal(err)
		}
		prev := before
		for range 200 {
			st, err := l.Stats()
			if err != nil {
				t.Fatalf("round %d: %v", i, err)
			}
			if st.CPUUsage < prev.CPUUsage || st.MemoryPeak < prev.MemoryPeak || st.OOMKills != 0 {
				t.Fatalf("round %d: %+v after %+v", i, st, prev)
			}
			prev = st
		}
		if hasCPU := statReaderOf(l).paths[statCPU] != ""; hasCPU && prev.CPUUsage < before.CPUUsage+10*time.Millisecond {
			t.Errorf("round %d: CPU %v → %v after a 50ms burn, want ≥ +10ms", i, before.CPUUsage, prev.CPUUsage)
		}
		before = prev
	}
	if now := leafFDs(t, l); strings.Join(now, ",") != strings.Join(first, ",") {
		t.Errorf("fds changed over the calls: %v, first %v", now, first)
	}

	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
	if fds := leafFDs(t, l); len(fds) != 0 || statReaderOf(l).open() != 0 {
		t.Errorf("after Delete: fds %v, reader holds %d, want none", fds, statReaderOf(l).open())
	}
	if _, err := l.Stats(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stats after Delete = %v, want ErrNotFound", err)
	}
	if n := statReaderOf(l).open(); n != 0 {
		t.Errorf("Stats of a deleted leaf left %d fds open", n)
	}
}

// TestStatsLeafGoneElsewhere: a leaf removed through another handle (a
// restarted hive's Load, or a test's cleanup) reads as ErrNotFound on the
// first handle, and its fds are closed.
func TestStatsLeafGoneElsewhere(t *testing.T) {
	m, a := newTestLeaf(t, "w-gone", Limits{MemoryMax: 64 << 20})
	if _, err := a.Stats(); err != nil {
		t.Fatal(err)
	}
	b, err := m.Load("w-gone")
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Delete(); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Stats(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stats through the other handle = %v, want ErrNotFound", err)
	}
	if n := statReaderOf(a).open(); n != 0 {
		t.Errorf("%d fds still open on a removed leaf", n)
	}
}

// TestStatsDroppedLeafClosesFDs: a Leaf the caller drops without Delete
// does not keep its fds for the life of the process.
func TestStatsDroppedLeafClosesFDs(t *testing.T) {
	m, keep := newTestLeaf(t, "w-drop", Limits{MemoryMax: 64 << 20})
	func() {
		l, err := m.Load("w-drop")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := l.Stats(); err != nil {
			t.Fatal(err)
		}
	}()
	if len(leafFDs(t, keep)) == 0 {
		t.Fatal("the dropped handle's Stats opened no fds")
	}
	for i := 0; i < 100 && len(leafFDs(t, keep)) > 0; i++ {
		runtime.GC()
		time.Sleep(10 * time.Millisecond) // cleanups run on their own goroutine
	}
	if fds := leafFDs(t, keep); len(fds) != 0 {
		t.Errorf("fds of a dropped Leaf after 100 GCs: %v", fds)
	}
}

func TestParseUintAndKV(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
		ok   bool
	}{
		{"0\n", 0, true},
		{"123456789\n", 123456789, true},
		{"max\n", 0, true},
		{" 42 ", 42, true},
		{"18446744073709551615", 1<<64 - 1, true},
		{"18446744073709551616", 0, false},
		{"", 0, false},
		{"12a", 0, false},
		{"-1", 0, false},
	} {
		got, err := parseUint([]byte(tc.in))
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseUint(%q) = %d, %v; want %d, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
	events := []byte("low 0\nhigh 0\nmax 3\noom 2\noom_kill 1\noom_group_kill 1\n")
	for _, tc := range []struct {
		key  string
		want uint64
		ok   bool
	}{
		{"oom_kill", 1, true}, {"oom_group_kill", 1, true}, {"max", 3, true}, {"oom", 2, true}, {"oom_k", 0, false}, {"usage_usec", 0, false},
	} {
		got, ok := lookupKV(events, tc.key)
		if ok != tc.ok || got != tc.want {
			t.Errorf("lookupKV(%q) = %d, %v; want %d, %v", tc.key, got, ok, tc.want, tc.ok)
		}
	}
	// Matches readKV on a real-shaped cpu.stat without allocating.
	cpu := []byte("usage_usec 1234\nuser_usec 1000\nsystem_usec 234\nnr_periods 0\n")
	if v, ok := lookupKV(cpu, "usage_usec"); !ok || v != 1234 {
		t.Errorf("usage_usec = %d, %v", v, ok)
	}
	if a := testing.AllocsPerRun(100, func() { _, _ = lookupKV(cpu, "system_usec"); _, _ = parseUint([]byte("123\n")) }); a != 0 {
		t.Errorf("parse allocates %.0f times", a)
	}
}

// BenchmarkStatsFDs compares Stats (persistent fds, pread) with what Stats
// did before: os.ReadFile of the same five files per call (open, fstat,
// netpoller registration, read, close), parsed through readKV maps. The
// leaf holds a running process.
func BenchmarkStatsFDs(b *testing.B) {
	l := sleepingLeaf(b, "w-statsfd")
	r := statReaderOf(l)
	b.Run("pread-fds", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := l.Stats(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("readfile", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := readFileStats(r); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// readFileStats is the previous Stats: every file through os.ReadFile.
func readFileStats(r *statReader) (Stats, error) {
	var s Stats
	var err error
	if s.MemoryCurrent, err = readUintFile(r.paths[statCurrent]); err != nil {
		return s, err
	}
	kv, err := readKV(r.paths[statOOM])
	if err != nil {
		return s, err
	}
	for _, k := range r.oomKeys {
		if v, ok := kv[k]; ok {
			s.OOMKills = v
			break
		}
	}
	opt := func(p string) uint64 {
		if p == "" {
			return 0
		}
		v, _ := readUintFile(p)
		return v
	}
	s.MemoryPeak = opt(r.paths[statPeak])
	s.PidsCurrent = opt(r.paths[statPids])
	if r.cpuKey == "" {
		s.CPUUsage = time.Duration(opt(r.paths[statCPU])) * r.cpuUnit
	} else if kv, err := readKV(r.paths[statCPU]); err == nil {
		s.CPUUsage = time.Duration(kv[r.cpuKey]) * r.cpuUnit
	}
	return s, nil
}

func readUintFile(path string) (uint64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	if s == "max" {
		return 0, nil
	}
	return strconv.ParseUint(s, 10, 64)
}
