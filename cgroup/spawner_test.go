package cgroup

import (
	"fmt"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

func threadStatus(t *testing.T) map[string]string {
	b, err := os.ReadFile("/proc/thread-self/status")
	if err != nil {
		t.Error(err)
		return nil
	}
	out := map[string]string{}
	for _, l := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(l, ":"); ok {
			out[k] = strings.TrimSpace(v)
		}
	}
	return out
}

// TestSpawnerThreadRestricted: the spawner's thread has no bounding set and
// no_new_privs (what its children inherit) and keeps its own capabilities;
// no other thread of the process is touched, before or after the spawner
// stops (a restricted thread handed back to the runtime would make every
// later root start inherit no_new_privs).
func TestSpawnerThreadRestricted(t *testing.T) {
	testkit.RequireRoot(t)
	sp := newSpawner(true)
	if sp.err != nil {
		t.Fatal(sp.err)
	}
	var in map[string]string
	if err := sp.run(func() error { in = threadStatus(t); return nil }); err != nil {
		t.Fatal(err)
	}
	if in["NoNewPrivs"] != "1" || in["CapBnd"] != "0000000000000000" || in["CapInh"] != "0000000000000000" || in["CapEff"] == "0000000000000000" {
		t.Errorf("spawner thread: NoNewPrivs %q CapBnd %q CapInh %q CapEff %q; want 1, 0, 0, non-zero", in["NoNewPrivs"], in["CapBnd"], in["CapInh"], in["CapEff"])
	}
	close(sp.reqs)
	// Many goroutines on fresh or reused threads: none is restricted.
	var wg sync.WaitGroup
	for i := 0; i < 32; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			st := threadStatus(t)
			if st["NoNewPrivs"] != "0" || st["CapBnd"] == "0000000000000000" {
				t.Errorf("another thread is restricted: NoNewPrivs %q CapBnd %q", st["NoNewPrivs"], st["CapBnd"])
			}
		}()
	}
	wg.Wait()
}

// TestSpawnerLeavesLeaf: after Starts from the spawner threads (v1: forked
// in the leaf; both: isolated ones from the restricted thread) no thread of
// this process is left in a leaf, and the leaf holds exactly the workers.
func TestSpawnerLeavesLeaf(t *testing.T) {
	_, l := newTestLeaf(t, "w-spawner", Limits{MemoryMax: 64 << 20, PidsMax: 16})
	var pids []int
	for i, opts := range [][]StartOption{nil, {WithIsolation(Isolation{UID: testWorkerUID, GID: testWorkerGID})}, nil} {
		c := helperCmd("sleep")
		if err := l.Start(c, opts...); err != nil {
			t.Fatalf("start %d: %v", i, err)
		}
		defer func() { _ = c.Process.Kill(); _ = c.Wait() }()
		pids = append(pids, c.Process.Pid)
	}
	got, err := l.Pids()
	if err != nil {
		t.Fatal(err)
	}
	sort.Ints(got)
	sort.Ints(pids)
	if fmt.Sprint(got) != fmt.Sprint(pids) {
		t.Errorf("leaf pids %v, want exactly the workers %v", got, pids)
	}
	tasks, _ := os.ReadDir("/proc/self/task")
	for _, task := range tasks {
		cg, err := os.ReadFile("/proc/self/task/" + task.Name() + "/cgroup")
		if err == nil && strings.Contains(string(cg), "/workers/") {
			t.Errorf("thread %s of this process is still in a leaf: %q", task.Name(), cg)
		}
	}
}
