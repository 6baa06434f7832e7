package cgroup

import (
	"fmt"

	"github.com/containerd/cgroups/v3"
)

// Options configure New.
type Options struct {
	// Root of the hive's tree.
	//
	// v2: an absolute directory in /sys/fs/cgroup, e.g. the hive's delegated
	// cgroup (systemd Delegate=yes) or /sys/fs/cgroup/rbee-hive. Empty means
	// the process's own cgroup, or /sys/fs/cgroup/rbee-hive when the process
	// sits at the top. Root is created if missing, but its parent must exist.
	//
	// v1: a path inside each hierarchy. Relative (the default "rbee-hive")
	// nests under the process's own cgroup in each of the memory, pids,
	// cpu(acct) and freezer hierarchies; absolute is the same path in every
	// hierarchy. The parent in the memory hierarchy must exist.
	Root string
	// MoveSelf moves this process into <root>/supervisor before controllers
	// are delegated to <root>/workers (v2's no-internal-processes rule; needed
	// when Root is the hive's own cgroup). Ignored on v1, which has no such rule.
	MoveSelf bool
	// ForceGate starts workers through the spawn gate: on v2 instead of
	// CLONE_INTO_CGROUP (kernels < 5.7), on v1 instead of forking from a
	// spawner thread placed in the leaf; and for tests of the fallback.
	ForceGate bool
	// GatePath is the spawn gate binary (cmd/rbee-gate). Empty: GateName
	// beside the running executable when installed there (make install puts
	// it next to rbee-hive), else the running binary re-executed (GateSelf),
	// which costs a start of the whole binary per spawn. Resolved once, by
	// New; a gate that is present but unusable fails New.
	GatePath string
}

// New detects the cgroup mode with cgroups.Mode() and returns the matching
// driver: Unified → v2; Hybrid or Legacy → v1 (in hybrid mode the unified
// mount has no controllers, so memory limits live on v1). Errors name what is
// missing (mount, controller, permission); New never panics.
func New(opts Options) (Manager, error) {
	switch mode := cgroups.Mode(); mode {
	case cgroups.Unified:
		m, err := newV2(opts)
		if err != nil {
			return nil, err
		}
		return m, nil
	case cgroups.Hybrid, cgroups.Legacy:
		m, err := newV1(opts)
		if err != nil {
			return nil, err
		}
		return m, nil
	default:
		return nil, fmt.Errorf("cgroup: no usable cgroup hierarchy at /sys/fs/cgroup (mode %d): memory limits cannot be enforced", mode)
	}
}
