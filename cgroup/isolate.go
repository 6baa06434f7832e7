package cgroup

import (
	"fmt"
	"os/exec"

	"github.com/rbee/rbee-hive/cgroup/gate"
)

// Isolation is the identity a worker runs under. Start with WithIsolation
// drops to it in the spawn gate, after placement and before exec: the
// supplementary groups, gid and uid; an empty capability set (bounding,
// ambient, effective, permitted, inheritable); no_new_privs; securebits
// locked so that uid 0 would not regain capabilities; and its own session.
//
// exec.Cmd's SysProcAttr can switch uid/gid and set the session, but cannot
// drop the bounding set or set no_new_privs, and a worker whose bounding set
// still holds every capability regains them all through any setuid-root or
// file-capability binary. So the gate does the whole switch in one place.
type Isolation struct {
	UID uint32
	GID uint32
	// Groups are the supplementary groups (e.g. the group that may read the
	// model dir, the one that owns /dev/nvidia*). Empty means none: the
	// hive's own groups are never inherited.
	Groups []uint32
}

// StartOption changes how Leaf.Start starts a process.
type StartOption func(*startConfig)

type startConfig struct {
	iso *Isolation
}

// WithIsolation starts the process under iso (see Isolation). The caller's
// cmd.SysProcAttr must not set Credential, Setpgid or Setctty: the gate owns
// identity and session.
func WithIsolation(iso Isolation) StartOption {
	return func(c *startConfig) {
		c.iso = &Isolation{UID: iso.UID, GID: iso.GID, Groups: append([]uint32(nil), iso.Groups...)}
	}
}

func applyStartOptions(opts []StartOption) startConfig {
	var c startConfig
	for _, o := range opts {
		if o != nil {
			o(&c)
		}
	}
	return c
}

// checkIsolatedCmd rejects SysProcAttr fields that would fight the gate.
func checkIsolatedCmd(cmd *exec.Cmd) error {
	spa := cmd.SysProcAttr
	if spa == nil {
		return nil
	}
	switch {
	case spa.Credential != nil:
		return fmt.Errorf("%w: WithIsolation and cmd.SysProcAttr.Credential both set the identity", ErrInvalid)
	case spa.Setpgid || spa.Setctty || spa.Foreground:
		return fmt.Errorf("%w: WithIsolation gives the worker its own session; cmd.SysProcAttr must not set Setpgid, Setctty or Foreground", ErrInvalid)
	case len(spa.AmbientCaps) > 0:
		return fmt.Errorf("%w: WithIsolation drops every capability; cmd.SysProcAttr.AmbientCaps must be empty", ErrInvalid)
	}
	return nil
}

// gateIsoEnv carries the Isolation to the gate; the gate removes it before exec.
const gateIsoEnv = gate.IsoEnv

func (iso *Isolation) identity() *gate.Identity {
	return &gate.Identity{UID: iso.UID, GID: iso.GID, Groups: iso.Groups}
}

func (iso *Isolation) encode() string { return iso.identity().Encode() }

func decodeIsolation(s string) (*Isolation, error) {
	id, err := gate.DecodeIdentity(s)
	if err != nil {
		return nil, err
	}
	return &Isolation{UID: id.UID, GID: id.GID, Groups: id.Groups}, nil
}

// capLastCap reads the highest capability number the kernel knows.
func capLastCap() (int, error) { return gate.CapLastCap() }
