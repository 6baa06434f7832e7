package cgroup

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3"
	"github.com/containerd/cgroups/v3/cgroup1"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// Child programs are this test binary re-executed with helperEnv set, so the
// tests need no external tools and run unchanged inside the VM.
const helperEnv = "RBEE_CGROUP_TEST_HELPER"

// testHelperBin is a copy of the test binary that every uid may execute;
// set once by TestMain.
var testHelperBin string

// copyTestBinary copies the running test binary into dir, which it makes
// traversable by every uid.
func copyTestBinary(dir string) (string, error) {
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	b, err := os.ReadFile("/proc/self/exe")
	if err != nil {
		return "", err
	}
	p := filepath.Join(dir, "cgroup-test-helper")
	return p, os.WriteFile(p, b, 0o755)
}

// helperMaxLife bounds every helper so nothing outlives a failed test run.
const helperMaxLife = 2 * time.Minute

func TestMain(m *testing.M) {
	MaybeRunGate()
	if mode := os.Getenv(helperEnv); mode != "" {
		os.Exit(runHelper(mode))
	}
	dir, err := os.MkdirTemp("", "rbee-cgroup-test-gate-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	testGate = findTestGate(dir)
	if testHelperBin, err = copyTestBinary(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = os.RemoveAll(dir)
	os.Exit(code)
}

func runHelper(mode string) int {
	switch mode {
	case "exit":
		return 0
	case "stamp", "stamp-sleep":
		// CLOCK_MONOTONIC as early as this binary's main can take it.
		var ts unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		fmt.Println(ts.Nano())
		if mode == "stamp-sleep" {
			time.Sleep(helperMaxLife)
		}
		return 0
	case "new-manager":
		// Run as another user by TestUnprivilegedRefused.
		if _, err := New(Options{Root: os.Getenv("RBEE_CGROUP_TEST_ROOT")}); err != nil {
			fmt.Println(err)
			return 1
		}
		fmt.Println("ok")
		return 0
	case "sleep":
		time.Sleep(helperMaxLife)
		return 0
	case "oom":
		// Touch 256 MiB page by page; a 64 MiB leaf must OOM-kill us.
		b := make([]byte, 256<<20)
		for i := 0; i < len(b); i += 4096 {
			b[i] = 1
		}
		fmt.Println("survived", len(b))
		return 3
	case "tree":
		// A child, and a double-forked daemon (setsid, parent exits at once)
		// that ends up reparented away from us.
		child := helperCmd("sleep")
		if err := child.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "tree: child:", err)
			return 2
		}
		d := helperCmd("daemonize")
		out, err := d.Output()
		if err != nil {
			fmt.Fprintln(os.Stderr, "tree: daemonize:", err)
			return 2
		}
		fmt.Printf("ready %d %s\n", child.Process.Pid, strings.TrimSpace(string(out)))
		time.Sleep(helperMaxLife)
		return 0
	case "daemonize":
		c := helperCmd("sleep")
		c.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
		if err := c.Start(); err != nil {
			fmt.Fprintln(os.Stderr, "daemonize:", err)
			return 2
		}
		fmt.Println(c.Process.Pid)
		return 0
	case "pids":
		// Start children until the pids limit refuses one.
		var started int
		for started < 64 {
			c := helperCmd("sleep")
			if err := c.Start(); err != nil {
				fmt.Printf("refused after %d: %v\n", started, err)
				time.Sleep(helperMaxLife)
				return 0
			}
			started++
		}
		fmt.Printf("started %d, never refused\n", started)
		time.Sleep(helperMaxLife)
		return 0
	case "env":
		// Report what the worker sees at start, then wait for stdin to close.
		wd, _ := os.Getwd()
		fds := openFDs()
		cg, _ := os.ReadFile("/proc/self/cgroup")
		fmt.Printf("X=%s\nGATE=%t\nWD=%s\n", os.Getenv("RBEE_TEST_X"), os.Getenv(gateEnv) != "", wd)
		fmt.Printf("PGID=%d PID=%d\n", syscall.Getpgrp(), os.Getpid())
		fmt.Printf("CG=%s\n", strings.ReplaceAll(strings.TrimSpace(string(cg)), "\n", ";"))
		fmt.Printf("FDS=%s\n", strings.Join(fds, ","))
		if f := os.NewFile(3, "extra"); f != nil {
			_, err := f.WriteString("extra-ok\n")
			fmt.Printf("EXTRA=%v\n", err == nil)
			f.Close()
		}
		fmt.Printf("FDS=%s\n", strings.Join(openFDs(), ","))
		_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
		return 0
	case "isolated":
		return runIsolatedHelper()
	case "capped":
		return runCappedExec()
	case "capped-hive":
		return runCappedHive()
	case "burn":
		end := time.Now().Add(50 * time.Millisecond)
		x := 0
		for time.Now().Before(end) {
			x++
		}
		_ = x
		return 0
	}
	fmt.Fprintln(os.Stderr, "unknown helper mode", mode)
	return 2
}

// openFDs lists this process's descriptors above stderr with their targets,
// leaving out the one that reads the directory.
func openFDs() []string {
	d, err := os.Open("/proc/self/fd")
	if err != nil {
		return []string{err.Error()}
	}
	defer d.Close()
	names, _ := d.Readdirnames(-1)
	var out []string
	for _, n := range names {
		fd, _ := strconv.Atoi(n)
		if fd <= 2 || uintptr(fd) == d.Fd() {
			continue
		}
		target, _ := os.Readlink("/proc/self/fd/" + n)
		out = append(out, n+"->"+target)
	}
	sort.Strings(out)
	return out
}

// helperCmd re-executes the test binary in a helper mode.
// The test process runs helpers from testHelperBin: in a gate started from
// rbee-gate /proc/self/exe is rbee-gate, and a worker uid cannot reach the
// test binary in go test's private build directory by its path. Helpers
// starting helpers use /proc/self/exe.
func helperCmd(mode string) *exec.Cmd {
	exe := testHelperBin
	if exe == "" {
		exe = "/proc/self/exe"
	}
	c := exec.Command(exe)
	c.Args = []string{"cgroup-test-helper"}
	c.Env = append(os.Environ(), helperEnv+"="+mode)
	return c
}

// newTestManager returns a manager over a uniquely named root that is removed
// with everything below it when the test ends.
func newTestManager(t testing.TB, opts Options) Manager {
	t.Helper()
	testkit.RequireRoot(t)
	suffix := randHex(t)
	m, err := New(testOptions(opts, suffix))
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { removeTree(t, m) })
	return m
}

// newTestLeaf creates a leaf in a fresh test manager (default options).
func newTestLeaf(t testing.TB, name string, lim Limits) (Manager, Leaf) {
	t.Helper()
	m := newTestManager(t, Options{})
	l, err := m.Create(name, lim)
	if err != nil {
		t.Fatal(err)
	}
	return m, l
}

// sleepingLeaf is a leaf (256 MiB, 64 pids) holding a running helper
// "sleep", which is killed at cleanup.
func sleepingLeaf(t testing.TB, name string) Leaf {
	t.Helper()
	_, l := newTestLeaf(t, name, Limits{MemoryMax: 256 << 20, PidsMax: 64})
	c := helperCmd("sleep")
	if err := l.Start(c); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := contextTimeout(10 * time.Second)
		defer cancel()
		_ = l.Kill(ctx)
		_ = c.Wait()
	})
	return l
}

func testOptions(opts Options, suffix string) Options {
	if opts.Root == "" {
		opts.Root = "rbee-test-" + suffix
		if mgrMode() == "v2" {
			opts.Root = filepath.Join(v2Mount, opts.Root)
		}
	}
	return opts
}

func randHex(t testing.TB) string {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b[:])
}

// removeTree kills and deletes every leaf, then removes workers/, supervisor/
// and the root in every hierarchy.
func removeTree(t testing.TB, m Manager) {
	t.Helper()
	ids, _ := m.List()
	for _, id := range ids {
		l, err := m.Load(id)
		if err != nil {
			continue
		}
		ctx, cancel := contextTimeout(10 * time.Second)
		if err := l.Kill(ctx); err != nil {
			t.Errorf("cleanup: kill %s: %v", id, err)
		}
		cancel()
		if err := l.Delete(); err != nil {
			t.Errorf("cleanup: delete %s: %v", id, err)
		}
	}
	var roots []string
	switch mm := m.(type) {
	case *v2Manager:
		roots = []string{mm.root}
	case *v1Manager:
		for n, r := range mm.roots {
			roots = append(roots, filepath.Join(v1Mount, string(n), r))
		}
	}
	for _, r := range roots {
		for _, d := range []string{filepath.Join(r, "workers"), filepath.Join(r, "supervisor"), r} {
			if err := os.Remove(d); err != nil && !os.IsNotExist(err) {
				t.Errorf("cleanup: %v", err)
			}
		}
	}
}

// mgrMode says which driver New picks on this machine.
func mgrMode() string {
	if cgroups.Mode() == cgroups.Unified {
		return "v2"
	}
	return "v1"
}

func contextTimeout(d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), d)
}

// leafDirsOf returns every directory that backs a leaf.
func leafDirsOf(l Leaf) []string {
	switch ll := l.(type) {
	case *v2Leaf:
		return []string{ll.dir}
	case *v1Leaf:
		var ds []string
		for _, d := range ll.dirs {
			ds = append(ds, d)
		}
		return ds
	}
	return nil
}

// memDirOf is the directory holding the leaf's memory files.
func memDirOf(l Leaf) string {
	switch ll := l.(type) {
	case *v2Leaf:
		return ll.dir
	case *v1Leaf:
		return ll.dirs[cgroup1.Memory]
	}
	return ""
}

// pidsDirOf is the directory holding the leaf's pids files.
func pidsDirOf(l Leaf) string {
	switch ll := l.(type) {
	case *v2Leaf:
		return ll.dir
	case *v1Leaf:
		return ll.dirs[cgroup1.Pids]
	}
	return ""
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i < 0 || i+2 >= len(s) || s[i+2] != 'Z'
}
