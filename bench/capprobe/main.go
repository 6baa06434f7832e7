// Command capprobe does, once each, the privileged things the hive does to
// an isolated worker, and prints which succeed. bench/capprobe.sh runs it
// under setpriv with different capability bounding sets to find the
// smallest set the hive needs (docs/security.md). Run as root.
package main

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/procfs"
)

const workerUID = 70123

func main() {
	cgroup.MaybeRunGate()
	os.Exit(run())
}

func report(op string, err error) {
	if err != nil {
		fmt.Printf("%-28s FAIL %v\n", op, err)
		return
	}
	fmt.Printf("%-28s ok\n", op)
}

func run() int {
	root := fmt.Sprintf("rbee-capprobe-%d", os.Getpid())
	opts := cgroup.Options{Root: root}
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		opts.Root = "/sys/fs/cgroup/" + root
	}
	// Without a leaf (the tree cannot be made under this bounding set) the
	// worker is started by a plain exec as the worker uid, so the other
	// operations are still probed.
	var l cgroup.Leaf
	m, err := cgroup.New(opts)
	report("cgroup tree setup", err)
	if err == nil {
		defer cleanup(m)
		l, err = m.Create("w-probe", cgroup.Limits{MemoryMax: 64 << 20, PidsMax: 16})
		report("create leaf", err)
	}

	// A worker that holds a listening socket, as the worker uid.
	ln, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		report("listen", err)
		return 1
	}
	lf, _ := ln.(*net.TCPListener).File()
	ln.Close()
	port := ln.Addr().(*net.TCPAddr).Port
	cmd := exec.Command("/bin/sleep", "60")
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Env = []string{"RBEE_WORKER_TOKEN=secret"}
	if l != nil {
		err = l.Start(cmd, cgroup.WithIsolation(cgroup.Isolation{UID: workerUID, GID: workerUID}))
		report("start isolated worker", err)
	} else {
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: workerUID, Gid: workerUID}}
		err = cmd.Start()
		report("start worker (no leaf)", err)
	}
	lf.Close()
	if err != nil {
		return 1
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	pid := cmd.Process.Pid

	_, err = os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	report("read /proc/<w>/status", err)
	_, err = os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	report("read /proc/<w>/environ", err)
	r, _ := procfs.New("")
	owner, err := r.PortOwner(port, []int{pid})
	if err == nil && owner != pid {
		err = fmt.Errorf("owner %d, want %d", owner, pid)
	}
	report("port owner (/proc/<w>/fd)", err)
	report("signal worker (kill 0)", syscall.Kill(pid, 0))

	home := filepath.Join(os.TempDir(), fmt.Sprintf("capprobe-home-%d", os.Getpid()))
	err = os.Mkdir(home, 0o700)
	if err == nil {
		err = os.Chown(home, workerUID, workerUID)
	}
	report("make worker home (chown)", err)
	// What a worker leaves behind: a file in its own 0700 dir.
	if err == nil {
		err = writeAs(home, "cache.bin")
	}
	report("worker writes in its home", err)
	err = os.RemoveAll(home)
	if err == nil {
		if _, serr := os.Stat(home); serr == nil {
			err = errors.New("still there")
		}
	}
	report("remove worker home", err)
	if err != nil {
		// Leave nothing behind: chown back is what a hive without
		// CAP_DAC_OVERRIDE could still do with CAP_CHOWN, if the tree is flat.
		_ = os.Chown(home, 0, 0)
		_ = os.RemoveAll(home)
	}

	if l != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		report("kill leaf", l.Kill(ctx))
		_ = cmd.Wait()
		report("delete leaf", l.Delete())
	}
	for _, p := range []int{80, 8080} {
		ln, err := net.Listen("tcp4", "127.0.0.1:"+strconv.Itoa(p))
		if err == nil {
			ln.Close()
		}
		report(fmt.Sprintf("bind port %d", p), err)
	}
	return 0
}

// writeAs creates name in dir as the worker uid, with a gated process so
// that the file really is the worker's.
func writeAs(dir, name string) error {
	c := exec.Command("/bin/sh", "-c", `umask 077; mkdir "$1/sub" && echo x > "$1/sub/$2"`, "sh", dir, name)
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: workerUID, Gid: workerUID}}
	if out, err := c.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, out)
	}
	return nil
}

func cleanup(m cgroup.Manager) {
	ids, _ := m.List()
	for _, id := range ids {
		if l, err := m.Load(id); err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			_ = l.Kill(ctx)
			cancel()
			_ = l.Delete()
		}
	}
	// The empty tree itself is removed by bench/capprobe.sh.
}
