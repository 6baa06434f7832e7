package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/internal/testkit"
)

func TestValidateID(t *testing.T) {
	tests := []struct {
		id string
		ok bool
	}{
		{"w-1", true},
		{"w-abc123", true},
		{"w-" + strings.Repeat("a", 62), true},
		{"w-" + strings.Repeat("a", 63), false}, // 65 bytes
		{"", false},
		{"w-", false},
		{"w", false},
		{"x-abc", false},
		{"abc", false},
		{"w-ABC", false},
		{"w-a-b", false},
		{"w-a_b", false},
		{"w-..", false},
		{"..", false},
		{"w-a/b", false},
		{"w-a/../../x", false},
		{"/w-a", false},
		{"w-a\x00", false},
		{"w-é", false},
		{"cgroup.procs", false},
		{"tasks", false},
	}
	for _, tc := range tests {
		err := ValidateID(tc.id)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateID(%q) = %v, want ok=%v", tc.id, err, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalid) {
			t.Errorf("ValidateID(%q) error %v does not wrap ErrInvalid", tc.id, err)
		}
	}
}

func TestCreateBadInput(t *testing.T) {
	m := newTestManager(t, Options{})
	good := Limits{MemoryMax: 64 << 20}
	tests := []struct {
		name string
		id   string
		l    Limits
		want error
	}{
		{"empty id", "", good, ErrInvalid},
		{"dotdot", "..", good, ErrInvalid},
		{"traversal", "w-a/../../x", good, ErrInvalid},
		{"slash", "w-a/b", good, ErrInvalid},
		{"too long", "w-" + strings.Repeat("0", 63), good, ErrInvalid},
		{"upper", "w-A", good, ErrInvalid},
		{"interface file", "cgroup.procs", good, ErrInvalid},
		{"zero memory", "w-z", Limits{}, ErrInvalid},
		{"negative memory", "w-z", Limits{MemoryMax: -1}, ErrInvalid},
		{"negative pids", "w-z", Limits{MemoryMax: 1 << 20, PidsMax: -5}, ErrInvalid},
		{"cpu weight too big", "w-z", Limits{MemoryMax: 1 << 20, CPUWeight: 10001}, ErrInvalid},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l, err := m.Create(tc.id, tc.l)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Create(%q, %+v) = %v, %v; want %v", tc.id, tc.l, l, err, tc.want)
			}
			if _, err := m.Load(tc.id); err == nil {
				t.Errorf("Load(%q) succeeded after a rejected Create", tc.id)
			}
		})
	}
	ids, err := m.List()
	if err != nil || len(ids) != 0 {
		t.Errorf("List = %v, %v after rejected creates; want none", ids, err)
	}

	if _, err := m.Create("w-dup", good); err != nil {
		t.Fatal(err)
	}
	if _, err := m.Create("w-dup", good); !errors.Is(err, ErrExists) {
		t.Errorf("second Create = %v, want ErrExists", err)
	}
	if _, err := m.Load("w-missing"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Load(missing) = %v, want ErrNotFound", err)
	}
	if _, err := m.LeafOf(-1); !errors.Is(err, ErrInvalid) {
		t.Errorf("LeafOf(-1) = %v, want ErrInvalid", err)
	}
}

func TestNewBadRoot(t *testing.T) {
	testkit.RequireRoot(t)
	suffix := randHex(t)
	type tc struct {
		name    string
		root    string
		setup   func(t *testing.T) // prepares the tree
		wantSub string             // part of the error message
	}
	var tests []tc
	if mgrMode() == "v2" {
		base := filepath.Join(v2Mount, "rbee-badroot-"+suffix)
		tests = []tc{
			{"relative", "rbee-hive", nil, "absolute"},
			{"outside the mount", "/tmp/rbee", nil, "below " + v2Mount},
			{"mount itself", v2Mount, nil, "below " + v2Mount},
			{"escapes the mount", v2Mount + "/../../etc", nil, "below " + v2Mount},
			{"parent missing", filepath.Join(v2Mount, "nonexistent-"+suffix, "hive"), nil, "nonexistent-" + suffix},
			{"controllers missing", filepath.Join(base, "inner"), func(t *testing.T) {
				// base exists but delegates nothing to its children.
				if err := os.Mkdir(base, 0o755); err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() {
					os.Remove(filepath.Join(base, "inner"))
					os.Remove(base)
				})
			}, "lacks controller(s) memory, pids"},
		}
	} else {
		tests = []tc{
			{"dotdot", "a/../../b", nil, "\"..\""},
			{"parent missing", "/nonexistent-" + suffix + "/hive", nil, "nonexistent-" + suffix},
		}
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup(t)
			}
			m, err := New(Options{Root: tc.root})
			if err == nil {
				removeTree(t, m)
				t.Fatalf("New(Root: %q) succeeded", tc.root)
			}
			if !strings.Contains(err.Error(), tc.wantSub) {
				t.Errorf("New(Root: %q) = %v; want it to mention %q", tc.root, err, tc.wantSub)
			}
		})
	}
}

func TestLimitsWritten(t *testing.T) {
	_, l := newTestLeaf(t, "w-lim", Limits{MemoryMax: 96 << 20, PidsMax: 33, CPUWeight: 100})
	read := func(path string) string {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Errorf("read %s: %v", path, err)
		}
		return strings.TrimSpace(string(b))
	}
	mem, pids := memDirOf(l), pidsDirOf(l)
	want := map[string]string{filepath.Join(pids, "pids.max"): "33"}
	switch ll := l.(type) {
	case *v2Leaf:
		want[filepath.Join(mem, "memory.max")] = "100663296"
		want[filepath.Join(mem, "memory.oom.group")] = "1"
		want[filepath.Join(mem, "cpu.weight")] = "100"
		// Swap accounting is on in Debian's kernel; without it the file is
		// absent and must not be required.
		if _, err := os.Stat(filepath.Join(mem, "memory.swap.max")); err == nil {
			want[filepath.Join(mem, "memory.swap.max")] = "0"
		}
	case *v1Leaf:
		want[filepath.Join(mem, "memory.limit_in_bytes")] = "100663296"
		if _, err := os.Stat(filepath.Join(mem, "memory.memsw.limit_in_bytes")); err == nil {
			want[filepath.Join(mem, "memory.memsw.limit_in_bytes")] = "100663296"
		}
		if d, ok := ll.dirs["cpu"]; ok {
			want[filepath.Join(d, "cpu.shares")] = "2597"
		}
	}
	for path, v := range want {
		if got := read(path); got != v {
			t.Errorf("%s = %q, want %q", path, got, v)
		}
	}
	t.Logf("checked %d files", len(want))
}

// TestDefaultV2Root: an empty Options.Root is the hive's delegated cgroup,
// also when systemd >= 254 started the hive in its supervisor/ subgroup
// (DelegateSubgroup=supervisor in the shipped drop-in).
func TestDefaultV2Root(t *testing.T) {
	for self, want := range map[string]string{
		"":                                "/sys/fs/cgroup/rbee-hive",
		"/":                               "/sys/fs/cgroup/rbee-hive",
		"/system.slice/rbee-hive.service": "/sys/fs/cgroup/system.slice/rbee-hive.service",
		"/rbee.slice/rbee-hive.service/supervisor":      "/sys/fs/cgroup/rbee.slice/rbee-hive.service",
		"/rbee.slice/rbee-hive@gpu0.service/supervisor": "/sys/fs/cgroup/rbee.slice/rbee-hive@gpu0.service",
		"/supervisor": "/sys/fs/cgroup/supervisor",
	} {
		if got := defaultV2Root(self); got != want {
			t.Errorf("defaultV2Root(%q) = %q, want %q", self, got, want)
		}
	}
}

// TestCloneIntoCgroupProbe: the probe accepts a cgroup2 directory and
// rejects what CLONE_INTO_CGROUP refuses (a v1 directory fails clone3 with
// EBADF; so does a seccomp-blocked clone3), so New picks the
// gate instead of failing every Start.
func TestCloneIntoCgroupProbe(t *testing.T) {
	testkit.RequireRoot(t)
	m, l := newTestLeaf(t, "w-probe", Limits{MemoryMax: 64 << 20})
	want := mgrMode() == "v2"
	if got := cloneIntoCgroupWorks(memDirOf(l)); got != want {
		t.Errorf("cloneIntoCgroupWorks(%s leaf) = %v, want %v", mgrMode(), got, want)
	}
	if pids, err := l.Pids(); err != nil || len(pids) != 0 {
		t.Errorf("probe left pids %v (%v) in the leaf", pids, err)
	}
	if cloneIntoCgroupWorks(t.TempDir()) {
		t.Error("cloneIntoCgroupWorks(a plain directory) = true")
	}
	if vm, ok := m.(*v2Manager); ok && vm.forceGate {
		t.Error("v2 manager chose the gate although CLONE_INTO_CGROUP works")
	}
}
