// Package gate is the child side of the cgroup spawn gate: a process that
// blocks on a pipe until its parent has placed its pid in the worker's
// leaf(s), optionally drops to an unprivileged identity, and then execs the
// worker (same pid, so every instruction of the worker runs in the leaf).
//
// Package cgroup starts it either as the small cmd/rbee-gate binary or, when
// that is not installed, by re-executing the caller's own binary, whose
// main() calls cgroup.MaybeRunGate. Both run this one implementation. It
// imports only the standard library's small packages and x/sys/unix: a gate
// is on every spawn's critical path, and each package init it links is paid
// per spawn.
package gate

import (
	"errors"
	"os"
	"runtime"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

const (
	// Arg0 is argv[0] of a gate process; together with Env it marks one, so
	// an ordinary run of a binary never mistakes itself for a gate.
	Arg0 = "rbee-cgroup-gate"
	// Env carries "<release fd>:<status fd>"; the gate removes it (and
	// IsoEnv) before exec so the worker's environment is exactly the
	// caller's.
	Env = "_RBEE_CGROUP_GATE"
	// IsoEnv carries the Identity to drop to, as Identity.Encode writes it.
	IsoEnv = "_RBEE_CGROUP_GATE_ISO"
	// ExitPlacementFailed is the gate's exit code when the parent gave up
	// before releasing it (or the request was malformed, or dropping
	// privileges failed).
	ExitPlacementFailed = 125
	// ExitExecFailed mirrors a shell's "command not found or not executable".
	ExitExecFailed = 127
	// Hello is the first byte a gate writes on its status pipe.
	Hello = 'G'
)

// MaybeRun returns at once unless this process was started as a gate; then
// it never returns: it becomes the worker or exits with the reason.
func MaybeRun() {
	spec, ok := os.LookupEnv(Env)
	if !ok || len(os.Args) < 2 || os.Args[0] != Arg0 {
		return
	}
	iso, hasIso := os.LookupEnv(IsoEnv)
	os.Exit(Run(spec, iso, hasIso, os.Args[1], os.Args[2:]))
}

// Run is the gate: it returns an exit code only when it cannot become the
// worker.
func Run(spec, isoSpec string, hasIso bool, path string, argv []string) int {
	// Credentials and capabilities are per thread: the thread that drops
	// them must be the one that execs.
	runtime.LockOSThread()
	rs, ss, ok := strings.Cut(spec, ":")
	rfd, err1 := strconv.Atoi(rs)
	sfd, err2 := strconv.Atoi(ss)
	if !ok || err1 != nil || err2 != nil || rfd < 3 || sfd < 3 {
		complain("malformed " + Env + "=" + strconv.Quote(spec))
		return ExitPlacementFailed
	}
	_ = os.Unsetenv(Env)
	_ = os.Unsetenv(IsoEnv)
	var id *Identity
	if hasIso {
		var err error
		if id, err = DecodeIdentity(isoSpec); err != nil {
			complain(err.Error())
			return ExitPlacementFailed
		}
	}
	// exec hands extra files over in blocking mode today; do not depend on it.
	_ = unix.SetNonblock(rfd, false)
	_ = unix.SetNonblock(sfd, false)
	// Say "I am the gate": lets the parent tell a binary whose main() does
	// not call the hook (which would run its own main with our argv) from a
	// slow start.
	if _, err := unix.Write(sfd, []byte{Hello}); err != nil {
		return ExitPlacementFailed
	}

	// Block until the parent has written our pid into the leaf. EOF without
	// a byte means the parent gave up (placement failed): never run the
	// worker outside its cgroup.
	var b [1]byte
	for {
		n, err := unix.Read(rfd, b[:])
		if err == unix.EINTR {
			continue
		}
		if n != 1 || err != nil {
			return ExitPlacementFailed
		}
		break
	}
	_ = unix.Close(rfd)

	// The status pipe closes itself on a successful exec (CLOEXEC); on a
	// failed one the parent reads the step and errno from it, so Start
	// reports "no such file" exactly like a plain exec.Cmd would.
	unix.CloseOnExec(sfd)
	if id != nil {
		if step, err := DropPrivileges(id); err != nil {
			// Never exec a worker with privileges it was meant to lose.
			WriteStatus(sfd, step, err)
			return ExitPlacementFailed
		}
	}
	if len(argv) == 0 {
		argv = []string{path}
	}
	err := syscall.Exec(path, argv, os.Environ())
	WriteStatus(sfd, StepExec, err)
	return ExitExecFailed
}

func complain(msg string) { _, _ = os.Stderr.WriteString("rbee-cgroup-gate: " + msg + "\n") }

// WriteStatus sends (step, errno) to the parent: 8 bytes, little endian.
func WriteStatus(sfd int, step Step, err error) {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = syscall.EINVAL
	}
	var buf [8]byte
	le32(buf[:4], uint32(step))
	le32(buf[4:], uint32(errno))
	_, _ = unix.Write(sfd, buf[:])
}

// ParseStatus decodes what WriteStatus sent.
func ParseStatus(b [8]byte) (Step, syscall.Errno) {
	return Step(u32le(b[:4])), syscall.Errno(u32le(b[4:]))
}

// le32 and u32le instead of encoding/binary, whose reflect dependency a
// gate would initialise on every spawn.
func le32(b []byte, v uint32) { b[0], b[1], b[2], b[3] = byte(v), byte(v>>8), byte(v>>16), byte(v>>24) }

func u32le(b []byte) uint32 {
	return uint32(b[0]) | uint32(b[1])<<8 | uint32(b[2])<<16 | uint32(b[3])<<24
}
