package supervisor

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/config"
)

// senderEnv makes the test binary a datagram sender (runSender), so the
// benchmark's datagrams come from another process, whose CPU is not the
// receiver's.
const senderEnv = "RBEE_SUP_BENCH_SENDER"

// benchHeartbeat is what a loaded simworker sends each interval.
const benchHeartbeat = "WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_BUSY=0\nRBEE_TOKENS_OUT_TOTAL=123456\nRBEE_VRAM_BYTES=104857600"

// runSender reads "<socket path> <count> <payload as a Go quoted string>"
// lines from stdin, sends count datagrams to the path (blocking when the
// receiver's queue is full) and answers "sent" on stdout.
func runSender() int {
	conns := map[string]*net.UnixConn{}
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		f := strings.SplitN(in.Text(), " ", 3)
		n, _ := strconv.Atoi(f[1])
		payload, err := strconv.Unquote(f[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "sender:", err)
			return 1
		}
		c := conns[f[0]]
		if c == nil {
			if c, err = net.DialUnix("unixgram", nil, &net.UnixAddr{Name: f[0], Net: "unixgram"}); err != nil {
				fmt.Fprintln(os.Stderr, "sender:", err)
				return 1
			}
			conns[f[0]] = c
		}
		for range n {
			if _, err := c.Write([]byte(payload)); err != nil {
				fmt.Fprintln(os.Stderr, "sender:", err)
				return 1
			}
		}
		fmt.Println("sent")
	}
	return 0
}

type sender struct {
	cmd *exec.Cmd
	in  io.WriteCloser
	out *bufio.Scanner
}

func startSender(b *testing.B) *sender {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), senderEnv+"=1")
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { in.Close(); cmd.Wait() })
	return &sender{cmd: cmd, in: in, out: bufio.NewScanner(out)}
}

// send has n copies of payload sent to path and returns once they are
// written (not yet necessarily received).
func (s *sender) send(b *testing.B, path string, n int, payload string) {
	if _, err := fmt.Fprintf(s.in, "%s %d %s\n", path, n, strconv.Quote(payload)); err != nil {
		b.Fatal(err)
	}
	if !s.out.Scan() || s.out.Text() != "sent" {
		b.Fatalf("sender: %q %v", s.out.Text(), s.out.Err())
	}
}

// rawReceiver is the baseline: the plainest Go unixgram receiver that knows
// its sender, a SO_PASSCRED socket read with ReadMsgUnix, the credentials
// parsed, the datagram counted.
func rawReceiver(b *testing.B, path string, got *atomic.Uint64) {
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		b.Fatal(err)
	}
	raw, err := c.SyscallConn()
	if err != nil {
		b.Fatal(err)
	}
	raw.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	b.Cleanup(func() { c.Close() })
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			_, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			cms, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil || len(cms) == 0 {
				continue
			}
			if cred, err := unix.ParseUnixCredentials(&cms[0]); err == nil && cred.Pid > 0 {
				got.Add(1)
			}
		}
	}()
}

// BenchmarkHeartbeatIntake: heartbeats sent by another process through a
// real socket into notify.Listener.Serve and the supervisor's intake: the
// sender is entered as a ready worker's main pid, so each datagram is
// attributed, its fields applied and the worker's stale deadline re-armed.
// allocs/op is the hive's path alone. In the same run, alternating rounds
// of the same count go to rawReceiver; raw-cpu-ns/dgram and
// hive-cpu-ns/dgram are this process's CPU (getrusage) per datagram, each
// round ending with a GC so that each side pays for its own garbage, and
// hive/raw is their ratio.
func BenchmarkHeartbeatIntake(b *testing.B) {
	h := newHarness(b, func(c *config.Config) {
		c.Resources.SampleInterval = config.Duration(time.Hour)
		c.Backends["sleeper"] = config.Backend{Command: []string{"/bin/sleep", "3600"}, Health: "notify",
			LoadTimeout: config.Duration(time.Hour), MemoryLimit: 64 << 20}
	})
	res := h.spawn(map[string]any{"backend": "sleeper"})
	snd := startSender(b)
	h.s.mu.Lock()
	h.s.mainPID[snd.cmd.Process.Pid] = h.s.workers[res.WorkerID]
	h.s.mu.Unlock()
	hivePath := h.cfg.Heartbeat.NotifySocket
	snd.send(b, hivePath, 1, "READY=1")
	h.waitState(res.WorkerID, StateIdle, 10*time.Second)

	rawPath := filepath.Join(filepath.Dir(hivePath), "raw.sock")
	var rawGot atomic.Uint64
	rawReceiver(b, rawPath, &rawGot)
	hiveGot := func() uint64 { return uint64(testutil.ToFloat64(h.s.m.heartbeats)) }
	waitFor := func(got func() uint64, want uint64) {
		for got() < want {
			time.Sleep(200 * time.Microsecond)
		}
	}
	// Warm both paths (first-use allocations: the figures map, buffers).
	snd.send(b, hivePath, 100, benchHeartbeat)
	snd.send(b, rawPath, 100, benchHeartbeat)
	waitFor(hiveGot, 100)
	waitFor(rawGot.Load, 100)

	const rounds = 8
	var rawCPU, hiveCPU time.Duration
	var rawN, hiveN int
	b.ResetTimer()
	for r := range rounds {
		n := b.N / rounds
		if r == rounds-1 {
			n = b.N - (rounds-1)*(b.N/rounds)
		}
		if n == 0 {
			continue
		}
		b.StopTimer()
		want := rawGot.Load() + uint64(n)
		c0 := cpuTime(b)
		snd.send(b, rawPath, n, benchHeartbeat)
		waitFor(rawGot.Load, want)
		runtime.GC() // each side pays for its own garbage
		rawCPU += cpuTime(b) - c0
		rawN += n
		b.StartTimer()
		want = hiveGot() + uint64(n)
		c0 = cpuTime(b)
		snd.send(b, hivePath, n, benchHeartbeat)
		waitFor(hiveGot, want)
		runtime.GC()
		hiveCPU += cpuTime(b) - c0
		hiveN += n
	}
	b.StopTimer()
	if st := h.get(res.WorkerID); st.State != StateIdle || st.Health != "healthy" || st.Figures["RBEE_BUSY"] != "0" {
		b.Fatalf("worker after the run: %+v", st)
	}
	rawPer := float64(rawCPU.Nanoseconds()) / float64(rawN)
	hivePer := float64(hiveCPU.Nanoseconds()) / float64(hiveN)
	b.ReportMetric(rawPer, "raw-cpu-ns/dgram")
	b.ReportMetric(hivePer, "hive-cpu-ns/dgram")
	b.ReportMetric(hivePer/rawPer, "hive/raw")
}
