package cgroup

import (
	"bufio"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startModes are the ways Start can place a process: the driver's default
// (no gate), and the spawn gate, the fallback, in both of its forms.
func startModes() []struct {
	name string
	opts Options
} {
	modes := []struct {
		name string
		opts Options
	}{
		// No gate: v1 forks from a spawner thread in the leaf, v2 uses
		// CLONE_INTO_CGROUP (isolated: from a restricted spawner thread).
		{"default", Options{}},
		// The gate, the fallback: the binary itself re-executed ...
		{"gate", Options{ForceGate: true, GatePath: GateSelf}},
		// ... and the small rbee-gate binary.
		{"tiny-gate", Options{ForceGate: true, GatePath: testGate.path}},
	}
	return modes
}

func TestOOMKill(t *testing.T) {
	for _, sm := range startModes() {
		t.Run(sm.name, func(t *testing.T) {
			m := newTestManager(t, sm.opts)
			l, err := m.Create("w-oom", Limits{MemoryMax: 64 << 20, PidsMax: 64})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			evs, err := l.OOMEvents(ctx)
			if err != nil {
				t.Fatal(err)
			}
			cmd := helperCmd("oom")
			if err := l.Start(cmd); err != nil {
				t.Fatal(err)
			}
			werr := cmd.Wait()
			// The count must already be right when Wait returns: callers join
			// the evidence after Wait (the v1 eventfd fires ~10 ms earlier).
			st, err := l.Stats()
			if err != nil {
				t.Fatal(err)
			}
			var ee *exec.ExitError
			if !errors.As(werr, &ee) {
				t.Fatalf("Wait = %v, want an exit by SIGKILL", werr)
			}
			ws := ee.Sys().(syscall.WaitStatus)
			if !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
				t.Fatalf("wait status %v, want killed by SIGKILL", werr)
			}
			if st.OOMKills != 1 {
				t.Errorf("Stats().OOMKills = %d after Wait, want 1", st.OOMKills)
			}
			if st.MemoryPeak < 32<<20 || st.MemoryPeak > 65<<20 {
				t.Errorf("MemoryPeak = %d, want between 32 MiB and the 64 MiB limit", st.MemoryPeak)
			}
			select {
			case ev, ok := <-evs:
				if !ok {
					t.Fatal("event channel closed without an OOM event")
				}
				if ev.Leaf != "w-oom" || ev.Kills != 1 {
					t.Errorf("event = %+v, want leaf w-oom, kills 1", ev)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("no OOM event within 10 s")
			}
			if err := l.Kill(ctx); err != nil {
				t.Fatal(err)
			}
			if err := l.Delete(); err != nil {
				t.Fatal(err)
			}
			for _, d := range leafDirsOf(l) {
				if _, err := os.Stat(d); !os.IsNotExist(err) {
					t.Errorf("%s still exists after Delete (stat: %v)", d, err)
				}
			}
			// Deleting ends the subscription and closes the channel.
			select {
			case ev, ok := <-evs:
				if ok {
					t.Errorf("unexpected event after delete: %+v", ev)
				}
			case <-time.After(5 * time.Second):
				t.Error("event channel still open 5 s after Delete")
			}
		})
	}
}

func TestKillTree(t *testing.T) {
	for _, sm := range startModes() {
		t.Run(sm.name, func(t *testing.T) {
			m := newTestManager(t, sm.opts)
			l, err := m.Create("w-tree", Limits{MemoryMax: 256 << 20, PidsMax: 64})
			if err != nil {
				t.Fatal(err)
			}
			cmd := helperCmd("tree")
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Start(cmd); err != nil {
				t.Fatal(err)
			}
			line, err := bufio.NewReader(out).ReadString('\n')
			if err != nil {
				t.Fatalf("tree helper: %v", err)
			}
			f := strings.Fields(line)
			if len(f) != 3 || f[0] != "ready" {
				t.Fatalf("tree helper said %q", line)
			}
			child, _ := strconv.Atoi(f[1])
			daemon, _ := strconv.Atoi(f[2])
			pids, err := l.Pids()
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []int{cmd.Process.Pid, child, daemon} {
				if !contains(pids, p) {
					t.Errorf("pid %d not in leaf pids %v", p, pids)
				}
			}
			// A child of the worker authenticates as the worker.
			for _, p := range []int{cmd.Process.Pid, daemon} {
				if id, err := m.LeafOf(p); err != nil || id != "w-tree" {
					t.Errorf("LeafOf(%d) = %q, %v; want w-tree", p, id, err)
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if err := l.Kill(ctx); err != nil {
				t.Fatal(err)
			}
			if ps, err := l.Pids(); err != nil || len(ps) != 0 {
				t.Errorf("after Kill: pids %v, %v; want none", ps, err)
			}
			_, _ = io.Copy(io.Discard, out)
			werr := cmd.Wait()
			var ee *exec.ExitError
			if !errors.As(werr, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
				t.Errorf("Wait = %v, want killed", werr)
			}
			// The daemon was reparented away from us; it must be dead anyway.
			deadline := time.Now().Add(5 * time.Second)
			for _, p := range []int{child, daemon} {
				for alive(p) && time.Now().Before(deadline) {
					time.Sleep(10 * time.Millisecond)
				}
				if alive(p) {
					t.Errorf("pid %d survived Kill", p)
				}
			}
			if err := l.Delete(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestPidsMax(t *testing.T) {
	m := newTestManager(t, Options{})
	const limit = 24
	l, err := m.Create("w-pids", Limits{MemoryMax: 512 << 20, PidsMax: limit})
	if err != nil {
		t.Fatal(err)
	}
	cmd := helperCmd("pids")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Start(cmd); err != nil {
		t.Fatal(err)
	}
	// The helper reports a refused fork; or the Go runtime of the helper (or
	// of a child) dies because it cannot create a thread. Either way the
	// limit must have held.
	line, _ := bufio.NewReader(out).ReadString('\n')
	st, err := l.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.PidsCurrent > limit {
		t.Errorf("pids.current = %d > pids.max %d", st.PidsCurrent, limit)
	}
	ev, err := readKV(filepath.Join(pidsDirOf(l), "pids.events"))
	if err != nil {
		t.Fatal(err)
	}
	if ev["max"] == 0 {
		t.Errorf("pids.events max = 0: the limit was never hit (helper said %q)", line)
	}
	t.Logf("helper: %q; pids.current %d; pids.events max %d", strings.TrimSpace(line), st.PidsCurrent, ev["max"])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, out)
	_ = cmd.Wait()
	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
}

func TestStartPreservesCmd(t *testing.T) {
	for _, sm := range startModes() {
		t.Run(sm.name, func(t *testing.T) {
			m := newTestManager(t, sm.opts)
			l, err := m.Create("w-env", Limits{MemoryMax: 256 << 20})
			if err != nil {
				t.Fatal(err)
			}
			dir := t.TempDir()
			extraR, extraW, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer extraR.Close()
			cmd := helperCmd("env")
			cmd.Env = append(cmd.Env, "RBEE_TEST_X=hello")
			cmd.Dir = dir
			cmd.ExtraFiles = []*os.File{extraW}
			spa := &syscall.SysProcAttr{Setpgid: true}
			cmd.SysProcAttr = spa
			stdin, err := cmd.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := l.Start(cmd); err != nil {
				t.Fatal(err)
			}
			extraW.Close()
			if cmd.SysProcAttr != spa || spa.UseCgroupFD || cmd.Path != testHelperBin || cmd.Args[0] != "cgroup-test-helper" || len(cmd.ExtraFiles) != 1 {
				t.Errorf("cmd fields changed by Start: path %q args %q sysprocattr %+v extra %d", cmd.Path, cmd.Args, cmd.SysProcAttr, len(cmd.ExtraFiles))
			}
			got := map[string]string{}
			sc := bufio.NewScanner(out)
			for sc.Scan() {
				k, v, _ := strings.Cut(sc.Text(), "=")
				got[k] = v
				if k == "EXTRA" {
					break
				}
			}
			pid := cmd.Process.Pid
			want := map[string]string{
				"X": "hello", "GATE": "false", "WD": dir, "EXTRA": "true",
				"PGID": strconv.Itoa(pid) + " PID",
			}
			for k, v := range want {
				if k == "PGID" {
					if !strings.HasPrefix(got["PGID"], strconv.Itoa(pid)+" PID="+strconv.Itoa(pid)) && got["PGID"] != strconv.Itoa(pid)+" PID="+strconv.Itoa(pid) {
						t.Errorf("PGID line %q, want pgid = pid = %d (Setpgid kept, same pid after exec)", got["PGID"], pid)
					}
					continue
				}
				if got[k] != v {
					t.Errorf("%s = %q, want %q (all: %v)", k, got[k], v, got)
				}
			}
			// Only the caller's ExtraFiles[0] may be open: the gate's pipes
			// must not leak into the worker.
			if fds, base := fdNumbers(got["FDS"]), baselineFDs(t); fds != base {
				t.Errorf("worker's fds above 2: %q, a plain exec.Cmd gives %q", fds, base)
			}
			if !strings.Contains(got["CG"], "workers/w-env") {
				t.Errorf("worker saw cgroup %q, want one in workers/w-env", got["CG"])
			}
			extra, _ := io.ReadAll(extraR)
			if string(extra) != "extra-ok\n" {
				t.Errorf("ExtraFiles[0] got %q", extra)
			}
			if id, err := m.LeafOf(pid); err != nil || id != "w-env" {
				t.Errorf("LeafOf(%d) = %q, %v", pid, id, err)
			}
			stdin.Close()
			if err := cmd.Wait(); err != nil {
				t.Errorf("Wait: %v", err)
			}
			if err := l.Delete(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestStartMissingBinary(t *testing.T) {
	for _, sm := range startModes() {
		t.Run(sm.name, func(t *testing.T) {
			m := newTestManager(t, sm.opts)
			l, err := m.Create("w-nobin", Limits{MemoryMax: 64 << 20})
			if err != nil {
				t.Fatal(err)
			}
			cmd := &exec.Cmd{Path: "/nonexistent/worker", Args: []string{"worker"}}
			err = l.Start(cmd)
			if !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("Start = %v, want a not-exist error", err)
			}
			if ps, err := l.Pids(); err != nil || len(ps) != 0 {
				t.Errorf("leaf pids %v, %v after failed start; want none", ps, err)
			}
			if err := l.Delete(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestStatsAndList(t *testing.T) {
	m, a := newTestLeaf(t, "w-a", Limits{MemoryMax: 128 << 20, PidsMax: 16, CPUWeight: 200})
	if _, err := m.Create("w-b1", Limits{MemoryMax: 128 << 20}); err != nil {
		t.Fatal(err)
	}
	ids, err := m.List()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(ids, ",") != "w-a,w-b1" {
		t.Errorf("List = %v, want [w-a w-b1]", ids)
	}
	cmd := helperCmd("burn")
	if err := a.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	st, err := a.Stats()
	if err != nil {
		t.Fatal(err)
	}
	if st.CPUUsage < 10*time.Millisecond || st.MemoryPeak == 0 || st.OOMKills != 0 || st.PidsCurrent != 0 {
		t.Errorf("Stats = %+v, want CPU >= 10ms, peak > 0, no OOM, no pids", st)
	}
	if _, err := m.LeafOf(os.Getpid()); !errors.Is(err, ErrNotFound) {
		t.Errorf("LeafOf(self) = %v, want ErrNotFound", err)
	}
	if _, err := m.LeafOf(1 << 30); !errors.Is(err, ErrNotFound) {
		t.Errorf("LeafOf(no such pid) = %v, want ErrNotFound", err)
	}
	l, err := m.Load("w-b1")
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
	if err := l.Delete(); err != nil {
		t.Errorf("second Delete = %v, want nil", err)
	}
	if _, err := l.Stats(); !errors.Is(err, ErrNotFound) {
		t.Errorf("Stats of deleted leaf = %v, want ErrNotFound", err)
	}
	if _, err := m.Load("w-b1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Load(deleted) = %v, want ErrNotFound", err)
	}
}

func TestDeleteBusyLeaf(t *testing.T) {
	_, l := newTestLeaf(t, "w-busy", Limits{MemoryMax: 128 << 20})
	cmd := helperCmd("sleep")
	if err := l.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := l.Delete(); err == nil {
		t.Fatal("Delete of a leaf with a running process succeeded")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := l.Kill(ctx); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
}

// fdNumbers keeps the numbers of an "n->target,..." list, dropping what the
// Go runtime opens itself (epoll, eventfd, cgroup cpu files for GOMAXPROCS).
func fdNumbers(list string) string {
	var out []string
	for _, e := range strings.Split(list, ",") {
		n, target, _ := strings.Cut(e, "->")
		if n == "" || strings.HasPrefix(target, "anon_inode:") || strings.HasPrefix(target, "/sys/fs/cgroup/") {
			continue
		}
		out = append(out, n)
	}
	return strings.Join(out, ",")
}

// baselineFDs runs the env helper with a plain exec.Cmd and one ExtraFile:
// the fds a worker inherits without any cgroup placement.
func baselineFDs(t *testing.T) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	cmd := helperCmd("env")
	cmd.ExtraFiles = []*os.File{w}
	cmd.Stdin = strings.NewReader("\n")
	out, err := cmd.Output()
	w.Close()
	if err != nil {
		t.Fatalf("baseline helper: %v", err)
	}
	for _, line := range strings.Split(string(out), "\n") {
		if v, ok := strings.CutPrefix(line, "FDS="); ok {
			return fdNumbers(v)
		}
	}
	t.Fatalf("baseline helper printed no FDS line: %q", out)
	return ""
}

func contains(xs []int, x int) bool {
	for _, v := range xs {
		if v == x {
			return true
		}
	}
	return false
}
