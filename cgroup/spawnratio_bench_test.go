package cgroup

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkSpawnRatio states the spawn goal as ratios against a bare exec of
// the same binary, all variants interleaved in one loop (same run, same
// load). Each spawn starts the helper binary and takes two times from the
// moment before Start:
//
//   - exec: until Start returns, i.e. the worker binary has been exec'd (in
//     its leaf, and for a gated start after the gate's placement and, with
//     isolation, its privilege drop); for a bare exec.Cmd the same moment;
//   - main: until the worker's main records CLOCK_MONOTONIC (its first
//     statement; includes the worker's own runtime start, equal in all).
//
// Variants: bare; root (no isolation) and isolated, each without a gate
// (the default: v1 forks from a spawner thread placed in the leaf, v2 uses
// CLONE_INTO_CGROUP, isolated ones start from a restricted spawner thread)
// and through the forced gate (ForceGate, the fallback): the binary itself
// re-executed (-gate-self), the rbee-gate binary (-gate-tiny), and the hive
// binary (-gate-hive, what every v1 spawn paid before). Each worker is placed in a leaf made once per
// variant, so leaf creation is not counted. Before every measured spawn the
// loop sleeps RBEE_SPAWN_ISOLATE (default 20ms): a spawn on a live hive
// follows a quiet spell, and back-to-back cgroup moves share the kernel's
// rcu_sync window, which would flatter the gated variants.
//
// The hive binary is RBEE_HIVE_BIN=/path/to/rbee-hive, or built where a Go
// toolchain is (not in the VM).
//
// Reported: the median of each variant and its ratio to bare's median.
//
//	go test -run '^$' -bench SpawnRatio -benchtime 40x ./cgroup/
func BenchmarkSpawnRatio(b *testing.B) {
	gateBin := requireTestGate(b)
	isolate := 20 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv("RBEE_SPAWN_ISOLATE")); err == nil {
		isolate = d
	}
	lim := Limits{MemoryMax: 256 << 20, PidsMax: 64}
	iso := Isolation{UID: testWorkerUID, GID: testWorkerGID}
	type variant struct {
		name string
		leaf Leaf
		opts []StartOption
	}
	var vs []variant
	type mgr struct {
		suffix string
		opts   Options
		root   bool // also a spawn without isolation
	}
	// Without ForceGate no start uses a gate (v1: forked from a spawner
	// thread in the leaf; v2: CLONE_INTO_CGROUP; isolated ones from a
	// restricted spawner thread); with it every start does.
	mgrs := []mgr{{"", Options{}, true},
		{"-gate-self", Options{ForceGate: true, GatePath: GateSelf}, true},
		{"-gate-tiny", Options{ForceGate: true, GatePath: gateBin}, true}}
	if hive := hiveBinary(b); hive != "" {
		mgrs = append(mgrs, mgr{"-gate-hive", Options{ForceGate: true, GatePath: hive}, true})
	}
	for _, g := range mgrs {
		m := newTestManager(b, g.opts)
		for _, isoOn := range []bool{false, true} {
			if !isoOn && !g.root {
				continue
			}
			name, opts := "root", []StartOption(nil)
			if isoOn {
				name, opts = "isolated", []StartOption{WithIsolation(iso)}
			}
			name += g.suffix
			l, err := m.Create(fmt.Sprintf("w-v%d", len(vs)), lim)
			if err != nil {
				b.Fatal(err)
			}
			vs = append(vs, variant{name, l, opts})
		}
	}
	execT := map[string][]float64{}
	mainT := map[string][]float64{}
	spawn := func(name string, l Leaf, opts []StartOption) {
		time.Sleep(isolate)
		c := helperCmd("stamp")
		out, err := c.StdoutPipe()
		if err != nil {
			b.Fatal(err)
		}
		t0 := monoNow()
		if l == nil {
			err = c.Start()
		} else {
			err = l.Start(c, opts...)
		}
		t1 := monoNow()
		if err != nil {
			b.Fatalf("%s: %v", name, err)
		}
		line, rerr := bufio.NewReader(out).ReadString('\n')
		werr := c.Wait()
		stamp, perr := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		if rerr != nil || werr != nil || perr != nil {
			b.Fatalf("%s: read %q: %v, wait: %v, parse: %v", name, line, rerr, werr, perr)
		}
		execT[name] = append(execT[name], float64(t1-t0)/1e6)
		mainT[name] = append(mainT[name], float64(stamp-t0)/1e6)
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		spawn("bare", nil, nil)
		for _, v := range vs {
			spawn(v.name, v.leaf, v.opts)
		}
	}
	b.StopTimer()
	bareExec, bareMain := median(execT["bare"]), median(mainT["bare"])
	b.ReportMetric(bareExec, "bare-exec-ms")
	b.ReportMetric(bareMain, "bare-main-ms")
	var lines []string
	for _, v := range vs {
		e, mm := median(execT[v.name]), median(mainT[v.name])
		b.ReportMetric(e/bareExec, v.name+"-exec/bare")
		b.ReportMetric(mm/bareMain, v.name+"-main/bare")
		lines = append(lines, fmt.Sprintf("%-14s exec %6.2f ms (x%.2f)  main %6.2f ms (x%.2f)", v.name, e, e/bareExec, mm, mm/bareMain))
	}
	// Printed, not logged: go test cuts a benchmark's log to a few lines.
	fmt.Printf("spawn-ratio: cgroup %s, %d spawns each, medians; bare: exec %.2f ms, main %.2f ms\n  %s\n",
		mgrMode(), b.N, bareExec, bareMain, strings.Join(lines, "\n  "))
}

func monoNow() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

func median(xs []float64) float64 {
	if len(xs) == 0 {
		return 0
	}
	s := append([]float64(nil), xs...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// hiveBinary is RBEE_HIVE_BIN, or cmd/rbee-hive built into a temporary
// directory, or "" where neither is possible (the VM).
func hiveBinary(b *testing.B) string {
	if p := os.Getenv("RBEE_HIVE_BIN"); p != "" {
		return p
	}
	goBin, err := exec.LookPath("go")
	if err != nil {
		return ""
	}
	out := filepath.Join(b.TempDir(), "rbee-hive")
	if o, err := exec.Command(goBin, "build", "-o", out, "github.com/rbee/rbee-hive/cmd/rbee-hive").CombinedOutput(); err != nil {
		b.Fatalf("go build ./cmd/rbee-hive: %v: %s", err, o)
	}
	// b.TempDir is private to root; the gate runs as root, so that is fine.
	return out
}
