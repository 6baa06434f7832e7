package cgroup

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
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
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates cgroups (CI runs as root)")
	}
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
