package gate

import (
	"errors"
	"os"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Identity is the unprivileged identity a gate drops to before exec.
type Identity struct {
	UID    uint32
	GID    uint32
	Groups []uint32
}

// Encode writes id as "uid:gid:g1,g2,..." (the value of IsoEnv).
func (id *Identity) Encode() string {
	gs := make([]string, len(id.Groups))
	for i, g := range id.Groups {
		gs[i] = strconv.FormatUint(uint64(g), 10)
	}
	return strconv.FormatUint(uint64(id.UID), 10) + ":" + strconv.FormatUint(uint64(id.GID), 10) + ":" + strings.Join(gs, ",")
}

// DecodeIdentity parses what Encode wrote.
func DecodeIdentity(s string) (*Identity, error) {
	bad := errors.New("malformed " + IsoEnv + "=" + strconv.Quote(s))
	parts := strings.Split(s, ":")
	if len(parts) != 3 {
		return nil, bad
	}
	uid, err1 := strconv.ParseUint(parts[0], 10, 32)
	gid, err2 := strconv.ParseUint(parts[1], 10, 32)
	if err1 != nil || err2 != nil {
		return nil, bad
	}
	id := &Identity{UID: uint32(uid), GID: uint32(gid)}
	if parts[2] != "" {
		for _, g := range strings.Split(parts[2], ",") {
			n, err := strconv.ParseUint(g, 10, 32)
			if err != nil {
				return nil, bad
			}
			id.Groups = append(id.Groups, uint32(n))
		}
	}
	return id, nil
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

// Step names the step of DropPrivileges that failed (or StepExec); the gate
// sends it to the parent with the errno.
type Step uint32

const (
	StepExec Step = iota
	StepCapLastCap
	StepSetgroups
	StepSetgid
	StepBoundingSet
	StepAmbient
	StepSecurebits
	StepNoNewPrivs
	StepSetuid
	StepCapset
	StepSetsid
	StepVerify
)

var stepNames = [...]string{"exec", "read cap_last_cap", "setgroups", "setresgid", "drop bounding set",
	"clear ambient set", "set securebits", "set no_new_privs", "setresuid", "clear capabilities",
	"setsid", "verify"}

func (s Step) String() string {
	if int(s) < len(stepNames) {
		return stepNames[s]
	}
	return "step " + strconv.FormatUint(uint64(s), 10)
}

// capError names the capability the bounding-set drop failed on.
type capError struct {
	cap int
	err error
}

func (e *capError) Error() string { return "capability " + strconv.Itoa(e.cap) + ": " + e.err.Error() }
func (e *capError) Unwrap() error { return e.err }

// DropPrivileges runs in the gate right before exec: the supplementary
// groups, gid and uid; an empty capability set (bounding, ambient,
// effective, permitted, inheritable); no_new_privs; securebits locked so
// that uid 0 would not regain capabilities; and its own session.
// Capabilities, the bounding set, securebits and no_new_privs are per
// thread, and the worker is exactly the thread that calls execve, so the
// caller must hold runtime.LockOSThread and exec from the same goroutine.
// The order matters: the bounding set and securebits need CAP_SETPCAP, so
// they go before setresuid, which clears the permitted set on the way from
// uid 0.
func DropPrivileges(id *Identity) (Step, error) {
	groups := make([]int, len(id.Groups))
	for i, g := range id.Groups {
		groups[i] = int(g)
	}
	// syscall's set*id calls change every thread of the gate (the runtime's
	// threads too); harmless, the gate only execs afterwards.
	if err := syscall.Setgroups(groups); err != nil {
		return StepSetgroups, err
	}
	if err := syscall.Setresgid(int(id.GID), int(id.GID), int(id.GID)); err != nil {
		return StepSetgid, err
	}
	if step, err := RestrictThread(); err != nil {
		return step, err
	}
	if err := syscall.Setresuid(int(id.UID), int(id.UID), int(id.UID)); err != nil {
		return StepSetuid, err
	}
	// From uid 0 to another uid the kernel already cleared permitted and
	// effective; uid 0 keeps them, and inheritable is never cleared by it.
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return StepCapset, err
	}
	if _, err := unix.Setsid(); err != nil {
		// EPERM: already a session (or group) leader, e.g. the caller set
		// SysProcAttr.Setsid; only fine when we lead our own session.
		if sid, _ := unix.Getsid(0); sid != os.Getpid() {
			return StepSetsid, err
		}
	}
	// Never exec a worker that kept a capability: check what the kernel says.
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return StepVerify, err
	}
	for _, d := range data {
		if d.Effective|d.Permitted|d.Inheritable != 0 {
			return StepVerify, syscall.EPERM
		}
	}
	return StepExec, nil
}

// RestrictThread makes the calling OS thread (which must be locked to its
// goroutine) one that no exec from it, or from a child forked from it, can
// gain a capability through: it empties the bounding, ambient and
// inheritable sets, sets no_new_privs and locks securebits so that uid 0
// gets no capabilities from exec. The thread keeps its own effective and
// permitted capabilities (it may still switch uid in a child). All of it is
// per thread and inherited by fork, never undone.
func RestrictThread() (Step, error) {
	lastCap, err := CapLastCap()
	if err != nil {
		return StepCapLastCap, err
	}
	for c := 0; c <= lastCap; c++ {
		if err := unix.Prctl(unix.PR_CAPBSET_DROP, uintptr(c), 0, 0, 0); err != nil {
			return StepBoundingSet, &capError{c, err}
		}
	}
	if err := unix.Prctl(unix.PR_CAP_AMBIENT, unix.PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0); err != nil {
		return StepAmbient, err
	}
	// NOROOT: uid 0 (a backend stated as root) gets no capabilities from
	// exec; the locks keep the worker from undoing it or from keeping
	// capabilities across a setuid.
	bits := secbitNoroot | secbitNorootLocked | secbitNoSetuidFixupLocked | secbitKeepCapsLocked |
		secbitNoCapAmbientRaise | secbitNoCapAmbientRaiseLocked
	if err := unix.Prctl(unix.PR_SET_SECUREBITS, uintptr(bits), 0, 0, 0); err != nil {
		return StepSecurebits, err
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return StepNoNewPrivs, err
	}
	// capset/capget act on the calling thread (tid 0).
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return StepCapset, err
	}
	data[0].Inheritable, data[1].Inheritable = 0, 0
	if err := unix.Capset(&hdr, &data[0]); err != nil {
		return StepCapset, err
	}
	return StepExec, nil
}

// CapLastCap reads the highest capability number the kernel knows.
func CapLastCap() (int, error) {
	b, err := os.ReadFile("/proc/sys/kernel/cap_last_cap")
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 63 {
		return 0, &os.PathError{Op: "parse", Path: "/proc/sys/kernel/cap_last_cap " + strconv.Quote(s), Err: syscall.EINVAL}
	}
	return n, nil
}
