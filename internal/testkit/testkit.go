// Package testkit holds the small helpers the integration tests of several
// packages share: a goroutine-safe log buffer, a free loopback port, a
// size-limited tmpfs, and a real `rbee-hive daemon` in a cgroup root of its
// own (StartHive) with its API and cgroup helpers.
package testkit

import (
	"bytes"
	"net"
	"os"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
)

// SyncBuffer is a bytes.Buffer safe for a child process's output and a
// test reading it at the same time.
type SyncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// FreePort returns a loopback TCP port that was free a moment ago.
func FreePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// MountTmpfs mounts a fresh tmpfs of the given size ("8m") on a temp dir and
// unmounts it (lazily, so a straggling open file cannot fail the test) at
// cleanup. It needs root, which CI has; elsewhere the test skips (see Skip).
func MountTmpfs(t testing.TB, size string) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, "size="+size); err != nil {
		if os.Geteuid() != 0 {
			Skip(t, "tmpfs mount needs root: %v", err)
		}
		t.Fatalf("mount tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", dir, err)
		}
	})
	return dir
}
