package admission

import (
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/internal/testkit"
	"github.com/rbee/rbee-hive/procfs"
)

func TestCheckDiskTmpfs(t *testing.T) {
	const mib = 1 << 20
	dir := testkit.MountTmpfs(t, "8m")
	// 2 MiB already used, so "available" is not simply the mount size.
	if err := os.WriteFile(filepath.Join(dir, "used"), make([]byte, 2*mib), 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := procfs.DiskUsage(dir)
	if err != nil {
		t.Fatal(err)
	}
	if d.TotalBytes != 8*mib {
		t.Fatalf("tmpfs total = %d, want %d", d.TotalBytes, 8*mib)
	}
	if d.AvailableBytes > 6*mib || d.AvailableBytes < 5*mib {
		t.Fatalf("tmpfs available = %d, want about 6 MiB", d.AvailableBytes)
	}
	if d.UsedBytes < 2*mib {
		t.Fatalf("tmpfs used = %d, want >= 2 MiB", d.UsedBytes)
	}

	tests := []struct {
		name          string
		dir           string
		need, reserve uint64
		fits          bool
	}{
		{"small fits", dir, 1 * mib, 1 * mib, true},
		{"exactly available", dir, d.AvailableBytes, 0, true},
		{"one byte over", dir, d.AvailableBytes, 1, false},
		{"bigger than the fs", dir, 9 * mib, 0, false},
		{"reserve pushes it over", dir, 4 * mib, 4 * mib, false},
		{"missing subdir uses ancestor", filepath.Join(dir, "models", "x", "y"), 1 * mib, 0, true},
		{"missing subdir too big", filepath.Join(dir, "models", "x"), 7 * mib, 0, false},
		{"overflow", dir, ^uint64(0), 10, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckDisk(tc.dir, tc.need, tc.reserve)
			if tc.fits {
				if err != nil {
					t.Fatalf("CheckDisk = %v, want nil", err)
				}
				return
			}
			var ae *api.Error
			if !errors.As(err, &ae) {
				t.Fatalf("CheckDisk = %v, want *api.Error", err)
			}
			if ae.Status != http.StatusInsufficientStorage || ae.Code != api.CodeInsufficientDisk {
				t.Fatalf("got %d %s", ae.Status, ae.Code)
			}
			for _, k := range []string{"path", "needed_bytes", "reserve_bytes", "available_bytes"} {
				if _, ok := ae.Details[k]; !ok {
					t.Errorf("details lack %q: %v", k, ae.Details)
				}
			}
			if ae.Details["path"] != tc.dir || ae.Details["needed_bytes"] != tc.need ||
				ae.Details["reserve_bytes"] != tc.reserve {
				t.Errorf("details = %v", ae.Details)
			}
			if av := ae.Details["available_bytes"].(uint64); av > 6*mib {
				t.Errorf("available_bytes = %d", av)
			}
		})
	}
}

func TestCheckDiskStatError(t *testing.T) {
	// A relative component through a regular file is ENOTDIR, not ENOENT:
	// the walk must stop and report, not claim success.
	f := filepath.Join(t.TempDir(), "file")
	if err := os.WriteFile(f, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	err := CheckDisk(filepath.Join(f, "sub"), 1, 0)
	var ae *api.Error
	if err == nil || errors.As(err, &ae) {
		t.Fatalf("CheckDisk through a file = %v, want a plain error", err)
	}
}
