package cgroup

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// checkWritable fails when this process may not create leaves in dir. A tree
// left by an earlier (root) hive already exists, so MkdirAll succeeds for an
// unprivileged hive too; without this check every spawn would fail later
// with a bare EACCES instead of start-up saying why.
func checkWritable(driver, dir string) error {
	if err := unix.Access(dir, unix.W_OK|unix.X_OK); err != nil {
		return fmt.Errorf("cgroup %s: %s is not writable by uid %d (%w): the hive needs root or a cgroup delegated to its user", driver, dir, unix.Geteuid(), err)
	}
	return nil
}
