package cgroup

import (
	"errors"
	"fmt"
)

// ErrInvalid is wrapped by every error about bad input (ids, limits, options).
var ErrInvalid = errors.New("cgroup: invalid argument")

// ErrExists is wrapped when Create finds the leaf already there.
var ErrExists = errors.New("cgroup: already exists")

// maxIDLen bounds ids: they become directory names and metric label values.
const maxIDLen = 64

// maxCPUWeight is the cgroup v2 cpu.weight upper bound.
const maxCPUWeight = 10000

// ValidateID checks a worker id: "w-" followed by lowercase letters and digits,
// at most 64 bytes in all. Ids become cgroup directory names, so anything that
// could climb the tree ("..", "/") or collide with an interface file
// ("cgroup.procs", "tasks") must never get through.
func ValidateID(id string) error {
	if id == "" {
		return fmt.Errorf("%w: empty worker id", ErrInvalid)
	}
	if len(id) > maxIDLen {
		return fmt.Errorf("%w: worker id is %d bytes, at most %d allowed", ErrInvalid, len(id), maxIDLen)
	}
	if len(id) < 3 || id[:2] != "w-" {
		return fmt.Errorf("%w: worker id %q must be \"w-\" followed by lowercase letters or digits", ErrInvalid, id)
	}
	for i := 2; i < len(id); i++ {
		c := id[i]
		if (c < 'a' || c > 'z') && (c < '0' || c > '9') {
			return fmt.Errorf("%w: worker id %q has %q at byte %d; only lowercase letters and digits may follow \"w-\"", ErrInvalid, id, c, i)
		}
	}
	return nil
}

// validateLimits rejects limits the kernel would accept but that make no sense
// for a worker: the library writes whatever it is given, and "0" would make
// every allocation fail.
func validateLimits(l Limits) error {
	if l.MemoryMax <= 0 {
		return fmt.Errorf("%w: MemoryMax must be > 0 bytes, got %d", ErrInvalid, l.MemoryMax)
	}
	if l.PidsMax < 0 {
		return fmt.Errorf("%w: PidsMax must be >= 0 (0 = no limit), got %d", ErrInvalid, l.PidsMax)
	}
	if l.CPUWeight > maxCPUWeight {
		return fmt.Errorf("%w: CPUWeight must be 1..%d (0 = default), got %d", ErrInvalid, maxCPUWeight, l.CPUWeight)
	}
	return nil
}

// weightToShares maps a cgroup v2 cpu.weight (1..10000, default 100) to v1
// cpu.shares (2..262144, default 1024); the inverse of the conversion runc and
// systemd use, so a weight means the same on both drivers.
func weightToShares(w uint64) uint64 {
	if w == 0 {
		return 0
	}
	return 2 + ((w-1)*262142)/9999
}
