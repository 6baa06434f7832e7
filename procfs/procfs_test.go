package procfs

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func writeMeminfo(t testing.TB, body string) *Reader {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "meminfo"), []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := New(dir)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func TestMemoryFixtures(t *testing.T) {
	tests := []struct {
		name    string
		body    string
		want    Memory
		missing bool
	}{
		{
			name: "typical",
			body: "MemTotal:       16384000 kB\nMemFree:         1024000 kB\nMemAvailable:    8192000 kB\nBuffers:          100 kB\n",
			want: Memory{TotalBytes: 16384000 << 10, FreeBytes: 1024000 << 10, AvailableBytes: 8192000 << 10, UsedBytes: 8192000 << 10},
		},
		{
			name: "available above total (racy reads) clamps used to 0",
			body: "MemTotal: 100 kB\nMemFree: 10 kB\nMemAvailable: 200 kB\n",
			want: Memory{TotalBytes: 100 << 10, FreeBytes: 10 << 10, AvailableBytes: 200 << 10},
		},
		{name: "no MemAvailable (pre-3.14 kernel)", body: "MemTotal: 100 kB\nMemFree: 10 kB\n", missing: true},
		{name: "no MemTotal", body: "MemAvailable: 100 kB\n", missing: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := writeMeminfo(t, tc.body)
			m, err := r.Memory()
			if tc.missing {
				if !errors.Is(err, ErrMissingField) {
					t.Fatalf("err = %v, want ErrMissingField", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if m != tc.want {
				t.Fatalf("got %+v, want %+v", m, tc.want)
			}
			if a, _ := r.MemAvailable(); a != tc.want.AvailableBytes {
				t.Fatalf("MemAvailable = %d", a)
			}
		})
	}
	if _, err := writeMeminfo(t, "garbage line with too many fields x y\n").Memory(); err == nil {
		t.Fatal("malformed meminfo accepted")
	}
	if _, err := New(filepath.Join(t.TempDir(), "nope")); err == nil {
		t.Fatal("New on a missing root succeeded")
	}
}

func TestRealHost(t *testing.T) {
	r, err := New("")
	if err != nil {
		t.Fatal(err)
	}
	m, err := r.Memory()
	if err != nil {
		t.Fatal(err)
	}
	if m.TotalBytes == 0 || m.AvailableBytes == 0 || m.AvailableBytes > m.TotalBytes {
		t.Fatalf("host memory %+v", m)
	}
	p, err := r.Process(os.Getpid())
	if err != nil {
		t.Fatal(err)
	}
	if p.RSSBytes == 0 || p.Threads == 0 || p.StartTicks == 0 {
		t.Fatalf("self stats %+v", p)
	}
	// A pid above pid_max never exists.
	if _, err := r.Process(1 << 30); !IsNotExist(err) {
		t.Fatalf("missing pid: %v", err)
	}
}

func TestDiskUsage(t *testing.T) {
	dir := t.TempDir()
	d, err := DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if d.TotalBytes == 0 || d.AvailableBytes > d.FreeBytes || d.FreeBytes > d.TotalBytes || d.StatPath != dir {
		t.Fatalf("%+v", d)
	}
	deep := filepath.Join(dir, "a", "b", "c")
	d2, err := DiskUsage(deep)
	if err != nil || d2.StatPath != dir || d2.Path != deep {
		t.Fatalf("missing subdir: %+v %v", d2, err)
	}
	if _, err := DiskUsage(""); err == nil {
		t.Fatal("empty path accepted")
	}
}
