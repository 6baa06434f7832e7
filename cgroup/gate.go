package cgroup

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The spawn gate. Go's exec.Cmd has no pre-exec hook, and cgroup v1 has no
// CLONE_INTO_CGROUP, so a worker started the ordinary way would run (and could
// fork) before its pid is written to the leaf. Instead the binary re-executes
// itself (/proc/self/exe) as a tiny shim that blocks on a pipe until the
// parent has placed its pid in the leaf(s), then syscall.Exec's the worker:
// same pid, and every instruction of the worker runs inside the leaf. This is
// runc's "runc init" idea.

const (
	// gateArg0 is argv[0] of a gate process; together with gateEnv it marks
	// one, so an ordinary run of the binary never mistakes itself for a gate.
	gateArg0 = "rbee-cgroup-gate"
	// gateEnv carries "<release fd>:<status fd>"; the gate removes it (and
	// gateIsoEnv) before exec so the worker's environment is exactly the
	// caller's.
	gateEnv = "_RBEE_CGROUP_GATE"
	// gateExitPlacementFailed is the gate's exit code when the parent gave up
	// before releasing it.
	gateExitPlacementFailed = 125
	// gateExitExecFailed mirrors a shell's "command not found or not executable".
	gateExitExecFailed = 127
	// gateHello is the first byte a gate writes on its status pipe.
	gateHello = 'G'
	// gateHelloTimeout bounds the wait for gateHello; a binary without the
	// hook never sends it.
	gateHelloTimeout = 30 * time.Second
)

// MaybeRunGate must be the first call in main() (and in TestMain) of every
// binary that links this package and starts workers through a Leaf. In an
// ordinary run it returns at once. When the process was started as a spawn
// gate it never returns: it waits for release and becomes the worker.
func MaybeRunGate() {
	spec, ok := os.LookupEnv(gateEnv)
	if !ok || len(os.Args) < 2 || os.Args[0] != gateArg0 {
		return
	}
	iso, hasIso := os.LookupEnv(gateIsoEnv)
	os.Exit(runGate(spec, iso, hasIso, os.Args[1], os.Args[2:]))
}

// runGate returns an exit code only when it cannot become the worker.
func runGate(spec, isoSpec string, hasIso bool, path string, argv []string) int {
	// Credentials and capabilities are per thread: the thread that drops
	// them must be the one that execs.
	runtime.LockOSThread()
	rs, ss, ok := strings.Cut(spec, ":")
	rfd, err1 := strconv.Atoi(rs)
	sfd, err2 := strconv.Atoi(ss)
	if !ok || err1 != nil || err2 != nil || rfd < 3 || sfd < 3 {
		fmt.Fprintf(os.Stderr, "rbee-cgroup-gate: malformed %s=%q\n", gateEnv, spec)
		return gateExitPlacementFailed
	}
	_ = os.Unsetenv(gateEnv)
	_ = os.Unsetenv(gateIsoEnv)
	var iso *Isolation
	if hasIso {
		var err error
		if iso, err = decodeIsolation(isoSpec); err != nil {
			fmt.Fprintf(os.Stderr, "rbee-cgroup-gate: %v\n", err)
			return gateExitPlacementFailed
		}
	}
	// exec hands ExtraFiles over in blocking mode today; do not depend on it.
	_ = unix.SetNonblock(rfd, false)
	_ = unix.SetNonblock(sfd, false)
	// Say "I am the gate": lets the parent tell a binary whose main() does
	// not call MaybeRunGate (which would run its own main with our argv)
	// from a slow start.
	if _, err := unix.Write(sfd, []byte{gateHello}); err != nil {
		return gateExitPlacementFailed
	}

	// Block until the parent has written our pid into the leaf. EOF without
	// a byte means the parent gave up (placement failed): never run the worker
	// outside its cgroup.
	var b [1]byte
	for {
		n, err := unix.Read(rfd, b[:])
		if err == unix.EINTR {
			continue
		}
		if n != 1 || err != nil {
			return gateExitPlacementFailed
		}
		break
	}
	_ = unix.Close(rfd)

	// The status pipe closes itself on a successful exec (CLOEXEC); on a
	// failed one the parent reads the step and errno from it, so Start
	// reports "no such file" exactly like a plain exec.Cmd would.
	unix.CloseOnExec(sfd)
	if iso != nil {
		if step, err := dropPrivileges(iso); err != nil {
			// Never exec a worker with privileges it was meant to lose.
			writeGateStatus(sfd, step, err)
			return gateExitPlacementFailed
		}
	}
	if len(argv) == 0 {
		argv = []string{path}
	}
	err := syscall.Exec(path, argv, os.Environ())
	writeGateStatus(sfd, stepExec, err)
	return gateExitExecFailed
}

// writeGateStatus sends (step, errno) to the parent: 8 bytes, little endian.
func writeGateStatus(sfd int, step dropStep, err error) {
	var errno syscall.Errno
	if !errors.As(err, &errno) {
		errno = syscall.EINVAL
	}
	var buf [8]byte
	binary.LittleEndian.PutUint32(buf[:4], uint32(step))
	binary.LittleEndian.PutUint32(buf[4:], uint32(errno))
	_, _ = unix.Write(sfd, buf[:])
}

// startGated starts cmd through the gate, calls place(pid) while the gate
// blocks (nil: already placed, by CLONE_INTO_CGROUP), then releases it and
// waits until the worker binary has been exec'd (or reports why not); with
// iso the gate drops privileges first. The caller's cmd is restored
// afterwards except for Process (and what Start itself sets), so Wait works
// as usual and cmd.Process.Pid is the worker's pid.
func startGated(cmd *exec.Cmd, place func(pid int) error, iso *Isolation) (err error) {
	if cmd.Process != nil {
		return errors.New("cgroup: exec: already started")
	}
	if cmd.Err != nil {
		return cmd.Err
	}
	relR, relW, err := os.Pipe()
	if err != nil {
		return fmt.Errorf("cgroup: gate release pipe: %w", err)
	}
	stR, stW, err := os.Pipe()
	if err != nil {
		relR.Close()
		relW.Close()
		return fmt.Errorf("cgroup: gate status pipe: %w", err)
	}
	defer relW.Close()
	defer stR.Close()

	origPath, origArgs, origEnv, origExtra := cmd.Path, cmd.Args, cmd.Env, cmd.ExtraFiles
	env := origEnv
	if env == nil {
		// Keep exec.Cmd's own default for a nil Env: the parent's environment,
		// with PWD following Dir.
		env = os.Environ()
		if cmd.Dir != "" {
			if pwd, aerr := filepath.Abs(cmd.Dir); aerr == nil {
				env = append(env, "PWD="+pwd)
			}
		}
	}
	extra := append(append([]*os.File(nil), origExtra...), relR, stW)
	relFD, stFD := 3+len(extra)-2, 3+len(extra)-1
	argv := origArgs
	if len(argv) == 0 {
		argv = []string{origPath}
	}

	cmd.Path = "/proc/self/exe"
	cmd.Args = append([]string{gateArg0, origPath}, argv...)
	// Only startGated may tell a gate what to do: drop any gate variables
	// the caller's environment carries.
	cmd.Env = make([]string, 0, len(env)+2)
	for _, kv := range env {
		if !strings.HasPrefix(kv, gateEnv+"=") && !strings.HasPrefix(kv, gateIsoEnv+"=") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, fmt.Sprintf("%s=%d:%d", gateEnv, relFD, stFD))
	if iso != nil {
		cmd.Env = append(cmd.Env, gateIsoEnv+"="+iso.encode())
	}
	cmd.ExtraFiles = extra
	startErr := cmd.Start()
	cmd.Path, cmd.Args, cmd.Env, cmd.ExtraFiles = origPath, origArgs, origEnv, origExtra
	relR.Close()
	stW.Close()
	if startErr != nil {
		return fmt.Errorf("cgroup: start gate for %s: %w", origPath, startErr)
	}

	// From here on a failure must not leave a gate process behind: kill and
	// reap it (the caller never sees a started cmd).
	abort := func(cause error) error {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		cmd.Process = nil
		return cause
	}
	// Place first, then wait for the hello: the gate's runtime start-up and
	// the cgroup writes overlap.
	if place == nil {
		place = func(int) error { return nil }
	}
	if perr := place(cmd.Process.Pid); perr != nil {
		return abort(fmt.Errorf("cgroup: place pid %d: %w", cmd.Process.Pid, perr))
	}
	var hello [1]byte
	_ = stR.SetReadDeadline(time.Now().Add(gateHelloTimeout))
	if _, herr := io.ReadFull(stR, hello[:]); herr != nil || hello[0] != gateHello {
		return abort(fmt.Errorf("cgroup: spawn gate did not answer (does main() of %s call cgroup.MaybeRunGate() first?): %w", os.Args[0], errOr(herr, "bad hello")))
	}
	_ = stR.SetReadDeadline(time.Time{})
	if _, werr := relW.Write([]byte{1}); werr != nil {
		return abort(fmt.Errorf("cgroup: release gate: %w", werr))
	}
	relW.Close()

	var st [8]byte
	n, rerr := io.ReadFull(stR, st[:])
	switch {
	case n == 0 && (rerr == io.EOF || rerr == nil):
		return nil // exec succeeded: the status pipe closed on exec
	case n == 8:
		step := dropStep(binary.LittleEndian.Uint32(st[:4]))
		errno := syscall.Errno(binary.LittleEndian.Uint32(st[4:]))
		if step != stepExec && step <= stepVerify {
			return abort(fmt.Errorf("cgroup: drop privileges for %s to uid %d: %s: %w", origPath, iso.UID, step, errno))
		}
		return abort(fmt.Errorf("cgroup: exec %s: %w", origPath, &os.PathError{Op: "exec", Path: origPath, Err: errno}))
	default:
		return abort(fmt.Errorf("cgroup: gate status for %s: %w", origPath, rerr))
	}
}

func errOr(err error, msg string) error {
	if err != nil {
		return err
	}
	return errors.New(msg)
}
