package cgroup

import (
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// TestUnprivilegedRefused: a hive that is not root must refuse to start on a
// tree an earlier root hive left behind (it exists, so creating it succeeds),
// naming the directory, instead of failing every spawn later.
func TestUnprivilegedRefused(t *testing.T) {
	testkit.RequireRoot(t)
	opts := testOptions(Options{}, randHex(t))
	m, err := New(opts) // as root: the tree now exists, owned by root
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeTree(t, m) })
	// The child is this test binary run as nobody, so it must sit where
	// nobody can execute it (t.TempDir's parents are private).
	dir, err := os.MkdirTemp("", "rbee-cgroup-nobody")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	exe := filepath.Join(dir, "cgroup.test")
	copyFile(t, "/proc/self/exe", exe)
	c := exec.Command(exe)
	c.Args = []string{"cgroup-test-helper"}
	c.Env = append(os.Environ(), helperEnv+"=new-manager", "RBEE_CGROUP_TEST_ROOT="+opts.Root)
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	out, err := c.CombinedOutput()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		t.Fatalf("running the helper as nobody: %v", err)
	}
	if err == nil {
		t.Fatalf("an unprivileged New on a root-owned tree succeeded: %s", out)
	}
	for _, want := range []string{"not writable", "uid 65534", "root or a cgroup delegated"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("error %q lacks %q", out, want)
		}
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	src, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o755)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(dst, src); err != nil {
		t.Fatal(err)
	}
	if err := dst.Close(); err != nil {
		t.Fatal(err)
	}
}
