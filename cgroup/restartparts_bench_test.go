package cgroup

import (
	"bufio"
	"fmt"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// BenchmarkRestartParts takes the cgroup side of a crash → restart apart,
// every part on the same worker in the same loop: a running worker is
// SIGKILLed, and the clock runs from the kill until the next process's main
// records CLOCK_MONOTONIC. Parts, as the supervisor does them today (fresh):
//
//   - exit: kill → Wait returns (the exit noticed);
//   - empty: Leaf.Kill of the (already dead) tree, which confirms it is
//     empty;
//   - delete, create: the leaf removed and made again with its limits;
//   - start: Leaf.Start of the next process until it has been exec'd (gate,
//     placement, exec);
//   - main: exec'd → the worker's main runs (its own runtime start).
//
// The reused variant skips delete and create: the next process goes into
// the emptied leaf. Each runs without a gate (nogate, the default) and with
// the forced gate: the small rbee-gate (tiny) or the binary itself (self). No backoff is included: the
// supervisor's configured minimum adds to every figure alike.
//
//	go test -run '^$' -bench RestartParts -benchtime 40x ./cgroup/
func BenchmarkRestartParts(b *testing.B) {
	gateBin := requireTestGate(b)
	lim := Limits{MemoryMax: 256 << 20, PidsMax: 64}
	type variant struct {
		name  string
		m     Manager
		reuse bool
		id    string
		leaf  Leaf
		cmd   *exec1
	}
	var vs []*variant
	for _, g := range []struct {
		name string
		opts Options
	}{{"nogate", Options{}}, {"self", Options{ForceGate: true, GatePath: GateSelf}}, {"tiny", Options{ForceGate: true, GatePath: gateBin}}} {
		m := newTestManager(b, g.opts)
		for _, reuse := range []bool{false, true} {
			name := "fresh-" + g.name
			if reuse {
				name = "reused-" + g.name
			}
			v := &variant{name: name, m: m, reuse: reuse, id: fmt.Sprintf("w-r%d", len(vs))}
			l, err := m.Create(v.id, lim)
			if err != nil {
				b.Fatal(err)
			}
			v.leaf = l
			if v.cmd, err = startStamped(l); err != nil {
				b.Fatal(err)
			}
			vs = append(vs, v)
		}
	}
	parts := []string{"exit", "empty", "delete", "create", "start", "main", "total"}
	res := map[string]map[string][]float64{}
	for _, v := range vs {
		res[v.name] = map[string][]float64{}
	}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for _, v := range vs {
			time.Sleep(20 * time.Millisecond) // a crash follows a quiet spell
			r := res[v.name]
			t0 := monoNow()
			_ = v.cmd.c.Process.Signal(syscall.SIGKILL)
			_ = v.cmd.c.Wait()
			t1 := monoNow()
			ctx, cancel := contextTimeout(10 * time.Second)
			err := v.leaf.Kill(ctx)
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			t2 := monoNow()
			t3, t4 := t2, t2
			if !v.reuse {
				if err := v.leaf.Delete(); err != nil {
					b.Fatal(err)
				}
				t3 = monoNow()
				if v.leaf, err = v.m.Create(v.id, lim); err != nil {
					b.Fatal(err)
				}
				t4 = monoNow()
			}
			if v.cmd, err = startStamped(v.leaf); err != nil {
				b.Fatal(err)
			}
			t5 := monoNow()
			stamp, err := v.cmd.stamp()
			if err != nil {
				b.Fatal(err)
			}
			for _, p := range []struct {
				k    string
				a, z int64
			}{{"exit", t0, t1}, {"empty", t1, t2}, {"delete", t2, t3}, {"create", t3, t4}, {"start", t4, t5}, {"main", t5, stamp}, {"total", t0, stamp}} {
				r[p.k] = append(r[p.k], float64(p.z-p.a)/1e6)
			}
		}
	}
	b.StopTimer()
	var lines []string
	for _, v := range vs {
		var f []string
		for _, p := range parts {
			f = append(f, fmt.Sprintf("%s %.2f", p, median(res[v.name][p])))
		}
		b.ReportMetric(median(res[v.name]["total"]), v.name+"-total-ms")
		lines = append(lines, fmt.Sprintf("%-12s %s", v.name, strings.Join(f, "  ")))
	}
	fmt.Printf("restart-parts: cgroup %s, %d restarts each, medians in ms (kill → next worker's main)\n  %s\n",
		mgrMode(), b.N, strings.Join(lines, "\n  "))
	for _, v := range vs {
		_ = v.cmd.c.Process.Kill()
		_ = v.cmd.c.Wait()
	}
}

// exec1 is a started stamp-then-sleep helper.
type exec1 struct {
	c   *exec.Cmd
	out *bufio.Reader
}

func (e *exec1) stamp() (int64, error) {
	line, err := e.out.ReadString('\n')
	if err != nil {
		return 0, err
	}
	return strconv.ParseInt(strings.TrimSpace(line), 10, 64)
}

// startStamped starts a helper in l that prints its CLOCK_MONOTONIC at
// main and then sleeps.
func startStamped(l Leaf) (*exec1, error) {
	c := helperCmd("stamp-sleep")
	out, err := c.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := l.Start(c); err != nil {
		return nil, err
	}
	return &exec1{c: c, out: bufio.NewReader(out)}, nil
}
