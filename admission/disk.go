package admission

import (
	"fmt"
	"math"
	"net/http"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/procfs"
)

// CheckDisk refuses a write of needBytes under dir unless the filesystem
// holding dir keeps at least reserveBytes available afterwards. Available is
// f_bavail (what an unprivileged user can write), never f_bfree, which
// counts root-reserved blocks. dir need not exist yet: its first existing
// ancestor is checked. It returns nil, an *api.Error (507
// INSUFFICIENT_DISK), or a wrapped statfs error.
func CheckDisk(dir string, needBytes, reserveBytes uint64) error {
	d, err := procfs.DiskUsage(dir)
	if err != nil {
		return fmt.Errorf("admission: disk check: %w", err)
	}
	return checkDisk(dir, needBytes, reserveBytes, d.AvailableBytes)
}

func checkDisk(dir string, need, reserve, avail uint64) error {
	want := need + reserve
	if want < need { // overflow: no filesystem holds that
		want = math.MaxUint64
	}
	if want <= avail {
		return nil
	}
	return &api.Error{
		Status: http.StatusInsufficientStorage,
		Code:   api.CodeInsufficientDisk,
		Message: fmt.Sprintf("not enough disk space under %s: need %d bytes plus a %d byte reserve, %d available",
			dir, need, reserve, avail),
		Details: map[string]any{
			"path":            dir,
			"needed_bytes":    need,
			"reserve_bytes":   reserve,
			"available_bytes": avail,
		},
	}
}
