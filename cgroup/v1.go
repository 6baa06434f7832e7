package cgroup

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// v1Mount is where cgroups.Mode() found the v1 (tmpfs) cgroup directory.
const v1Mount = "/sys/fs/cgroup"

// v1Manager is the cgroup v1 driver for hybrid and legacy hosts. It only
// touches the memory, pids, cpu(acct) and freezer hierarchies: the library's
// default hierarchy would create directories in every mounted controller
// (devices, blkio, cpuset...) and require "devices", which hybrid hosts
// may not delegate.
type v1Manager struct {
	roots   map[cgroup1.Name]string // root path relative to each hierarchy
	subs    []cgroup1.Subsystem
	hasCPU  bool
	hasSwap bool
	gate    string // spawn gate binary
	// forceGate: start through the gate instead of the spawner threads.
	forceGate         bool
	plain, restricted *spawnerHandle
}

var (
	v1Required = []cgroup1.Name{cgroup1.Memory, cgroup1.Pids, cgroup1.Freezer}
	v1Optional = []cgroup1.Name{cgroup1.Cpu, cgroup1.Cpuacct}
)

func newV1(opts Options) (*v1Manager, error) {
	root := opts.Root
	if root == "" {
		root = "rbee-hive"
	}
	if strings.Contains("/"+root+"/", "/../") {
		return nil, fmt.Errorf("%w: cgroup v1 root %q must not contain \"..\"", ErrInvalid, root)
	}
	// A relative root nests under this process's own cgroup in each hierarchy
	// (its memcg path may be deep while it sits at "/" for pids); an absolute
	// root is the same path in every hierarchy.
	var rootPath cgroup1.Path
	if filepath.IsAbs(root) {
		rootPath = cgroup1.StaticPath(filepath.Clean(root))
	} else {
		rootPath = cgroup1.NestedPath(filepath.Clean(root))
	}

	gatePath, err := resolveGate(opts.GatePath)
	if err != nil {
		return nil, err
	}
	m := &v1Manager{roots: make(map[cgroup1.Name]string), gate: gatePath, forceGate: opts.ForceGate,
		plain: &spawnerHandle{}, restricted: &spawnerHandle{restrict: true}}
	for _, n := range append(append([]cgroup1.Name(nil), v1Required...), v1Optional...) {
		hier := filepath.Join(v1Mount, string(n))
		if _, err := os.Stat(filepath.Join(hier, "cgroup.procs")); err != nil {
			if isRequiredV1(n) {
				return nil, fmt.Errorf("cgroup v1: the %s hierarchy is not mounted at %s: %w", n, hier, err)
			}
			continue
		}
		p, err := rootPath(n)
		if err != nil {
			return nil, fmt.Errorf("cgroup v1: root path in the %s hierarchy: %w", n, err)
		}
		m.roots[n] = p
	}
	m.hasCPU = m.roots[cgroup1.Cpu] != ""
	memRoot := filepath.Join(v1Mount, string(cgroup1.Memory), m.roots[cgroup1.Memory])
	if _, err := os.Stat(filepath.Dir(memRoot)); err != nil {
		return nil, fmt.Errorf("cgroup v1: parent of root %s: %w", memRoot, err)
	}
	for n, p := range m.roots {
		dir := filepath.Join(v1Mount, string(n), p, "workers")
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return nil, fmt.Errorf("cgroup v1: create %s: %w", dir, err)
		}
		if err := checkWritable("v1", dir); err != nil {
			return nil, err
		}
		switch n {
		case cgroup1.Memory:
			m.subs = append(m.subs, cgroup1.NewMemory(v1Mount, cgroup1.OptionalSwap()))
		case cgroup1.Pids:
			m.subs = append(m.subs, cgroup1.NewPids(v1Mount))
		case cgroup1.Freezer:
			m.subs = append(m.subs, cgroup1.NewFreezer(v1Mount))
		case cgroup1.Cpu:
			m.subs = append(m.subs, cgroup1.NewCpu(v1Mount))
		case cgroup1.Cpuacct:
			m.subs = append(m.subs, cgroup1.NewCpuacct(v1Mount))
		}
	}
	// Without swap accounting (no swapaccount=1) memory.memsw.* is absent and
	// writing it would fail every spawn (containerd#7828).
	if _, err := os.Stat(filepath.Join(memRoot, "workers", "memory.memsw.limit_in_bytes")); err == nil {
		m.hasSwap = true
	}
	return m, nil
}

func isRequiredV1(n cgroup1.Name) bool {
	for _, r := range v1Required {
		if r == n {
			return true
		}
	}
	return false
}

func (m *v1Manager) Mode() string { return "v1" }
func (m *v1Manager) Root() string { return m.roots[cgroup1.Memory] }

// leafPath is the cgroup1.Path of a leaf: <root>/workers/<id> per hierarchy.
func (m *v1Manager) leafPath(id string) cgroup1.Path {
	return func(n cgroup1.Name) (string, error) {
		r, ok := m.roots[n]
		if !ok {
			return "", cgroup1.ErrControllerNotActive
		}
		return filepath.Join(r, "workers", id), nil
	}
}

func (m *v1Manager) leafDirs(id string) map[cgroup1.Name]string {
	dirs := make(map[cgroup1.Name]string, len(m.roots))
	for n, r := range m.roots {
		dirs[n] = filepath.Join(v1Mount, string(n), r, "workers", id)
	}
	return dirs
}

func (m *v1Manager) hierarchy() ([]cgroup1.Subsystem, error) { return m.subs, nil }

func (m *v1Manager) Create(id string, l Limits) (Leaf, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	if err := validateLimits(l); err != nil {
		return nil, err
	}
	if l.CPUWeight > 0 && !m.hasCPU {
		return nil, fmt.Errorf("%w: CPUWeight set but the cpu hierarchy is not mounted", ErrInvalid)
	}
	dirs := m.leafDirs(id)
	// The library MkdirAll's, so claim the leaf first: Mkdir in the memory
	// hierarchy fails if another Create (or an old hive) already made it.
	if err := os.Mkdir(dirs[cgroup1.Memory], 0o755); err != nil {
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("cgroup v1: leaf %s: %w", dirs[cgroup1.Memory], ErrExists)
		}
		return nil, fmt.Errorf("cgroup v1: create leaf %s: %w", dirs[cgroup1.Memory], err)
	}
	lim := l.MemoryMax
	res := &specs.LinuxResources{Memory: &specs.LinuxMemory{Limit: &lim}}
	if m.hasSwap {
		// memsw is memory+swap: equal to the limit means no swap at all.
		res.Memory.Swap = &lim
	}
	if l.PidsMax > 0 {
		res.Pids = &specs.LinuxPids{Limit: &l.PidsMax}
	}
	if sh := weightToShares(l.CPUWeight); sh > 0 {
		res.CPU = &specs.LinuxCPU{Shares: &sh}
	}
	cg, err := cgroup1.New(m.leafPath(id), res, cgroup1.WithHierarchy(m.hierarchy))
	if err != nil {
		removeDirs(dirs)
		return nil, fmt.Errorf("cgroup v1: create leaf %s: %w", id, err)
	}
	return m.newLeaf(id, cg, dirs), nil
}

func removeDirs(dirs map[cgroup1.Name]string) {
	for _, d := range dirs {
		_ = os.Remove(d)
	}
}

func (m *v1Manager) Load(id string) (Leaf, error) {
	if err := ValidateID(id); err != nil {
		return nil, err
	}
	dirs := m.leafDirs(id)
	if _, err := os.Stat(dirs[cgroup1.Memory]); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("cgroup v1: leaf %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v1: leaf %s: %w", id, err)
	}
	cg, err := cgroup1.Load(m.leafPath(id), cgroup1.WithHierarchy(m.hierarchy))
	if err != nil {
		if errors.Is(err, cgroup1.ErrCgroupDeleted) {
			return nil, fmt.Errorf("cgroup v1: leaf %s: %w", id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v1: load leaf %s: %w", id, err)
	}
	return m.newLeaf(id, cg, dirs), nil
}

func (m *v1Manager) List() ([]string, error) {
	return listLeaves(filepath.Join(v1Mount, string(cgroup1.Memory), m.roots[cgroup1.Memory], "workers"))
}

// LeafOf looks in the memory hierarchy, where every leaf exists.
func (m *v1Manager) LeafOf(pid int) (string, error) {
	return leafOf("v1", pid, string(cgroup1.Memory), m.roots[cgroup1.Memory])
}

// v1Leaf is one worker's cgroup in each v1 hierarchy.
type v1Leaf struct {
	id   string
	cg   cgroup1.Cgroup
	dirs map[cgroup1.Name]string // absolute directories
	gate string
	// Without forceGate, Start forks from a spawner thread placed in the
	// leaf (restricted for WithIsolation); the gate is the fallback.
	forceGate         bool
	plain, restricted *spawnerHandle
	stats             *statReader
}

func (l *v1Leaf) ID() string { return l.id }

// Start forks cmd from a spawner thread that sits in the leaf during the
// fork (spawner.go): CLONE_INTO_CGROUP is cgroup2-only (a v1 directory fd
// makes clone3 fail with EBADF), but v1 moves single threads. With
// WithIsolation the thread is a restricted one and the child switches
// identity before exec. ForceGate, or a thread that cannot be prepared,
// selects the spawn gate instead.
func (l *v1Leaf) Start(cmd *exec.Cmd, opts ...StartOption) error {
	sc := applyStartOptions(opts)
	if sc.iso != nil {
		if err := checkIsolatedCmd(cmd); err != nil {
			return err
		}
	}
	if !l.forceGate {
		h := l.plain
		if sc.iso != nil {
			h = l.restricted
		}
		if sp, err := h.get(); err == nil {
			dirs := make(map[string]string, len(l.dirs))
			for n, d := range l.dirs {
				dirs[string(n)] = d
			}
			return startFromSpawner(sp, cmd, sc.iso, func(start func() error) error {
				return sp.forkIn(dirs, start)
			}, "cgroup v1", l.id)
		}
	}
	return startGated(cmd, l.gate, func(pid int) error {
		return l.cg.AddProc(uint64(pid))
	}, sc.iso)
}

func (l *v1Leaf) OOMEvents(ctx context.Context) (<-chan OOMEvent, error) {
	return watchV1(ctx, l.id, l.cg, l.dirs[cgroup1.Memory])
}

func (l *v1Leaf) Stats() (Stats, error) { return l.stats.stats() }

func (m *v1Manager) newLeaf(id string, cg cgroup1.Cgroup, dirs map[cgroup1.Name]string) *v1Leaf {
	mem := dirs[cgroup1.Memory]
	var p [nStat]string
	p[statCurrent] = filepath.Join(mem, "memory.usage_in_bytes")
	p[statPeak] = filepath.Join(mem, "memory.max_usage_in_bytes")
	p[statOOM] = filepath.Join(mem, "memory.oom_control")
	if d, ok := dirs[cgroup1.Pids]; ok {
		p[statPids] = filepath.Join(d, "pids.current")
	}
	if d, ok := dirs[cgroup1.Cpuacct]; ok {
		p[statCPU] = filepath.Join(d, "cpuacct.usage") // ns
	}
	l := &v1Leaf{id: id, cg: cg, dirs: dirs, gate: m.gate, forceGate: m.forceGate, plain: m.plain, restricted: m.restricted, stats: newStatReader("v1", id, p, "", time.Nanosecond, "oom_kill")}
	closeWhenDropped(l, l.stats)
	return l
}

func (l *v1Leaf) Pids() ([]int, error) {
	ps, err := readPids(l.dirs[cgroup1.Memory])
	if err != nil {
		if isGone(err) {
			return nil, fmt.Errorf("cgroup v1: leaf %s: %w", l.id, ErrNotFound)
		}
		return nil, fmt.Errorf("cgroup v1: pids of leaf %s: %w", l.id, err)
	}
	return ps, nil
}

// Kill freezes, SIGKILLs every pid and thaws until the leaf is empty: v1 has
// no cgroup.kill. The pid list comes from the memory hierarchy, the one that
// matters; every process placed by Start is in all hierarchies.
func (l *v1Leaf) Kill(ctx context.Context) error {
	var fz freezer
	if d, ok := l.dirs[cgroup1.Freezer]; ok {
		fz = v1Freezer(d)
	}
	if err := freezeKillLoop(ctx, fz, func() ([]int, error) { return readPids(l.dirs[cgroup1.Memory]) }); err != nil {
		return fmt.Errorf("cgroup v1: kill leaf %s: %w", l.id, err)
	}
	return nil
}

// Delete removes the leaf from every hierarchy; a leaf already gone
// everywhere counts as deleted, so callers can retry.
func (l *v1Leaf) Delete() error {
	// Before and after the removal: a Stats racing with Delete may reopen.
	l.stats.close()
	defer l.stats.close()
	gone := true
	for _, d := range l.dirs {
		if !dirGone(d) {
			gone = false
		}
	}
	if gone {
		return nil
	}
	if err := l.cg.Delete(); err != nil {
		return fmt.Errorf("cgroup v1: delete leaf %s: %w", l.id, err)
	}
	return nil
}

// v1Freezer writes freezer.state and reads it back until it says the same.
func v1Freezer(dir string) fileFreezer {
	return fileFreezer{dir: dir, file: "freezer.state", frozen: "FROZEN", thawed: "THAWED",
		reached: func(want string) (bool, error) {
			b, err := os.ReadFile(filepath.Join(dir, "freezer.state"))
			if err != nil {
				return false, err
			}
			return strings.TrimSpace(string(b)) == want, nil
		}}
}
