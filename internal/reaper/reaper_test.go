//go:build linux && (amd64 || arm64 || ppc64le || riscv64 || s390x || loong64)

package reaper

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func newReaper(t testing.TB) *Reaper {
	t.Helper()
	r, err := New(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = r.Close() })
	return r
}

// recv waits for the one Exit on ch; the generous bound only keeps a broken
// reaper from hanging the test run.
func recv(t testing.TB, ch <-chan Exit) Exit {
	t.Helper()
	select {
	case e, ok := <-ch:
		if !ok {
			t.Fatal("channel closed without an Exit")
		}
		if _, more := <-ch; more {
			t.Fatal("a second Exit on the channel")
		}
		return e
	case <-time.After(60 * time.Second):
		t.Fatal("no Exit within 60s")
	}
	return Exit{}
}

// state is the process state letter of pid ("" when it does not exist).
func state(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return s[i+2 : i+3]
}

func threads(t testing.TB) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "Threads:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(v))
			return n
		}
	}
	t.Fatal("no Threads line")
	return 0
}

func TestChildExits(t *testing.T) {
	r := newReaper(t)
	for _, tc := range []struct {
		name   string
		script string
		pidfd  bool // from SysProcAttr.PidFD instead of pidfd_open
		hold   bool
		want   Exit
	}{
		{"exit 0", "exit 0", false, false, Exit{Known: true, Exited: true, Code: 0}},
		{"exit 3", "exit 3", false, false, Exit{Known: true, Exited: true, Code: 3}},
		{"exit 255 via pidfd", "exit 255", true, false, Exit{Known: true, Exited: true, Code: 255}},
		{"SIGTERM", "kill -TERM $$", false, false, Exit{Known: true, Signal: syscall.SIGTERM}},
		{"SIGKILL via pidfd", "kill -KILL $$", true, false, Exit{Known: true, Signal: syscall.SIGKILL}},
		{"SIGSEGV", "kill -SEGV $$", false, false, Exit{Known: true, Signal: syscall.SIGSEGV}},
		{"exit 7 held", "exit 7", false, true, Exit{Known: true, Exited: true, Code: 7}},
		{"SIGKILL held via pidfd", "kill -KILL $$", true, true, Exit{Known: true, Signal: syscall.SIGKILL}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// The child waits for stdin to close, so it is watched before
			// it exits (and a second case watches it as a zombie).
			c := exec.Command("/bin/sh", "-c", "read _; "+tc.script)
			in, err := c.StdinPipe()
			if err != nil {
				t.Fatal(err)
			}
			pidfd := -1
			if tc.pidfd {
				c.SysProcAttr = &syscall.SysProcAttr{PidFD: &pidfd}
			}
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			pid := c.Process.Pid
			var ch <-chan Exit
			if tc.pidfd {
				ch, err = r.WatchPidFD(pidfd, pid, tc.hold)
			} else {
				ch, err = r.Watch(pid, tc.hold)
			}
			if err != nil {
				t.Fatal(err)
			}
			in.Close()
			e := recv(t, ch)
			tc.want.Pid = pid
			if e.Pid != tc.want.Pid || e.Known != tc.want.Known || e.Exited != tc.want.Exited || e.Code != tc.want.Code || e.Signal != tc.want.Signal {
				t.Errorf("Exit = %+v (%v), want %+v", e, e, tc.want)
			}
			if tc.hold {
				if s := state(pid); s != "Z" {
					t.Errorf("held child state %q, want a zombie", s)
				}
				if err := e.Release(); err != nil {
					t.Fatal(err)
				}
				if err := e.Release(); err != nil {
					t.Errorf("second Release: %v", err)
				}
			}
			if s := state(pid); s != "" {
				t.Errorf("child still in /proc (state %q) after the Exit: not reaped", s)
			}
			_ = c.Process.Release()
		})
	}
	if n := r.Watched(); n != 0 {
		t.Errorf("Watched = %d after every exit, want 0", n)
	}
}

// TestAlreadyExited: a child that is a zombie before Watch is reported.
func TestAlreadyExited(t *testing.T) {
	r := newReaper(t)
	c := exec.Command("/bin/sh", "-c", "exit 4")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	for state(c.Process.Pid) != "Z" {
		time.Sleep(time.Millisecond)
	}
	ch, err := r.Watch(c.Process.Pid, false)
	if err != nil {
		t.Fatal(err)
	}
	if e := recv(t, ch); !e.Known || !e.Exited || e.Code != 4 {
		t.Errorf("Exit = %v, want code 4", e)
	}
}

// TestNonChild: a process started by a helper that exited (so it is
// reparented away from us, as a worker is after a hive restart) is watched
// through its pidfd; its exit is reported with the status unknown.
func TestNonChild(t *testing.T) {
	if sub, _ := unix.PrctlRetInt(unix.PR_GET_CHILD_SUBREAPER, 0, 0, 0, 0); sub != 0 {
		t.Fatal("the test process is a subreaper: orphans would become its children")
	}
	r := newReaper(t)
	out, err := exec.Command("/bin/sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!").Output()
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := r.Watch(pid, true)
	if err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	e := recv(t, ch)
	if e.Pid != pid || e.Known || e.Exited || e.Signal != 0 {
		t.Errorf("Exit = %+v, want pid %d with status unknown", e, pid)
	}
	if err := e.Release(); err != nil {
		t.Errorf("Release of a non-child: %v", err)
	}
}

// startSleeper starts a /bin/sleep 600 for a test to watch and kill.
func startSleeper(t testing.TB) *exec.Cmd {
	t.Helper()
	c := exec.Command("/bin/sleep", "600")
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	return c
}

// TestManyProcessesOneThread: 200 watched processes cost no OS thread
// each: the process's thread count with all of them watched is within a
// small constant of the count before (a goroutine per process blocked in
// waitid would add about 200).
func TestManyProcessesOneThread(t *testing.T) {
	const n = 200
	r := newReaper(t)
	base := threads(t)
	var cmds []*exec.Cmd
	var chans []<-chan Exit
	defer func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
		}
	}()
	for range n {
		c := startSleeper(t)
		cmds = append(cmds, c)
		ch, err := r.Watch(c.Process.Pid, false)
		if err != nil {
			t.Fatal(err)
		}
		chans = append(chans, ch)
	}
	time.Sleep(100 * time.Millisecond) // let any thread the runtime would start appear
	watching := threads(t)
	if r.Watched() != n {
		t.Errorf("Watched = %d, want %d", r.Watched(), n)
	}
	for _, c := range cmds {
		if err := c.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
	}
	for i, ch := range chans {
		if e := recv(t, ch); !e.Known || e.Signal != syscall.SIGKILL || e.Pid != cmds[i].Process.Pid {
			t.Errorf("Exit %d = %v, want SIGKILL of pid %d", i, e, cmds[i].Process.Pid)
		}
	}
	after := threads(t)
	t.Logf("threads: %d before, %d with %d processes watched, %d after their exits", base, watching, n, after)
	if watching > base+4 || after > base+4 {
		t.Errorf("threads grew with the processes: %d before, %d watching %d, %d after", base, watching, n, after)
	}
}

func TestUnwatchAndClose(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	r, err := New(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var cmds []*exec.Cmd
	defer func() {
		for _, c := range cmds {
			_ = c.Process.Kill()
			_ = c.Wait()
		}
	}()
	start := func() (*exec.Cmd, <-chan Exit) {
		c := startSleeper(t)
		cmds = append(cmds, c)
		ch, err := r.Watch(c.Process.Pid, false)
		if err != nil {
			t.Fatal(err)
		}
		return c, ch
	}
	a, cha := start()
	if _, err := r.Watch(a.Process.Pid, false); err == nil {
		t.Error("a second Watch of the same pid succeeded")
	}
	if !r.Unwatch(a.Process.Pid) {
		t.Error("Unwatch of a watched pid = false")
	}
	if _, ok := <-cha; ok {
		t.Error("Unwatch sent an Exit")
	}
	if r.Unwatch(a.Process.Pid) {
		t.Error("second Unwatch = true")
	}
	_, chb := start()
	cancel() // the context ends the loop like Close
	select {
	case _, ok := <-chb:
		if ok {
			t.Error("an Exit for a running process after the context ended")
		}
	case <-time.After(60 * time.Second):
		t.Fatal("channel not closed after the context ended")
	}
	if err := r.Close(); err != nil {
		t.Errorf("Close after the context: %v", err)
	}
	if _, err := r.Watch(os.Getpid(), false); !errors.Is(err, ErrClosed) {
		t.Errorf("Watch after Close = %v, want ErrClosed", err)
	}
	if _, err := r.Watch(1<<30, false); err == nil {
		t.Error("Watch of a pid that does not exist succeeded")
	}
}

// BenchmarkExit is SIGKILL → Exit received for one child, through the
// reaper (one shared loop) and through os.Process.Wait in a goroutine (a
// thread per waiter), in the same run; the process start is outside the
// timer, and both waiters are asleep in the kernel when the kill is sent.
func BenchmarkExit(b *testing.B) {
	r := newReaper(b)
	b.Run("reaper", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			c := startSleeper(b)
			ch, err := r.Watch(c.Process.Pid, false)
			if err != nil {
				b.Fatal(err)
			}
			time.Sleep(2 * time.Millisecond) // both sides asleep in the kernel
			b.StartTimer()
			_ = c.Process.Signal(syscall.SIGKILL)
			<-ch
			_ = c.Process.Release()
		}
	})
	b.Run("process-wait", func(b *testing.B) {
		for b.Loop() {
			b.StopTimer()
			c := startSleeper(b)
			done := make(chan struct{})
			go func() { _ = c.Wait(); close(done) }()
			time.Sleep(2 * time.Millisecond) // the waiter has entered waitid
			b.StartTimer()
			_ = c.Process.Signal(syscall.SIGKILL)
			<-done
		}
	})
}

// BenchmarkThreads reports the OS threads this process gains with 200
// sleepers watched by the reaper vs waited by one goroutine each
// (cmd.Wait), reaper first. Go keeps idle threads, so only the first
// iteration of each is measured and the reaper's must run before the
// waiters have grown the pool:
//
//	go test -run '^$' -bench Threads -benchtime 1x ./internal/reaper/
func BenchmarkThreads(b *testing.B) {
	const n = 200
	for _, mode := range []string{"reaper", "wait-goroutines"} {
		b.Run(mode, func(b *testing.B) {
			r := newReaper(b)
			measured := false
			for b.Loop() {
				if measured {
					continue
				}
				measured = true
				base := threads(b)
				var cmds []*exec.Cmd
				var done []chan struct{}
				var chans []<-chan Exit
				for range n {
					c := startSleeper(b)
					cmds = append(cmds, c)
					if mode == "reaper" {
						ch, err := r.Watch(c.Process.Pid, false)
						if err != nil {
							b.Fatal(err)
						}
						chans = append(chans, ch)
					} else {
						d := make(chan struct{})
						go func() { _ = c.Wait(); close(d) }()
						done = append(done, d)
					}
				}
				time.Sleep(200 * time.Millisecond) // let the runtime start what it would
				b.ReportMetric(float64(threads(b)-base), "extra-threads")
				for _, c := range cmds {
					_ = c.Process.Kill()
				}
				for _, ch := range chans {
					<-ch
				}
				for _, d := range done {
					<-d
				}
			}
		})
	}
}
