package procfs

import (
	"bufio"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
)

func startSleep(t *testing.T) *exec.Cmd {
	t.Helper()
	cmd := exec.Command("sleep", "300")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd
}

func TestIdentityOfRealProcesses(t *testing.T) {
	r, err := New("")
	if err != nil {
		t.Fatal(err)
	}
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	start, err := r.StartTime(pid)
	if err != nil {
		t.Fatal(err)
	}
	ps, err := r.Process(pid)
	if err != nil {
		t.Fatal(err)
	}
	if start == 0 || start != ps.StartTicks {
		t.Fatalf("StartTime %d, prometheus/procfs says %d", start, ps.StartTicks)
	}
	self, _ := r.StartTime(os.Getpid())
	if self > start {
		t.Errorf("the test (%d) started after its child (%d)", self, start)
	}

	tests := []struct {
		name  string
		start uint64
		want  bool
	}{
		{"same process", start, true},
		{"recycled pid (other start time)", start + 1, false},
		{"older start time", start - 1, false},
	}
	for _, tc := range tests {
		if got, err := r.SameProcess(pid, tc.start); err != nil || got != tc.want {
			t.Errorf("%s: SameProcess = %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}

	// A zombie keeps its pid and start time but is no longer alive.
	cmd.Process.Signal(syscall.SIGKILL)
	for {
		id, err := r.Identity(pid)
		if err != nil {
			t.Fatal(err)
		}
		if id.State == 'Z' {
			break
		}
	}
	if got, err := r.SameProcess(pid, start); err != nil || got {
		t.Errorf("zombie: SameProcess = %v, %v; want false", got, err)
	}
	cmd.Wait()
	if got, err := r.SameProcess(pid, start); err != nil || got {
		t.Errorf("reaped: SameProcess = %v, %v; want false", got, err)
	}
	if _, err := r.StartTime(pid); !errors.Is(err, ErrNoProcess) {
		t.Errorf("reaped: StartTime error %v, want ErrNoProcess", err)
	}
	if _, err := r.StartTime(-3); !errors.Is(err, ErrNoProcess) {
		t.Errorf("pid -3: %v", err)
	}
}

func TestParseStat(t *testing.T) {
	tail := " 1 1 0 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 18446744073709551615"
	tests := []struct {
		name  string
		line  string
		start uint64
		ok    bool
	}{
		{"plain", "42 (sleep) S" + tail, 987654, true},
		{"name with spaces and parens", "42 (a) b (c d) R" + tail, 987654, true},
		{"truncated", "42 (sleep) S 1 1", 0, false},
		{"no name", "42 sleep S" + tail, 0, false},
		{"bad number", "42 (x) S" + strings.Replace(tail, "987654", "9x", 1), 0, false},
	}
	for _, tc := range tests {
		id, err := parseStat([]byte(tc.line))
		if (err == nil) != tc.ok || id.StartTicks != tc.start {
			t.Errorf("%s: %+v, %v", tc.name, id, err)
		}
	}
}

// ownCgroup returns this process's cgroup directory in the memory hierarchy
// (v1) or the unified one (v2).
func ownCgroup(t *testing.T) string {
	t.Helper()
	f, err := os.Open("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	v2 := ""
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		parts := strings.SplitN(sc.Text(), ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "memory" {
			return filepath.Join("/sys/fs/cgroup/memory", parts[2])
		}
		if parts[0] == "0" {
			v2 = filepath.Join("/sys/fs/cgroup", parts[2])
		}
	}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err != nil || v2 == "" {
		t.Fatal("no memory (v1) or unified (v2) cgroup found for this process")
	}
	return v2
}

func TestLeafHoldsRealCgroup(t *testing.T) {
	parent := ownCgroup(t)
	leaf := filepath.Join(parent, "identity-test-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(leaf, 0o755); err != nil {
		t.Fatal(err)
	}
	cmd := startSleep(t)
	pid := cmd.Process.Pid
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		os.Remove(leaf)
	})
	if err := os.WriteFile(filepath.Join(leaf, "cgroup.procs"), []byte(strconv.Itoa(pid)), 0); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		leaf string
		pid  int
		want bool
	}{
		{"moved process", leaf, pid, true},
		{"not in the parent", parent, pid, false},
		{"the test itself is in the parent", parent, os.Getpid(), true},
		{"other pid", leaf, os.Getpid(), false},
		{"pid prefix is no match", leaf, pid / 10, false},
		{"missing leaf", leaf + "-gone", pid, false},
	}
	for _, tc := range tests {
		got, err := LeafHolds(tc.leaf, tc.pid)
		if err != nil || got != tc.want {
			t.Errorf("%s: LeafHolds = %v, %v; want %v", tc.name, got, err, tc.want)
		}
	}
	cmd.Process.Kill()
	cmd.Wait()
	if got, err := LeafHolds(leaf, pid); err != nil || got {
		t.Errorf("after exit: LeafHolds = %v, %v", got, err)
	}
}
