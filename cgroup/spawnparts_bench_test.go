package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"golang.org/x/sys/unix"
)

// BenchmarkV1SpawnParts takes a gated v1 spawn apart, every part measured
// in the same loop (iterations interleaved) against a bare exec of the same
// helper binary:
//
//   - bare: exec.Command(helper exit) + Wait;
//
//   - hive-init (with RBEE_HIVE_BIN=/path/rbee-hive): that binary started
//     as a malformed gate, so it runs the Go runtime and every package init
//     and exits 125: the start-up cost a gate of that binary pays;
//
//   - place-first / place-rest: pid writes to cgroup.procs of a fresh leaf
//     (the library's AddProc, one write per hierarchy) for a process that
//     is not in it yet: the first hierarchy's write, then the others;
//
//   - gated: Start of the helper into a fresh leaf (the real path) + Wait;
//
//   - thread-fork: the alternative without a gate: a locked OS thread of
//     this process moves itself into the leaf (v1 tasks files), forks the
//     helper there (the child inherits the thread's cgroups), moves back.
//
//     go test -run '^$' -bench V1SpawnParts -benchtime 50x ./cgroup/
func BenchmarkV1SpawnParts(b *testing.B) {
	if mgrMode() != "v1" {
		b.Skip("cgroup v1 only: v2 starts workers with CLONE_INTO_CGROUP")
	}
	m := newTestManager(b, Options{})
	lim := Limits{MemoryMax: 256 << 20, PidsMax: 64}
	hive := os.Getenv("RBEE_HIVE_BIN")
	// The pause before each measured move (RBEE_SPAWN_ISOLATE, default
	// 20ms): back-to-back cgroup moves share the kernel's rcu_sync window.
	isolate := 20 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv("RBEE_SPAWN_ISOLATE")); err == nil {
		isolate = d
	}
	parts := map[string]time.Duration{}
	add := func(k string, d time.Duration) { parts[k] += d }
	own, err := ownV1Cgroups()
	if err != nil {
		b.Fatal(err)
	}
	// Correctness of the thread-fork prototype: the child is in the leaf.
	{
		l, err := m.Create("w-check", lim)
		if err != nil {
			b.Fatal(err)
		}
		c := helperCmd("sleep")
		if err := threadFork(c, l.(*v1Leaf), own); err != nil {
			b.Fatal(err)
		}
		cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", c.Process.Pid))
		mine, _ := os.ReadFile("/proc/thread-self/cgroup")
		_ = c.Process.Kill()
		_ = c.Wait()
		if !strings.Contains(string(cg), "/workers/w-check") || strings.Contains(string(mine), "/workers/") {
			b.Fatalf("thread-fork: child in %q, this thread in %q", cg, mine)
		}
		if err := l.Delete(); err != nil {
			b.Fatal(err)
		}
	}
	var first []string
	var firstMS []float64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		c := helperCmd("exit")
		if err := c.Start(); err != nil {
			b.Fatal(err)
		}
		_ = c.Wait()
		add("bare", time.Since(t0))

		if hive != "" {
			t0 = time.Now()
			c = exec.Command(hive)
			c.Args = []string{gateArg0, "/bin/true"}
			c.Env = []string{gateEnv + "=malformed"}
			_ = c.Run()
			if c.ProcessState == nil || c.ProcessState.ExitCode() != gateExitPlacementFailed {
				b.Fatalf("hive as a malformed gate: %v", c.ProcessState)
			}
			add("hive-init", time.Since(t0))
		}

		time.Sleep(isolate) // isolate each move, as spawns are
		l, err := m.Create(fmt.Sprintf("w-p%d", i), lim)
		if err != nil {
			b.Fatal(err)
		}
		s := helperCmd("sleep")
		if err := s.Start(); err != nil {
			b.Fatal(err)
		}
		ll := l.(*v1Leaf)
		names := make([]string, 0, len(ll.dirs))
		for n := range ll.dirs {
			names = append(names, string(n))
		}
		sort.Strings(names)
		// memory first, as the library's subsystem order has it
		sort.SliceStable(names, func(a, c int) bool { return names[a] == string(cgroup1.Memory) && names[c] != string(cgroup1.Memory) })
		for j, n := range names {
			t0 = time.Now()
			if err := writeFile(ll.dirs[cgroup1.Name(n)], "cgroup.procs", strconv.Itoa(s.Process.Pid)); err != nil {
				b.Fatal(err)
			}
			d := time.Since(t0)
			if j == 0 {
				add("place-first", d)
				firstMS = append(firstMS, float64(d.Microseconds())/1000)
				if i == 0 {
					first = append(first, n)
				}
			} else {
				add("place-rest", d)
			}
		}
		_ = s.Process.Kill()
		_ = s.Wait()
		ctx, cancel := contextTimeout(10 * time.Second)
		_ = l.Kill(ctx)
		cancel()
		_ = l.Delete()

		time.Sleep(isolate)
		l, err = m.Create(fmt.Sprintf("w-g%d", i), lim)
		if err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		c = helperCmd("exit")
		if err := l.Start(c); err != nil {
			b.Fatal(err)
		}
		_ = c.Wait()
		add("gated", time.Since(t0))
		_ = l.Delete()

		time.Sleep(isolate)
		l, err = m.Create(fmt.Sprintf("w-t%d", i), lim)
		if err != nil {
			b.Fatal(err)
		}
		t0 = time.Now()
		c = helperCmd("exit")
		if err := threadFork(c, l.(*v1Leaf), own); err != nil {
			b.Fatal(err)
		}
		_ = c.Wait()
		add("thread-fork", time.Since(t0))
		_ = l.Delete()
	}
	b.StopTimer()
	bare := parts["bare"]
	for _, k := range []string{"bare", "hive-init", "place-first", "place-rest", "gated", "thread-fork"} {
		if d, ok := parts[k]; ok {
			b.ReportMetric(float64(d.Microseconds())/1000/float64(b.N), k+"-ms")
			if k != "bare" {
				b.ReportMetric(float64(d)/float64(bare), k+"/bare")
			}
		}
	}
	sort.Float64s(firstMS)
	b.Logf("first hierarchy written: %v; place-first per move (ms, sorted): %v", first, firstMS)
}

// ownV1Cgroups maps each v1 hierarchy of the leaf to this thread's cgroup
// directory there (where threadFork moves the thread back to).
func ownV1Cgroups() (map[cgroup1.Name]string, error) {
	b, err := os.ReadFile("/proc/self/cgroup")
	if err != nil {
		return nil, err
	}
	out := map[cgroup1.Name]string{}
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(l, ":", 3)
		if len(f) != 3 || f[1] == "" {
			continue
		}
		for _, c := range strings.Split(f[1], ",") {
			out[cgroup1.Name(c)] = filepath.Join(v1Mount, c, f[2])
		}
	}
	return out, nil
}

// threadFork starts c from an OS thread that sits in l's cgroups during the
// fork, so the child's first instruction runs in the leaf without a gate.
// v1 lets single threads move (tasks files); the thread moves back after.
func threadFork(c *exec.Cmd, l *v1Leaf, own map[cgroup1.Name]string) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	tid := strconv.Itoa(unix.Gettid())
	var moved []cgroup1.Name
	back := func() error {
		for _, n := range moved {
			if err := writeFile(own[n], "tasks", tid); err != nil {
				return fmt.Errorf("move thread back in %s: %w", n, err)
			}
		}
		return nil
	}
	for n, d := range l.dirs {
		if err := writeFile(d, "tasks", tid); err != nil {
			_ = back()
			return fmt.Errorf("move thread into %s: %w", d, err)
		}
		moved = append(moved, n)
	}
	err := c.Start()
	if berr := back(); berr != nil {
		// A thread that cannot go back must not run other goroutines:
		// returning with it locked makes the runtime end it.
		runtime.LockOSThread()
		return berr
	}
	return err
}
