package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/containerd/cgroups/v3/cgroup2"
	"golang.org/x/sys/unix"
)

// v2Mount is where cgroups.Mode() looks for the unified hierarchy; Unified
// mode means exactly this path is a cgroup2 mount.
const v2Mount = "/sys/fs/cgroup"

// v2Manager is the cgroup v2 (unified) driver. Tree setup and leaf creation
// write cgroupfs directly: the library's NewManager/NewChild write
// "+memory ..." into every ancestor's subtree_control from the mount point
// down (systemd-owned nodes included), keep only the last error, MkdirAll
// (so "already exists" goes unnoticed) and cannot probe for
// memory.swap.max. Reads, Delete and AddProc use the library.
type v2Manager struct {
	root      string // absolute directory
	rel       string // root relative to v2Mount, "/..." (for /proc/<pid>/cgroup)
	hasCPU    bool
	hasSwap   bool
	forceGate bool
	gate      string // spawn gate binary
	spawner   *spawnerHandle
}

// v2Required are the controllers for workers/ and its leaves; memory and pids are
// required, cpu is used when the parent delegates it.
var v2Required = []string{"memory", "pids"}

func newV2(opts Options) (*v2Manager, error) {
	root := opts.Root
	if root == "" {
		self, err := procCgroups(0)
		if err != nil {
			return nil, fmt.Errorf("cgroup v2: find own cgroup: %w", err)
		}
		root = defaultV2Root(self[""])
	}
	if !filepath.IsAbs(root) {
		return nil, fmt.Errorf("%w: cgroup v2 root %q must be an absolute path under %s", ErrInvalid, root, v2Mount)
	}
	root = filepath.Clean(root)
	rel, ok := strings.CutPrefix(root, v2Mount+"/")
	if !ok || rel == "" {
		return nil, fmt.Errorf("%w: cgroup v2 root %q must be a directory below %s", ErrInvalid, root, v2Mount)
	}
	gatePath, err := resolveGate(opts.GatePath)
	if err != nil {
		return nil, err
	}
	m := &v2Manager{root: root, rel: "/" + rel, forceGate: opts.ForceGate, gate: gatePath, spawner: &spawnerHandle{restrict: true}}
	if !m.forceGate && !kernelAtLeast(5, 7) {
		// No CLONE_INTO_CGROUP before 5.7; a failed clone3 cannot simply be
		// retried with the caller's exec.Cmd (Start closes its pipes), so
		// decide up front.
		m.forceGate = true
	}
	if err := m.setup(opts.MoveSelf); err != nil {
		return nil, err
	}
	return m, nil
}

// defaultV2Root is the tree's root for a process in cgroup self (a path
// relative to v2Mount) when Options.Root is empty: its own cgroup, or, when
// it already sits in a cgroup named supervisor (systemd >= 254 started it
// there with DelegateSubgroup=supervisor), that cgroup's parent, the unit's
// delegated cgroup; otherwise the tree would nest one level too deep
// (<unit>/supervisor/{supervisor,workers}). At the top of the tree (no
// systemd unit) it is a named subtree.
func defaultV2Root(self string) string {
	self = filepath.Clean("/" + self)
	if self == "/" {
		return filepath.Join(v2Mount, "rbee-hive")
	}
	if filepath.Base(self) == "supervisor" && filepath.Dir(self) != "/" {
		return filepath.Join(v2Mount, filepath.Dir(self))
	}
	return filepath.Join(v2Mount, self)
}

// setup builds <root>/supervisor and <root>/workers. The no-internal-processes
// rule forbids enabling controllers in root's subtree_control while root holds
// processes, so a hive that lives in root (systemd Delegate=yes) must first move
// itself into supervisor/.
func (m *v2Manager) setup(moveSelf bool) error {
	parent := filepath.Dir(m.root)
	if _, err := os.Stat(parent); err != nil {
		return fmt.Errorf("cgroup v2: parent of root %s: %w", m.root, err)
	}
	if err := os.Mkdir(m.root, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cgroup v2: create root %s: %w", m.root, err)
	}
	if err := checkWritable("v2", m.root); err != nil {
		return err
	}
	ctrl, err := os.ReadFile(filepath.Join(m.root, "cgroup.controllers"))
	if err != nil {
		return fmt.Errorf("cgroup v2: root %s is not a cgroup: %w", m.root, err)
	}
	var missing []string
	for _, c := range v2Required {
		if !hasController(string(ctrl), c) {
			missing = append(missing, c)
		}
	}
	if len(missing) > 0 {
		return fmt.Errorf("cgroup v2: root %s lacks controller(s) %s: enable them in %s/cgroup.subtree_control (under systemd: Delegate=yes)",
			m.root, strings.Join(missing, ", "), parent)
	}
	m.hasCPU = hasController(string(ctrl), "cpu")
	enable := "+memory +pids"
	if m.hasCPU {
		enable += " +cpu"
	}

	sup := filepath.Join(m.root, "supervisor")
	if err := os.Mkdir(sup, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cgroup v2: create %s: %w", sup, err)
	}
	if !m.forceGate && !cloneIntoCgroupWorks(sup) {
		m.forceGate = true
	}
	if moveSelf {
		if err := writeFile(sup, "cgroup.procs", strconv.Itoa(os.Getpid())); err != nil {
			return fmt.Errorf("cgroup v2: move the hive into %s: %w", sup, err)
		}
	}
	if err := writeFile(m.root, "cgroup.subtree_control", enable); err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("cgroup v2: root %s holds processes, so its controllers cannot be delegated (set MoveSelf to move the hive into supervisor/): %w", m.root, err)
		}
		return fmt.Errorf("cgroup v2: %w", err)
	}
	workers := filepath.Join(m.root, "workers")
	if err := os.Mkdir(workers, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cgroup v2: create %s: %w", workers, err)
	}
	if err := checkWritable("v2", workers); err != nil {
		return err
	}
	if err := writeFile(workers, "cgroup.subtree_control", enable); err != nil {
		return fmt.Errorf("cgroup v2: %w", err)
	}
	// Swap accounting may be compiled out or disabled (swapaccount=0); then
	// memory.swap.max does not exist and writing it would fail every spawn.
	if _, err := os.Stat(filepath.Join(workers, "memory.swap.max")); err == nil {
		m.hasSwap = true
	}
	return nil
}

func (m *v2Manager) Mode() string { return "v2" }
func (m *v2Manager) Root() string { return m.root }

func (m *v2Manager) leafDir(id string) string { return filepath.Join(m.root, "workers", id) }

func (m *v2Manager) Create(id string, l Limits) (Leaf, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if err := validateLimits(l); err != nil {
		return nil, err
	}
	if l.CPUWeight > 0 && !m.hasCPU {
		return nil, fmt.Errorf("%w: CPUWeight set but the cpu controller is not delegated to %s", ErrInvalid, m.root)
	}
	dir := m.leafDir(id)
	if err := os.Mkdir(dir, 0o755); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("cgroup v2: leaf %s: %w", dir, ErrExists)
		}
		return nil, fmt.Errorf("cgroup v2: create leaf %s: %w", dir, err)
	}
	pidsMax := "max"
	if l.PidsMax > 0 {
		pidsMax = strconv.FormatInt(l.PidsMax, 10)
	}
	files := [][2]string{
		{"memory.max", strconv.FormatInt(l.MemoryMax, 10)},
		{"memory.oom.group", "1"},
		{"pids.max", pidsMax},
	}
	if m.hasSwap {
		files = append(files, [2]string{"memory.swap.max", "0"})
	}
	if l.CPUWeight > 0 {
		files = append(files, [2]string{"cpu.weight", strconv.FormatUint(l.CPUWeight, 10)})
	}
	for _, f := range files {
		if err := writeFile(dir, f[0], f[1]); err != nil {
			_ = os.Remove(dir)
			return nil, fmt.Errorf("cgroup v2: limit leaf %s: %w", id, err)
		}
	}
	return m.leaf(id)
}

func (m *v2Manager) leaf(id string) (*v2Leaf, error) {
	cg, err := cgroup2.Load(m.rel+"/workers/"+id, cgroup2.WithMountpoint(v2Mount))
	if err != nil {
		return nil, fmt.Errorf("cgroup v2: load leaf %s: %w", id, err)
	}
	dir := m.leafDir(id)
	var p [nStat]string
	for slot, name := range [nStat]string{statCurrent: "memory.current", statOOM: "memory.events",
		statPeak: "memory.peak", statPids: "pids.current", statCPU: "cpu.stat"} {
		p[slot] = filepath.Join(dir, name)
	}
	l := &v2Leaf{id: id, dir: dir, cg: cg, forceGate: m.forceGate, gate: m.gate, spawner: m.spawner,
		// memory.events: oom_group_kill, or oom_kill on kernels < 5.17.
		stats: newStatReader("v2", id, p, "usage_usec", time.Microsecond, "oom_group_kill", "oom_kill")}
	closeWhenDropped(l, l.stats)
	return l, nil
}

func (m *v2Manager) Load(id string) (Leaf, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if _, err := os.Stat(m.leafDir(id)); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("cgroup v2: leaf %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v2: leaf %s: %w", id, err)
	}
	return m.leaf(id)
}

func (m *v2Manager) List() ([]string, error) {
	return listLeaves(filepath.Join(m.root, "workers"))
}

func (m *v2Manager) LeafOf(pid int) (string, error) { return leafOf("v2", pid, "", m.rel) }

// v2Leaf is one worker's cgroup on v2.
type v2Leaf struct {
	id        string
	dir       string
	cg        *cgroup2.Manager
	forceGate bool
	gate      string
	spawner   *spawnerHandle
	stats     *statReader
}

func (l *v2Leaf) ID() string { return l.id }

// Start uses CLONE_INTO_CGROUP (SysProcAttr.UseCgroupFD, kernel >= 5.7): the
// child is created inside the leaf, no gate needed. ForceGate selects the
// spawn gate instead (old kernels, and tests of the fallback). WithIsolation
// starts from the manager's restricted spawner thread (spawner.go), also
// without a gate; where that thread cannot be restricted it goes through
// the gate, which drops privileges before exec.
func (l *v2Leaf) Start(cmd *exec.Cmd, opts ...StartOption) error {
	sc := applyStartOptions(opts)
	if sc.iso != nil {
		if err := checkIsolatedCmd(cmd); err != nil {
			return err
		}
	}
	if l.forceGate {
		return startGated(cmd, l.gate, func(pid int) error {
			return l.cg.AddProc(uint64(pid))
		}, sc.iso)
	}
	if cmd.SysProcAttr != nil && cmd.SysProcAttr.UseCgroupFD {
		return fmt.Errorf("%w: cmd.SysProcAttr.UseCgroupFD is already set", ErrInvalid)
	}
	fd, err := unix.Open(l.dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("cgroup v2: leaf %s: %w", l.id, ErrNotFound)
		}
		return fmt.Errorf("cgroup v2: open leaf %s: %w", l.dir, err)
	}
	defer unix.Close(fd)
	if sc.iso != nil {
		if sp, serr := l.spawner.get(); serr == nil {
			// No gate: the restricted thread forks, the child switches
			// identity and session, and CLONE_INTO_CGROUP places it.
			return startFromSpawner(sp, cmd, sc.iso, func(start func() error) error {
				cmd.SysProcAttr.UseCgroupFD, cmd.SysProcAttr.CgroupFD = true, fd
				return start()
			}, "cgroup v2", l.id)
		}
	}
	// Copy SysProcAttr: the caller may share one struct between commands.
	orig := cmd.SysProcAttr
	var spa syscall.SysProcAttr
	if orig != nil {
		spa = *orig
	}
	spa.UseCgroupFD, spa.CgroupFD = true, fd
	cmd.SysProcAttr = &spa
	if sc.iso != nil {
		err = startGated(cmd, l.gate, nil, sc.iso)
	} else {
		err = cmd.Start()
	}
	cmd.SysProcAttr = orig
	if err != nil {
		return fmt.Errorf("cgroup v2: start %s in leaf %s: %w", cmd.Path, l.id, err)
	}
	return nil
}

func (l *v2Leaf) OOMEvents(ctx context.Context) (<-chan OOMEvent, error) {
	return watchV2(ctx, l.id, l.dir)
}

func (l *v2Leaf) Stats() (Stats, error) { return l.stats.stats() }

func (l *v2Leaf) Pids() ([]int, error) {
	ps, err := l.cg.Procs(true)
	if err != nil {
		if isGone(err) {
			return nil, fmt.Errorf("cgroup v2: leaf %s: %w", l.id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v2: pids of leaf %s: %w", l.id, err)
	}
	out := make([]int, len(ps))
	for i, p := range ps {
		out[i] = int(p)
	}
	return out, nil
}

// Kill writes cgroup.kill (kernel >= 5.14: SIGKILL to the whole subtree,
// race-free against forks) and waits for populated 0. The library's Kill is
// not used: its fallback reaps every pid with Wait, which would steal the
// exit status from the caller's cmd.Wait.
func (l *v2Leaf) Kill(ctx context.Context) error {
	err := writeFile(l.dir, "cgroup.kill", "1")
	switch {
	case err == nil:
	case isGone(err) && dirGone(l.dir):
		return nil
	case errors.Is(err, os.ErrNotExist):
		// Kernel < 5.14: no cgroup.kill.
		if err := freezeKillLoop(ctx, v2Freezer(l.dir), l.listPids); err != nil {
			return fmt.Errorf("cgroup v2: kill leaf %s: %w", l.id, err)
		}
	default:
		return fmt.Errorf("cgroup v2: kill leaf %s: %w", l.id, err)
	}
	err = pollUntil(ctx, func() (bool, error) {
		ev, err := readKV(filepath.Join(l.dir, "cgroup.events"))
		if err != nil {
			return isGone(err), nil
		}
		return ev["populated"] == 0, nil
	})
	if err != nil {
		return fmt.Errorf("cgroup v2: wait for leaf %s to empty: %w", l.id, err)
	}
	return nil
}

func (l *v2Leaf) listPids() ([]int, error) { return readPids(l.dir) }

// Delete removes the leaf; deleting a leaf that is already gone succeeds, so
// callers can retry.
func (l *v2Leaf) Delete() error {
	// Before and after the removal: a Stats racing with Delete may reopen.
	l.stats.close()
	defer l.stats.close()
	if dirGone(l.dir) {
		return nil
	}
	if err := l.cg.Delete(); err != nil {
		return fmt.Errorf("cgroup v2: delete leaf %s: %w", l.id, err)
	}
	return nil
}

// v2Freezer writes cgroup.freeze; cgroup.events "frozen" says when it took.
func v2Freezer(dir string) fileFreezer {
	return fileFreezer{dir: dir, file: "cgroup.freeze", frozen: "1", thawed: "0",
		reached: func(want string) (bool, error) {
			ev, err := readKV(filepath.Join(dir, "cgroup.events"))
			if err != nil {
				return false, err
			}
			return strconv.FormatUint(ev["frozen"], 10) == want, nil
		}}
}

func dirGone(dir string) bool {
	_, err := os.Stat(dir)
	return errors.Is(err, os.ErrNotExist)
}

// listLeaves returns the valid worker ids among the subdirectories of dir.
func listLeaves(dir string) ([]string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, fmt.Errorf("list leaves in %s: %w", dir, err)
	}
	var ids []string
	for _, e := range ents {
		if e.IsDir() && ValidateID(e.Name()) == nil {
			ids = append(ids, e.Name())
		}
	}
	return ids, nil
}

// cloneIntoCgroupWorks probes CLONE_INTO_CGROUP once: ForkExec, into dir,
// of a path that cannot exist. ENOENT means clone3 placed the child and only
// its exec failed (ForkExec reaps it). Anything else (ENOSYS or EPERM from a
// seccomp filter that blocks clone3, as older container runtimes ship) would
// fail every worker's Start, so the spawn gate is used instead.
func cloneIntoCgroupWorks(dir string) bool {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return false
	}
	defer unix.Close(fd)
	_, err = syscall.ForkExec("/nonexistent/rbee-hive-clone-into-cgroup-probe", []string{"probe"},
		&syscall.ProcAttr{Sys: &syscall.SysProcAttr{UseCgroupFD: true, CgroupFD: fd}})
	return errors.Is(err, syscall.ENOENT)
}

// kernelAtLeast compares the running kernel's release with major.minor; an
// unparsable release counts as new enough.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return true
	}
	rel := unix.ByteSliceToString(u.Release[:])
	var ma, mi int
	if _, err := fmt.Sscanf(rel, "%d.%d", &ma, &mi); err != nil {
		return true
	}
	return ma > major || (ma == major && mi >= minor)
}
