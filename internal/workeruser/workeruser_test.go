package workeruser

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

func TestValidateRange(t *testing.T) {
	tests := []struct {
		first, last uint32
		ok          bool
	}{
		{DefaultFirst, DefaultLast, true},
		{70000, 70000, true},
		{1000, 60000, true},
		{65536, 99999, true},
		{999, 2000, false},    // system ids
		{0, 10, false},        // root
		{5000, 4000, false},   // reversed
		{60000, 70000, false}, // contains nobody and 65535
		{65535, 65600, false}, // the invalid id
		{100000, 1<<31 - 1, false},
		{1 << 31, 1<<31 + 5, false},
	}
	for _, tc := range tests {
		err := ValidateRange(tc.first, tc.last)
		if (err == nil) != tc.ok {
			t.Errorf("ValidateRange(%d, %d) = %v, want ok %v", tc.first, tc.last, err, tc.ok)
		}
	}
}

func TestNewRejects(t *testing.T) {
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"root group", Config{Groups: []uint32{0}}, "group 0"},
		{"group in range", Config{Groups: []uint32{DefaultFirst + 3}}, "inside the worker range"},
		{"bad range", Config{First: 10, Last: 20}, "system ids"},
	}
	for _, tc := range tests {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: New = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	a, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	if f, l := a.Range(); f != DefaultFirst || l != DefaultLast {
		t.Errorf("default range %d-%d", f, l)
	}
}

// step is one operation on an allocator; the table runs them in order.
type step struct {
	op      string // allocate, reserve, release, owner
	worker  string
	uid     uint32 // reserve: the uid; allocate/reserve: the expected uid
	wantErr error  // nil: must succeed; errAny: any error
}

var errAny = errors.New("any error")

func TestAllocator(t *testing.T) {
	tests := []struct {
		name  string
		first uint32
		last  uint32
		steps []step
	}{
		{"sequential and idempotent", 70000, 70009, []step{
			{op: "allocate", worker: "w-a", uid: 70000},
			{op: "allocate", worker: "w-b", uid: 70001},
			{op: "allocate", worker: "w-a", uid: 70000}, // same worker, same uid
			{op: "owner", worker: "w-b", uid: 70001},
		}},
		{"freed uid reused last", 70000, 70002, []step{
			{op: "allocate", worker: "w-a", uid: 70000},
			{op: "allocate", worker: "w-b", uid: 70001},
			{op: "release", worker: "w-a"},
			{op: "owner", worker: "", uid: 70000},
			{op: "allocate", worker: "w-c", uid: 70002},
			{op: "allocate", worker: "w-d", uid: 70000}, // wraps around to the freed one
			{op: "allocate", worker: "w-e", wantErr: ErrExhausted},
			{op: "release", worker: "w-b"},
			{op: "allocate", worker: "w-e", uid: 70001},
		}},
		{"reserve for adopted workers", 70000, 70004, []step{
			{op: "reserve", worker: "w-old", uid: 70000},
			{op: "reserve", worker: "w-old", uid: 70000}, // repeat is fine
			{op: "allocate", worker: "w-new", uid: 70001},
			{op: "reserve", worker: "w-x", uid: 70001, wantErr: ErrTaken},
			{op: "reserve", worker: "w-old", uid: 70003, wantErr: ErrTaken},
			{op: "reserve", worker: "w-y", uid: 69999, wantErr: errAny}, // outside the range
			{op: "reserve", worker: "w-z", uid: 70004},
			{op: "allocate", worker: "w-n2", uid: 70002},
			{op: "allocate", worker: "w-n3", uid: 70003},
			{op: "allocate", worker: "w-n4", wantErr: ErrExhausted},
			{op: "owner", worker: "w-z", uid: 70004},
		}},
		{"single uid", 80000, 80000, []step{
			{op: "allocate", worker: "w-a", uid: 80000},
			{op: "allocate", worker: "w-b", wantErr: ErrExhausted},
			{op: "release", worker: "w-a"},
			{op: "release", worker: "w-a"}, // no-op
			{op: "allocate", worker: "w-b", uid: 80000},
		}},
		{"empty worker id", 70000, 70001, []step{
			{op: "allocate", worker: "", wantErr: errAny},
			{op: "reserve", worker: "", uid: 70000, wantErr: errAny},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			a, err := New(Config{First: tc.first, Last: tc.last, Groups: []uint32{900}})
			if err != nil {
				t.Fatal(err)
			}
			for i, s := range tc.steps {
				var id Identity
				var err error
				switch s.op {
				case "allocate":
					id, err = a.Allocate(s.worker)
				case "reserve":
					id, err = a.Reserve(s.worker, s.uid)
				case "release":
					a.Release(s.worker)
					continue
				case "owner":
					got, ok := a.WorkerOf(s.uid)
					if got != s.worker || ok != (s.worker != "") {
						t.Errorf("step %d: WorkerOf(%d) = %q, %v; want %q", i, s.uid, got, ok, s.worker)
					}
					continue
				}
				switch {
				case s.wantErr == nil && err != nil:
					t.Fatalf("step %d %s %s: %v", i, s.op, s.worker, err)
				case s.wantErr == errAny && err == nil, s.wantErr != nil && s.wantErr != errAny && !errors.Is(err, s.wantErr):
					t.Fatalf("step %d %s %s: err %v, want %v", i, s.op, s.worker, err, s.wantErr)
				case s.wantErr == nil:
					if id.UID != s.uid || id.GID != s.uid || fmt.Sprint(id.Groups) != "[900]" {
						t.Fatalf("step %d %s %s: identity %+v, want uid=gid=%d groups [900]", i, s.op, s.worker, id, s.uid)
					}
					if u, ok := a.UIDOf(s.worker); !ok || u != s.uid {
						t.Fatalf("step %d: UIDOf(%s) = %d, %v", i, s.worker, u, ok)
					}
				}
			}
		})
	}
}

func TestAllocatorConcurrent(t *testing.T) {
	a, err := New(Config{First: 70000, Last: 70099})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	uids := make([]uint32, 100)
	for i := range uids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id, err := a.Allocate(fmt.Sprintf("w-%d", i))
			if err != nil {
				t.Error(err)
				return
			}
			uids[i] = id.UID
		}()
	}
	wg.Wait()
	seen := map[uint32]bool{}
	for _, u := range uids {
		if seen[u] || u < 70000 || u > 70099 {
			t.Fatalf("uid %d handed out twice or outside the range: %v", u, uids)
		}
		seen[u] = true
	}
	if _, err := a.Allocate("w-extra"); !errors.Is(err, ErrExhausted) {
		t.Errorf("101st worker: %v, want ErrExhausted", err)
	}
}

func TestCheckHost(t *testing.T) {
	passwd := "root:x:0:0:root:/root:/bin/bash\n# comment\n+nis\nnobody:x:65534:65534::/nonexistent:/usr/sbin/nologin\nllama:x:70005:70005::/var/lib/llama:/bin/false\nbroken-line\n"
	group := "root:x:0:\nrbee-models:x:900:\nodd:x:70010:\n"
	subuid := "alice:100000:65536\nbob:65000:6000\n"
	tests := []struct {
		name        string
		first, last uint32
		files       map[string]string // file → contents; missing files are not created
		want        []string          // substrings of the error; none: no error
	}{
		{"clear", 80000, 89999, map[string]string{"passwd": passwd, "group": group, "subuid": subuid, "subgid": subuid}, nil},
		{"user in range", 70000, 70009, map[string]string{"passwd": passwd}, []string{`user "llama" (70005)`, "passwd"}},
		{"group in range", 70010, 70019, map[string]string{"passwd": passwd, "group": group}, []string{`group "odd" (70010)`}},
		{"subuid overlaps", 70020, 70029, map[string]string{"subuid": subuid}, []string{`subordinate uid range of "bob" (65000-70999)`}},
		{"subgid overlaps the end", 99990, 100010, map[string]string{"subgid": subuid}, []string{`subordinate gid range of "alice" (100000-165535)`}},
		{"range edge is inclusive", 70005, 70005, map[string]string{"passwd": passwd}, []string{"llama"}},
		{"missing files are empty", 70000, 79999, map[string]string{}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			hf := HostFiles{}
			for _, f := range []struct {
				name string
				dst  *string
			}{{"passwd", &hf.Passwd}, {"group", &hf.Group}, {"subuid", &hf.Subuid}, {"subgid", &hf.Subgid}} {
				*f.dst = filepath.Join(dir, f.name)
				if body, ok := tc.files[f.name]; ok {
					if err := os.WriteFile(*f.dst, []byte(body), 0o644); err != nil {
						t.Fatal(err)
					}
				}
			}
			err := CheckHost(tc.first, tc.last, hf)
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatalf("CheckHost = %v, want nil", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("CheckHost = nil, want an error with %q", tc.want)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// TestCheckHostReal: the default range is free on this host's files.
func TestCheckHostReal(t *testing.T) {
	if err := CheckHost(DefaultFirst, DefaultLast, DefaultHostFiles()); err != nil {
		t.Fatalf("default range on this host: %v", err)
	}
	if err := CheckHost(0, 0, DefaultHostFiles()); err == nil {
		t.Fatal("root is in /etc/passwd; CheckHost(0, 0) must fail")
	}
}
