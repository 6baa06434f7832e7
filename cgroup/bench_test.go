package cgroup

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/containerd/cgroups/v3/cgroup1"
	"github.com/containerd/cgroups/v3/cgroup2"
)

// BenchmarkSpawn compares starting (and reaping) the same tiny program bare
// with exec.Command against starting it in a fresh leaf with a memory limit
// (Create + Start + Wait + Delete). Both run interleaved in one loop so the
// ratio is measured against a baseline from the same run; the reported
// ratio is leaf/bare.
func BenchmarkSpawn(b *testing.B) {
	for _, sm := range startModes() {
		for _, reuse := range []bool{false, true} {
			name := sm.name + "/fresh-leaf"
			if reuse {
				name = sm.name + "/reused-leaf"
			}
			b.Run(name, func(b *testing.B) { benchSpawn(b, sm.opts, reuse) })
		}
	}
}

// benchSpawn: with reuse the leaf is made once, isolating the cost of
// placement (gate or CLONE_INTO_CGROUP) from mkdir/limits/rmdir.
func benchSpawn(b *testing.B, opts Options, reuse bool) {
	m := newTestManager(b, opts)
	lim := Limits{MemoryMax: 256 << 20, PidsMax: 64}
	var shared Leaf
	if reuse {
		var err error
		if shared, err = m.Create("w-shared", lim); err != nil {
			b.Fatal(err)
		}
	}
	var bare, leaf time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		c := helperCmd("exit")
		if err := c.Start(); err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		l := shared
		if !reuse {
			var err error
			if l, err = m.Create(fmt.Sprintf("w-b%d", i), lim); err != nil {
				b.Fatal(err)
			}
		}
		c = helperCmd("exit")
		if err := l.Start(c); err != nil {
			b.Fatal(err)
		}
		if err := c.Wait(); err != nil {
			b.Fatal(err)
		}
		if !reuse {
			if err := l.Delete(); err != nil {
				b.Fatal(err)
			}
		}
		t2 := time.Now()
		bare += t1.Sub(t0)
		leaf += t2.Sub(t1)
	}
	b.ReportMetric(float64(bare.Microseconds())/1000/float64(b.N), "bare-ms/op")
	b.ReportMetric(float64(leaf.Microseconds())/1000/float64(b.N), "leaf-ms/op")
	b.ReportMetric(float64(leaf)/float64(bare), "leaf/bare")
}

// BenchmarkOOMEvent measures, per OOM kill of a 64 MiB leaf, when the event
// arrives relative to the worker's Wait returning (negative: the event came
// first) and from Start to the event.
func BenchmarkOOMEvent(b *testing.B) {
	m := newTestManager(b, Options{})
	var startToEvent, eventMinusWait time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		l, err := m.Create(fmt.Sprintf("w-o%d", i), Limits{MemoryMax: 64 << 20})
		if err != nil {
			b.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		evs, err := l.OOMEvents(ctx)
		if err != nil {
			b.Fatal(err)
		}
		c := helperCmd("oom")
		t0 := time.Now()
		if err := l.Start(c); err != nil {
			b.Fatal(err)
		}
		_ = c.Wait()
		tw := time.Now()
		var ev OOMEvent
		select {
		case ev = <-evs:
		case <-ctx.Done():
			b.Fatal("no OOM event")
		}
		cancel()
		startToEvent += ev.Time.Sub(t0)
		eventMinusWait += ev.Time.Sub(tw)
		if err := l.Delete(); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(startToEvent.Microseconds())/1000/float64(b.N), "start-to-event-ms")
	b.ReportMetric(float64(eventMinusWait.Microseconds())/1000/float64(b.N), "event-minus-wait-ms")
}

// BenchmarkStats measures one Leaf.Stats of a leaf with a running process
// (the supervisor's monitor calls it per worker every sample_interval)
// against the library's full stat of the same leaf (memory.stat, PSI, io,
// ...: what Stats read before it read only the files it reports).
func BenchmarkStats(b *testing.B) {
	l := sleepingLeaf(b, "w-stats")
	b.Run("Stats", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if _, err := l.Stats(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("library-full-stat", func(b *testing.B) {
		for i := 0; i < b.N; i++ {
			if err := libraryStat(l); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// libraryStat is containerd/cgroups' stat of a leaf with every controller
// the driver uses: v1 Stat(IgnoreNotExist), v2 StatFiltered(memory|cpu|pids).
func libraryStat(l Leaf) error {
	switch ll := l.(type) {
	case *v1Leaf:
		_, err := ll.cg.Stat(cgroup1.IgnoreNotExist)
		return err
	case *v2Leaf:
		_, err := ll.cg.StatFiltered(cgroup2.StatMemory | cgroup2.StatCPU | cgroup2.StatPids)
		return err
	}
	return fmt.Errorf("unknown leaf %T", l)
}
