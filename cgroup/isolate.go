package cgroup

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
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

// gateIsoEnv carries the Isolation to the gate as "uid:gid:g1,g2,..."; the
// gate removes it before exec.
const gateIsoEnv = "_RBEE_CGROUP_GATE_ISO"

func (iso *Isolation) encode() string {
	gs := make([]string, len(iso.Groups))
	for i, g := range iso.Groups {
		gs[i] = strconv.FormatUint(uint64(g), 10)
	}
	return fmt.Sprintf("%d:%d:%s", iso.UID, iso.GID, strings.Join(gs, ","))
}

func decodeIsolation(s string) (*Isolation, error) {
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return nil, fmt.Errorf("malformed %s=%q", gateIsoEnv, s)
	}
	uid, err1 := strconv.ParseUint(parts[0], 10, 32)
	gid, err2 := strconv.ParseUint(parts[1], 10, 32)
	if err1 != nil || err2 != nil {
		return nil, fmt.Errorf("malformed %s=%q", gateIsoEnv, s)
	}
	iso := &Isolation{UID: uint32(uid), GID: uint32(gid)}
	if parts[2] != "" {
		for _, g := range strings.Split(parts[2], ",") {
			n, err := strconv.ParseUint(g, 10, 32)
			if err != nil {
				return nil, fmt.Errorf("malformed %s=%q", gateIsoEnv, s)
			}
			iso.Groups = append(iso.Groups, uint32(n))
		}
	}
	return iso, nil
}

// Securebits (linux/securebits.h; x/sys/unix has no names for them).
const (
	secbitNoroot                  = 1 << 0
	secbitNorootLocked            = 1 << 1
	secbitNoSetuidFixupLocked     = 1 << 3
	secbitKeepCapsLocked          = 1 << 5
	secbitNoCapAmbientRaise       = 1 << 6
	secbitNoCapAmbientRaiseLocked = 1 << 7
)

// dropStep names the step of dropPrivileges that failed; the gate sends it
// to the parent with the errno.
type dropStep uint32

const (
	stepExec dropStep = iota
	stepCapLastCap
	stepSetgroups
	stepSetgid
	stepBoundingSet
	stepAmbient
	stepSecurebits
	stepNoNewPrivs
	stepSetuid
	stepCapset
	stepSetsid
	stepVerify
)

func (s dropStep) String() string {
	return [...]string{"exec", "read cap_last_cap", "setgroups", "setresgid", "drop bounding set",
		"clear ambient set", "set securebits", "set no_new_privs", "setresuid", "clear capabilities",
		"setsid", "verify"}[s]
}

// dropPrivileges runs in the gate right before exec. Capabilities, the
// bounding set, securebits and no_new_privs are per thread, and the worker
// is exactly the thread that calls execve, so the caller must hold
// runtime.LockOSThread and exec from the same goroutine. The order matters:
// the bounding set and securebits need CAP_SETPCAP, so they go before
// setresuid, which clears the permitted set on the way from uid 0.
func dropPrivileges(iso *Isolation) (dropStep, error) {
	lastCap, err := capLastCap()
	if err != nil {
		return stepCapLastCap, err
	}
	groups := make([]int, len(iso.Groups))
	for i, g := range iso.Groups {
		groups[i] = int(g)
	}
	// syscall's set*id calls change every thread of the gate (the runtime's
	// threads too); harmless, the gate only execs afterwards.
	if err := syscall.Setgroups(groups); err != nil {
		return stepSetgroups, err
	}
	if err := syscall.Setresgid(int(iso.GID), int(iso.GID), int(iso.GID)); err != nil {
		return stepSetgid, err
	}
	for c := 0; c <= lastCap; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			return stepBoundingSet, fmt.Errorf("capability %d: %w", c, err)
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return stepAmbient, err
	}
	// NOROOT: uid 0 (a backend stated as root) gets no capabilities from
	// exec; the locks keep the worker from undoing it or from keeping
	// capabilities across a setuid.
	bits := secbitNoroot | secbitNorootLocked | secbitNoSetuidFixupLocked | secbitKeepCapsLocked |
		secbitNoCapAmbientRaise | secbitNoCapAmbientRaiseLocked
	if err := unix.Prctl(unix.PR_SET_SECUREBITS, uintptr(bits), 0, 0, 0); err != nil {
		return stepSecurebits, err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return stepNoNewPrivs, err
	}
	if err := syscall.Setresuid(int(iso.UID), int(iso.UID), int(iso.UID)); err != nil {
		return stepSetuid, err
	}
	// From uid 0 to another uid the kernel already cleared permitted and
	// effective; uid 0 keeps them, and inheritable is never cleared by it.
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return stepCapset, err
	}
	if _, err := unix.Setsid(); err != nil {
		// EPERM: already a session (or group) leader, e.g. the caller set
		// SysProcAttr.Setsid; only fine when we lead our own session.
		if sid, _ := unix.Getsid(0); sid != os.Getpid() {
			return stepSetsid, err
		}
	}
	// Never exec a worker that kept a capability: check what the kernel says.
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return stepVerify, err
	}
	for _, d := range data {
		if d.Effective|d.Permitted|d.Inheritable != 0 {
			return stepVerify, syscall.EPERM
		}
	}
	return stepExec, nil
}

// capLastCap reads the highest capability number the kernel knows.
func capLastCap() (int, error) {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, err
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || n < 0 || n > 63 {
		return 0, fmt.Errorf("cap_last_cap %q: %w", strings.TrimSpace(string(b)), syscall.EINVAL)
	}
	return n, nil
}
