package cgroup

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Test identities: in the default worker range of internal/workeruser,
// which no account of a stock host uses.
const (
	testWorkerUID = 70123
	testWorkerGID = 70123
	testExtraGID  = 79999
)

// runIsolatedHelper tries what a hostile worker would: raise its own memory
// limit, move itself into its parent cgroup, SIGKILL a root process. It
// prints one "NAME=<error or ok>" line per attempt, then waits for stdin to
// close so the test can read /proc/<pid>/status from outside.
func runIsolatedHelper() int {
	try := func(name, env string, do func(string) error) {
		target := os.Getenv(env)
		if target == "" {
			return
		}
		err := do(target)
		if err == nil {
			fmt.Printf("%s=ok\n", name)
			return
		}
		fmt.Printf("%s=%v\n", name, err)
	}
	self := strconv.Itoa(os.Getpid())
	try("WRITE_LIMIT", "RBEE_TEST_LIMIT_FILE", func(p string) error {
		// Write back the current value: any write needs the permission, and
		// v1 refuses a memory limit above memsw with EINVAL.
		cur, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return appendFile(p, strings.TrimSpace(string(cur)))
	})
	try("WRITE_PARENT_PROCS", "RBEE_TEST_PARENT_PROCS", func(p string) error { return appendFile(p, self) })
	try("WRITE_OWN_PROCS", "RBEE_TEST_OWN_PROCS", func(p string) error { return appendFile(p, self) })
	kill := func(p string) error {
		victim, err := strconv.Atoi(p)
		if err != nil {
			return err
		}
		return syscall.Kill(victim, syscall.SIGKILL)
	}
	try("KILL_ROOT", "RBEE_TEST_VICTIM", kill)
	try("KILL_PEER", "RBEE_TEST_PEER", kill)
	try("READ_PEER_ENVIRON", "RBEE_TEST_PEER", func(p string) error {
		_, err := os.ReadFile("/proc/" + p + "/environ")
		return err
	})
	sid, _ := unix.Getsid(0)
	fmt.Printf("SID=%d PID=%d\n", sid, os.Getpid())
	fmt.Println("END=1")
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

func appendFile(path, value string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, werr := f.WriteString(value)
	cerr := f.Close()
	return errors.Join(werr, cerr)
}

// procStatus returns the "Key:\tvalue" lines of /proc/<pid>/status.
func procStatus(t *testing.T, pid int) map[string]string {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, ":")
		if ok {
			out[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return out
}

// leafAttackFiles are the files a worker must not be able to write: its own
// memory limit, its own leaf's cgroup.procs and the parent's (moving itself
// out of the leaf).
func leafAttackFiles(l Leaf) (limit, ownProcs, parentProcs string) {
	mem := memDirOf(l)
	limit = filepath.Join(mem, "memory.max")
	if _, ok := l.(*v1Leaf); ok {
		limit = filepath.Join(mem, "memory.limit_in_bytes")
	}
	return limit, filepath.Join(mem, "cgroup.procs"), filepath.Join(filepath.Dir(mem), "cgroup.procs")
}

func TestStartIsolated(t *testing.T) {
	modes := startModes()
	cases := []struct {
		name string
		iso  *Isolation
	}{
		{"isolated", &Isolation{UID: testWorkerUID, GID: testWorkerGID, Groups: []uint32{testExtraGID}}},
		// uid 0 with isolation (a backend stated as root): still no
		// capabilities and no_new_privs.
		{"isolated-uid0", &Isolation{UID: 0, GID: 0}},
		// The path without isolation stays what it was: root, full caps.
		{"root", nil},
	}
	for _, sm := range modes {
		for _, tc := range cases {
			t.Run(sm.name+"/"+tc.name, func(t *testing.T) {
				m := newTestManager(t, sm.opts)
				l, err := m.Create("w-iso", Limits{MemoryMax: 128 << 20, PidsMax: 32})
				if err != nil {
					t.Fatal(err)
				}
				victim := helperCmd("sleep")
				if err := victim.Start(); err != nil {
					t.Fatal(err)
				}
				defer func() { _ = victim.Process.Kill(); _ = victim.Wait() }()

				// Another isolated worker, in its own leaf under the next
				// uid, that the worker under test must not touch either.
				var peer *exec.Cmd
				if tc.iso != nil && tc.iso.UID != 0 {
					pl, err := m.Create("w-peer", Limits{MemoryMax: 64 << 20, PidsMax: 8})
					if err != nil {
						t.Fatal(err)
					}
					peer = helperCmd("sleep")
					peer.Env = append(peer.Env, "RBEE_WORKER_TOKEN=peer-secret")
					if err := pl.Start(peer, WithIsolation(Isolation{UID: tc.iso.UID + 1, GID: tc.iso.GID + 1})); err != nil {
						t.Fatal(err)
					}
					defer func() { _ = peer.Process.Kill(); _ = peer.Wait() }()
				}
				limit, ownProcs, parentProcs := leafAttackFiles(l)
				cmd := helperCmd("isolated")
				// Every worker tries to lift its limit (a root one must
				// succeed: proof that the attempt itself works); only a
				// worker with its own uid is pointed at the rest.
				cmd.Env = append(cmd.Env, "RBEE_TEST_LIMIT_FILE="+limit)
				if tc.iso != nil && tc.iso.UID != 0 {
					cmd.Env = append(cmd.Env, "RBEE_TEST_OWN_PROCS="+ownProcs, "RBEE_TEST_PARENT_PROCS="+parentProcs,
						"RBEE_TEST_VICTIM="+strconv.Itoa(victim.Process.Pid), "RBEE_TEST_PEER="+strconv.Itoa(peer.Process.Pid))
				}
				stdin, err := cmd.StdinPipe()
				if err != nil {
					t.Fatal(err)
				}
				out, err := cmd.StdoutPipe()
				if err != nil {
					t.Fatal(err)
				}
				var opts []StartOption
				if tc.iso != nil {
					opts = append(opts, WithIsolation(*tc.iso))
				}
				if err := l.Start(cmd, opts...); err != nil {
					t.Fatal(err)
				}
				defer func() { stdin.Close(); _ = cmd.Wait() }()
				got := readHelperLines(t, out)
				pid := cmd.Process.Pid
				st := procStatus(t, pid)
				if ps, _ := l.Pids(); !contains(ps, pid) {
					t.Errorf("pid %d not in its leaf (pids %v)", pid, ps)
				}

				if tc.iso == nil {
					if !strings.HasPrefix(st["Uid"], "0 ") || st["CapEff"] == "0000000000000000" || st["NoNewPrivs"] != "0" {
						t.Errorf("root path changed: Uid %q CapEff %q NoNewPrivs %q", st["Uid"], st["CapEff"], st["NoNewPrivs"])
					}
					if got["WRITE_LIMIT"] != "ok" {
						t.Errorf("a root worker could not write its limit: %q (the test's own check is broken)", got["WRITE_LIMIT"])
					}
					return
				}
				u, g := strconv.Itoa(int(tc.iso.UID)), strconv.Itoa(int(tc.iso.GID))
				var groups []string
				for _, x := range tc.iso.Groups {
					groups = append(groups, strconv.Itoa(int(x)))
				}
				want := map[string]string{
					"Uid":        strings.Join([]string{u, u, u, u}, " "),
					"Gid":        strings.Join([]string{g, g, g, g}, " "),
					"Groups":     strings.Join(groups, " "),
					"CapInh":     "0000000000000000",
					"CapPrm":     "0000000000000000",
					"CapEff":     "0000000000000000",
					"CapBnd":     "0000000000000000",
					"CapAmb":     "0000000000000000",
					"NoNewPrivs": "1",
				}
				for k, v := range want {
					if st[k] != v {
						t.Errorf("/proc/%d/status %s = %q, want %q", pid, k, st[k], v)
					}
				}
				if got["SID"] != fmt.Sprintf("%d PID=%d", pid, pid) {
					t.Errorf("worker session %q, want its own (sid = pid = %d)", got["SID"], pid)
				}
				if tc.iso.UID == 0 {
					// uid 0 still owns the root-owned files (DAC needs no
					// capability for the owner): isolation without a uid
					// of its own only removes capabilities.
					return
				}
				for _, k := range []string{"WRITE_LIMIT", "WRITE_OWN_PROCS", "WRITE_PARENT_PROCS", "KILL_ROOT", "KILL_PEER", "READ_PEER_ENVIRON"} {
					if !strings.Contains(got[k], "permission denied") && !strings.Contains(got[k], "operation not permitted") {
						t.Errorf("%s = %q, want it refused with EACCES/EPERM", k, got[k])
					}
				}
				if !alive(victim.Process.Pid) {
					t.Error("the isolated worker killed a root process")
				}
				if !alive(peer.Process.Pid) {
					t.Error("the isolated worker killed another worker")
				}
				if ps, _ := l.Pids(); !contains(ps, pid) {
					t.Errorf("pid %d left its leaf (pids %v)", pid, ps)
				}
			})
		}
	}
}

// readHelperLines reads KEY=VALUE lines up to END.
func readHelperLines(t *testing.T, r io.Reader) map[string]string {
	t.Helper()
	got := map[string]string{}
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), "=")
		if k == "END" {
			return got
		}
		got[k] = v
	}
	t.Fatalf("helper ended before END: %v (%v)", got, sc.Err())
	return nil
}

// TestLeafFilesRootOwned: every control file of a fresh leaf (and the leaf
// directory) belongs to root and is writable by nobody else, in every
// hierarchy, so an isolated worker can change nothing about its cgroup.
func TestLeafFilesRootOwned(t *testing.T) {
	_, l := newTestLeaf(t, "w-own", Limits{MemoryMax: 64 << 20})
	dirs := leafDirsOf(l)
	checked := 0
	for _, d := range dirs {
		ents, err := os.ReadDir(d)
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range append([]string{d}, names(d, ents)...) {
			fi, err := os.Stat(p)
			if err != nil {
				t.Fatal(err)
			}
			st := fi.Sys().(*syscall.Stat_t)
			if st.Uid != 0 || fi.Mode().Perm()&0o022 != 0 {
				t.Errorf("%s: uid %d mode %v, want root-owned and not group/other-writable", p, st.Uid, fi.Mode())
			}
			checked++
		}
	}
	if checked < 5 {
		t.Fatalf("checked only %d files in %v", checked, dirs)
	}
}

func names(dir string, ents []os.DirEntry) []string {
	out := make([]string, len(ents))
	for i, e := range ents {
		out[i] = filepath.Join(dir, e.Name())
	}
	return out
}

// TestStartIsolatedExecRefused: the switch happens before exec, so a worker
// binary the worker uid may not execute fails Start with EACCES (and leaves
// nothing behind), exactly as for a plain exec.
func TestStartIsolatedExecRefused(t *testing.T) {
	for _, sm := range startModes() {
		t.Run(sm.name, func(t *testing.T) {
			m := newTestManager(t, sm.opts)
			l, err := m.Create("w-noexec", Limits{MemoryMax: 64 << 20})
			if err != nil {
				t.Fatal(err)
			}
			bin := filepath.Join(t.TempDir(), "root-only")
			if err := os.WriteFile(bin, []byte("#!/bin/sh\nexit 0\n"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.Chmod(filepath.Dir(bin), 0o755); err != nil {
				t.Fatal(err)
			}
			err = l.Start(&exec.Cmd{Path: bin, Args: []string{"w"}}, WithIsolation(Isolation{UID: testWorkerUID, GID: testWorkerGID}))
			if !errors.Is(err, os.ErrPermission) {
				t.Fatalf("Start = %v, want a permission error", err)
			}
			if ps, err := l.Pids(); err != nil || len(ps) != 0 {
				t.Errorf("leaf pids %v, %v after a refused start; want none", ps, err)
			}
			// The same binary as root starts: the refusal came from the uid.
			c := &exec.Cmd{Path: bin, Args: []string{"w"}}
			if err := l.Start(c); err != nil {
				t.Fatalf("root start: %v", err)
			}
			if err := c.Wait(); err != nil {
				t.Fatalf("root run: %v", err)
			}
		})
	}
}

func TestStartIsolatedRejectsConflicts(t *testing.T) {
	_, l := newTestLeaf(t, "w-conf", Limits{MemoryMax: 64 << 20})
	iso := WithIsolation(Isolation{UID: testWorkerUID, GID: testWorkerGID})
	for name, spa := range map[string]*syscall.SysProcAttr{
		"credential": {Credential: &syscall.Credential{Uid: 1}},
		"setpgid":    {Setpgid: true},
		"ambient":    {AmbientCaps: []uintptr{1}},
	} {
		c := helperCmd("exit")
		c.SysProcAttr = spa
		if err := l.Start(c, iso); !errors.Is(err, ErrInvalid) || c.Process != nil {
			t.Errorf("%s: Start = %v (process %v), want ErrInvalid and nothing started", name, err, c.Process)
		}
	}
}

func TestIsolationEncoding(t *testing.T) {
	for _, iso := range []Isolation{
		{UID: 1, GID: 2},
		{UID: 640000, GID: 640001, Groups: []uint32{5, 44, 4294967294}},
		{UID: 4294967294, GID: 0, Groups: []uint32{0}},
	} {
		got, err := decodeIsolation(iso.encode())
		if err != nil || got.UID != iso.UID || got.GID != iso.GID || fmt.Sprint(got.Groups) != fmt.Sprint(iso.Groups) {
			t.Errorf("round trip of %+v = %+v, %v", iso, got, err)
		}
	}
	for _, bad := range []string{"", "1:2", "x:1:", "1:2:3,", "1:2:a", "-1:2:", "4294967296:1:"} {
		if _, err := decodeIsolation(bad); err == nil {
			t.Errorf("decodeIsolation(%q) accepted", bad)
		}
	}
}

// BenchmarkSpawnIsolated compares, in one loop, Start + Wait of the same
// program into the same leaf as root (today's path) and with WithIsolation
// (credential switch, capability drop, no_new_privs, setsid); reported ratio
// isolated/root.
func BenchmarkSpawnIsolated(b *testing.B) {
	for _, sm := range startModes() {
		b.Run(sm.name, func(b *testing.B) {
			m := newTestManager(b, sm.opts)
			l, err := m.Create("w-benchiso", Limits{MemoryMax: 256 << 20, PidsMax: 64})
			if err != nil {
				b.Fatal(err)
			}
			iso := WithIsolation(Isolation{UID: testWorkerUID, GID: testWorkerGID})
			var root, isolated time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for _, withIso := range []bool{false, true} {
					c := helperCmd("exit")
					t0 := time.Now()
					var err error
					if withIso {
						err = l.Start(c, iso)
					} else {
						err = l.Start(c)
					}
					if err != nil {
						b.Fatal(err)
					}
					if err := c.Wait(); err != nil {
						b.Fatal(err)
					}
					if withIso {
						isolated += time.Since(t0)
					} else {
						root += time.Since(t0)
					}
				}
			}
			b.ReportMetric(float64(root.Microseconds())/1000/float64(b.N), "root-ms/op")
			b.ReportMetric(float64(isolated.Microseconds())/1000/float64(b.N), "isolated-ms/op")
			b.ReportMetric(float64(isolated)/float64(root), "isolated/root")
		})
	}
}
