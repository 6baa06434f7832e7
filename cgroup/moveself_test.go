package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// TestMoveSelf: on v2, a hive that lives in its root (systemd Delegate=yes)
// cannot delegate controllers to workers/ until it moves into supervisor/;
// New says so without MoveSelf and does it with MoveSelf. On v1 MoveSelf is
// a no-op (no internal-process rule).
func TestMoveSelf(t *testing.T) {
	testkit.RequireRoot(t)
	before, err := procCgroups(0)
	if err != nil {
		t.Fatal(err)
	}
	if mgrMode() == "v1" {
		m := newTestManager(t, Options{MoveSelf: true})
		after, err := procCgroups(0)
		if err != nil {
			t.Fatal(err)
		}
		if after["memory"] != before["memory"] || after["pids"] != before["pids"] {
			t.Errorf("v1 MoveSelf moved the process: %v -> %v", before, after)
		}
		if _, err := m.Create("w-ms", Limits{MemoryMax: 64 << 20}); err != nil {
			t.Fatal(err)
		}
		return
	}

	root := filepath.Join(v2Mount, "rbee-moveself-"+randHex(t))
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	home := filepath.Join(v2Mount, before[""])
	t.Cleanup(func() {
		// Move back home before the tree goes away.
		if err := writeFile(home, "cgroup.procs", strconv.Itoa(os.Getpid())); err != nil {
			t.Errorf("move back to %s: %v", home, err)
		}
		for _, d := range []string{"workers/w-ms", "workers", "supervisor", ""} {
			if err := os.Remove(filepath.Join(root, d)); err != nil && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	// Play systemd: start the "hive" inside its delegated cgroup.
	if err := writeFile(root, "cgroup.procs", strconv.Itoa(os.Getpid())); err != nil {
		t.Fatal(err)
	}
	if _, err := New(Options{Root: root}); err == nil || !strings.Contains(err.Error(), "MoveSelf") {
		t.Fatalf("New without MoveSelf while in root = %v, want an error that suggests MoveSelf", err)
	}
	m, err := New(Options{Root: root, MoveSelf: true})
	if err != nil {
		t.Fatal(err)
	}
	now, err := procCgroups(0)
	if err != nil {
		t.Fatal(err)
	}
	if want := strings.TrimPrefix(root, v2Mount) + "/supervisor"; now[""] != want {
		t.Errorf("after MoveSelf the process is in %q, want %q", now[""], want)
	}
	ctrl, err := os.ReadFile(filepath.Join(root, "workers", "cgroup.subtree_control"))
	if err != nil || !strings.Contains(string(ctrl), "memory") || !strings.Contains(string(ctrl), "pids") {
		t.Errorf("workers/cgroup.subtree_control = %q, %v; want memory and pids", ctrl, err)
	}
	l, err := m.Create("w-ms", Limits{MemoryMax: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cmd := helperCmd("exit")
	if err := l.Start(cmd); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
	if err := l.Delete(); err != nil {
		t.Fatal(err)
	}
}
