package cgroup

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/cgroup/gate"
)

// The spawn gate. Go's exec.Cmd has no pre-exec hook, and cgroup v1 has no
// CLONE_INTO_CGROUP, so a worker started the ordinary way would run (and could
// fork) before its pid is written to the leaf. Instead Start executes a gate
// that blocks on a pipe until the parent has placed its pid in the leaf(s),
// then syscall.Exec's the worker: same pid, and every instruction of the
// worker runs inside the leaf. This is runc's "runc init" idea.
//
// The gate is the small rbee-gate binary when one is installed beside the
// caller's executable (or named in Options.GatePath); otherwise the caller's
// own binary re-executed (/proc/self/exe), whose main() calls MaybeRunGate.
// Both run package gate. The small binary is what makes a gated spawn cheap:
// a re-exec of the hive pays the Go runtime plus every package init of the
// hive on each spawn.

const (
	gateArg0                = gate.Arg0
	gateEnv                 = gate.Env
	gateExitPlacementFailed = gate.ExitPlacementFailed
	// gateHelloTimeout bounds the wait for the gate's hello byte; a binary
	// without the hook never sends it.
	gateHelloTimeout = 30 * time.Second
	// GateName is the file name of the gate binary New looks for beside
	// the running executable.
	GateName = "rbee-gate"
	// GateSelf as Options.GatePath makes Start re-execute the running
	// binary as the gate even when an rbee-gate is installed.
	GateSelf = "/proc/self/exe"
)

// MaybeRunGate must be the first call in main() (and in TestMain) of every
// binary that links this package and starts workers through a Leaf. In an
// ordinary run it returns at once. When the process was started as a spawn
// gate it never returns: it waits for release and becomes the worker.
func MaybeRunGate() { gate.MaybeRun() }

// resolveGate returns the gate binary for Options.GatePath: the path given
// (it must be a usable gate binary), or, when empty, GateName beside the
// running executable if there is one, else GateSelf.
func resolveGate(opt string) (string, error) {
	if opt == GateSelf {
		return GateSelf, nil
	}
	if opt != "" {
		if !filepath.IsAbs(opt) {
			return "", fmt.Errorf("%w: gate path %q must be absolute", ErrInvalid, opt)
		}
		if err := checkGateBinary(opt); err != nil {
			return "", err
		}
		return opt, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return GateSelf, nil
	}
	p := filepath.Join(filepath.Dir(exe), GateName)
	if _, err := os.Stat(p); err != nil {
		return GateSelf, nil
	}
	// Installed but unusable is an installation error, not a reason to
	// quietly fall back.
	if err := checkGateBinary(p); err != nil {
		return "", err
	}
	return p, nil
}

// checkGateBinary refuses a gate that is not a regular executable file or
// that someone other than its owner may replace: it runs as root with the
// worker's placement in its hands.
func checkGateBinary(p string) error {
	fi, err := os.Stat(p)
	if err != nil {
		return fmt.Errorf("cgroup: spawn gate %s: %w", p, err)
	}
	switch {
	case !fi.Mode().IsRegular():
		return fmt.Errorf("%w: spawn gate %s is not a regular file", ErrInvalid, p)
	case fi.Mode().Perm()&0o111 == 0:
		return fmt.Errorf("%w: spawn gate %s is not executable", ErrInvalid, p)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("%w: spawn gate %s is writable by group or others (mode %v)", ErrInvalid, p, fi.Mode().Perm())
	}
	return nil
}

// startGated starts cmd through the gate binary gatePath, calls place(pid)
// while the gate blocks (nil: already placed, by CLONE_INTO_CGROUP), then
// releases it and waits until the worker binary has been exec'd (or reports
// why not); with iso the gate drops privileges first. The caller's cmd is
// restored afterwards except for Process (and what Start itself sets), so
// Wait works as usual and cmd.Process.Pid is the worker's pid.
func startGated(cmd *exec.Cmd, gatePath string, place func(pid int) error, iso *Isolation) (err error) {
	if cmd.Process != nil {
		return errors.New("cgroup: exec: already started")
	}
	if cmd.Err != nil {
		return cmd.Err
	}
	if gatePath == "" {
		gatePath = GateSelf
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

	cmd.Path = gatePath
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
		return fmt.Errorf("cgroup: start gate %s for %s: %w", gatePath, origPath, startErr)
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
	if _, herr := io.ReadFull(stR, hello[:]); herr != nil || hello[0] != gate.Hello {
		who := gatePath
		if gatePath == GateSelf {
			who = fmt.Sprintf("%s (does its main() call cgroup.MaybeRunGate() first?)", os.Args[0])
		}
		return abort(fmt.Errorf("cgroup: spawn gate %s did not answer: %w", who, errOr(herr, "bad hello")))
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
		step, errno := gate.ParseStatus(st)
		if step != gate.StepExec && step <= gate.StepVerify && iso != nil {
			return abort(fmt.Errorf("cgroup: drop privileges for %s to uid %d: %s: %w", origPath, iso.UID, step, errno))
		}
		return abort(fmt.Errorf("cgroup: exec %s: %w", origPath, &os.PathError{Op: "exec", Path: origPath, Err: syscall.Errno(errno)}))
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
