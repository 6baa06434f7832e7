package cgroup

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// hiveCaps is the bounding set docs/security.md proposes for the hive's
// unit (without the additions for shared-uid backends and low ports).
var hiveCaps = []int{unix.CAP_SETUID, unix.CAP_SETGID, unix.CAP_SETPCAP, unix.CAP_KILL, unix.CAP_CHOWN, unix.CAP_DAC_OVERRIDE}

// runCappedExec drops every capability but RBEE_TEST_KEEP_CAPS from the
// bounding set and re-executes this binary as "capped-hive": as uid 0 the
// new image gets exactly the bounding set as its capabilities, like the hive
// under systemd's CapabilityBoundingSet= (setpriv --bounding-set does the
// same; the VM has no setpriv).
func runCappedExec() int {
	runtime.LockOSThread()
	keep := map[int]bool{}
	for _, f := range strings.Split(os.Getenv("RBEE_TEST_KEEP_CAPS"), ",") {
		if n, err := strconv.Atoi(f); err == nil {
			keep[n] = true
		}
	}
	last, err := capLastCap()
	if err != nil {
		fmt.Println("RESULT", err)
		return 2
	}
	for c := 0; c <= last; c++ {
		if !keep[c] {
			if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
				fmt.Println("RESULT drop", c, err)
				return 2
			}
		}
	}
	// The first of duplicate variables wins in Go's Getenv: replace, not append.
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, helperEnv+"=") {
			env = append(env, kv)
		}
	}
	env = append(env, helperEnv+"=capped-hive")
	err = syscall.Exec("/proc/self/exe", []string{"cgroup-test-helper"}, env)
	fmt.Println("RESULT exec", err)
	return 2
}

// runCappedHive does what the hive does to an isolated worker, with only
// the capabilities runCappedExec left: open the tree, create a leaf, start
// an isolated worker in it, signal it, kill the leaf, delete it.
func runCappedHive() int {
	err := cappedHive()
	if err != nil {
		fmt.Println("RESULT", err)
		return 1
	}
	fmt.Println("RESULT ok")
	return 0
}

func cappedHive() error {
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return err
	}
	for _, line := range strings.Split(string(st), "\n") {
		if strings.HasPrefix(line, "CapEff:") {
			fmt.Println("CAPEFF", strings.TrimSpace(strings.TrimPrefix(line, "CapEff:")))
		}
	}
	m, err := New(Options{Root: os.Getenv("RBEE_CGROUP_TEST_ROOT")})
	if err != nil {
		return err
	}
	l, err := m.Create(os.Getenv("RBEE_TEST_LEAF"), Limits{MemoryMax: 64 << 20, PidsMax: 8})
	if err != nil {
		return err
	}
	c := helperCmd("sleep")
	if err := l.Start(c, WithIsolation(Isolation{UID: testWorkerUID, GID: testWorkerGID})); err != nil {
		_ = l.Delete()
		return err
	}
	if err := syscall.Kill(c.Process.Pid, syscall.SIGTERM); err != nil {
		// The test's cleanup (full root) kills the leaf.
		return fmt.Errorf("SIGTERM to the worker: %w", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := l.Kill(ctx); err != nil {
		return err
	}
	_ = c.Wait()
	return l.Delete()
}

// TestHiveBoundingSet runs the hive's part (tree, leaf, isolated start,
// signal, kill, delete) in a process whose capabilities are the proposed
// bounding set: it must work; without CAP_SETPCAP or CAP_KILL it must fail
// at the step that needs it (so the reduced set really was in effect).
func TestHiveBoundingSet(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates cgroups (CI runs as root)")
	}
	opts := testOptions(Options{}, randHex(t))
	m, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(t, m) })
	without := func(c int) []int {
		var out []int
		for _, x := range hiveCaps {
			if x != c {
				out = append(out, x)
			}
		}
		return out
	}
	tests := []struct {
		name string
		caps []int
		want string // "ok" or a substring of the failure
	}{
		{"proposed", hiveCaps, "ok"},
		// The cgroup part alone needs no DAC capability once the tree
		// exists (the test made it, as systemd's Delegate= does).
		{"cgroup part: setuid setgid setpcap kill", []int{unix.CAP_SETUID, unix.CAP_SETGID, unix.CAP_SETPCAP, unix.CAP_KILL}, "ok"},
		{"no CAP_SETPCAP", without(unix.CAP_SETPCAP), "drop bounding set"},
		{"no CAP_SETUID", without(unix.CAP_SETUID), "setresuid"},
		{"no CAP_KILL", without(unix.CAP_KILL), "SIGTERM to the worker: operation not permitted"},
	}
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var keep []string
			var mask uint64
			for _, c := range tc.caps {
				keep = append(keep, strconv.Itoa(c))
				mask |= 1 << c
			}
			c := exec.Command("/proc/self/exe")
			c.Args = []string{"cgroup-test-helper"}
			c.Env = append(os.Environ(), helperEnv+"=capped", "RBEE_TEST_KEEP_CAPS="+strings.Join(keep, ","),
				"RBEE_CGROUP_TEST_ROOT="+opts.Root, fmt.Sprintf("RBEE_TEST_LEAF=w-capped%d", i))
			out, _ := c.CombinedOutput()
			if !strings.Contains(string(out), fmt.Sprintf("CAPEFF %016x", mask)) {
				t.Fatalf("capped hive did not run with exactly the set (want CapEff %016x):\n%s", mask, out)
			}
			res := ""
			for _, line := range strings.Split(string(out), "\n") {
				if r, ok := strings.CutPrefix(line, "RESULT "); ok {
					res = r
				}
			}
			if tc.want == "ok" && res != "ok" || tc.want != "ok" && !strings.Contains(res, tc.want) {
				t.Errorf("result %q, want %q\n%s", res, tc.want, out)
			}
		})
	}
}
