// Command notifyload measures the hive's notify receiver (supervisor/notify)
// under worker-like load, in one run with its own baselines:
//
//  1. ingest: one sender process sending flat out; datagrams/s through the
//     receiver and receiver CPU per datagram (getrusage of this process; the
//     sender is a separate process);
//  2. paced: S senders × R Hz (default 100 × 10 = 1 kHz) for a fixed window;
//     receiver CPU as % of one core against an idle window measured just
//     before, for Listener.Serve and for the naive ReadMsgUnix loop;
//  3. projection to the real heartbeat rate (100 workers every 30 s).
//
// Usage: go run ./bench/notifyload [-senders 100] [-hz 10] [-window 10s]
package main

import (
	"context"
	"flag"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/rbee/rbee-hive/supervisor/notify"
)

var payload = []byte("WATCHDOG=1\nRBEE_HEALTH=healthy\nRBEE_BUSY=0\nRBEE_TOKENS_OUT_TOTAL=123456\nRBEE_RSS_BYTES=104857600")

func main() {
	senders := flag.Int("senders", 100, "paced senders")
	hz := flag.Float64("hz", 10, "datagrams per second per paced sender")
	window := flag.Duration("window", 10*time.Second, "measurement window")
	flood := flag.Int("flood", 300000, "datagrams in the ingest run")
	realPeriod := flag.Duration("real-period", 30*time.Second, "real heartbeat period for the projection")
	role := flag.String("role", "", "internal: sender role")
	sock := flag.String("sock", "", "internal: socket path")
	flag.Parse()
	var err error
	switch *role {
	case "flood":
		err = sendFlood(*sock, *flood)
	case "paced":
		err = sendPaced(*sock, *senders, *hz)
	default:
		err = run(*senders, *hz, *window, *flood, *realPeriod)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "notifyload:", err)
		os.Exit(1)
	}
}

func cpuNow() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func self(args ...string) *exec.Cmd {
	exe, _ := os.Executable()
	c := exec.Command(exe, args...)
	c.Stderr = os.Stderr
	return c
}

// receiver is one of the two implementations under test.
type receiver func(ctx context.Context, path string, got *atomic.Uint64) (stop func(), err error)

func ours(ctx context.Context, path string, got *atomic.Uint64) (func(), error) {
	l, err := notify.Listen(path)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() { defer close(done); l.Serve(ctx, func(notify.Message) { got.Add(1) }) }()
	return func() { cancel(); <-done; l.Close() }, nil
}

// naive: the obvious loop, as a baseline.
func naive(ctx context.Context, path string, got *atomic.Uint64) (func(), error) {
	os.Remove(path)
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		return nil, err
	}
	raw, _ := conn.SyscallConn()
	raw.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, notify.MaxDatagram)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				return
			}
			cms, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil || len(cms) == 0 {
				continue
			}
			if c, err := unix.ParseUnixCredentials(&cms[0]); err != nil || c.Pid == 0 {
				continue
			}
			if _, err := notify.Parse(buf[:n]); err == nil {
				got.Add(1)
			}
		}
	}()
	return func() { conn.Close(); <-done; os.Remove(path) }, nil
}

func run(senders int, hz float64, window time.Duration, flood int, realPeriod time.Duration) error {
	dir, err := os.MkdirTemp("", "notifyload")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ctx := context.Background()
	impls := []struct {
		name string
		recv receiver
	}{{"Listener.Serve", ours}, {"naive ReadMsgUnix", naive}}

	fmt.Printf("# notifyload: GOMAXPROCS=%s, %d CPUs\n", os.Getenv("GOMAXPROCS"), numCPU())
	fmt.Printf("\n## ingest: one sender process, %d datagrams flat out (3 rounds, alternating)\n", flood)
	for round := 0; round < 3; round++ {
		for _, im := range impls {
			path := filepath.Join(dir, "ingest.sock")
			var got atomic.Uint64
			stop, err := im.recv(ctx, path, &got)
			if err != nil {
				return err
			}
			c0, t0 := cpuNow(), time.Now()
			if err := self("-role", "flood", "-sock", path, "-flood", strconv.Itoa(flood)).Run(); err != nil {
				return fmt.Errorf("flood sender: %w", err)
			}
			for got.Load() < uint64(flood) {
				time.Sleep(100 * time.Microsecond)
			}
			el, cpu := time.Since(t0), cpuNow()-c0
			stop()
			fmt.Printf("%-18s %9.0f datagrams/s wall, receiver %5.2f µs CPU each → %9.0f datagrams/s per receiver core\n",
				im.name, float64(flood)/el.Seconds(), float64(cpu.Nanoseconds())/1e3/float64(flood), float64(flood)/cpu.Seconds())
		}
	}

	// The requested rate, then a sparse one: at the real 30 s period every
	// datagram is its own wake-up, so the sparse per-datagram cost is the
	// better basis for the projection.
	for _, hz := range []float64{hz, 1} {
		rate := float64(senders) * hz
		fmt.Printf("\n## paced: %d senders × %g Hz = %.0f datagrams/s, window %v\n", senders, hz, rate, window)
		for _, im := range impls {
			path := filepath.Join(dir, "paced.sock")
			var got atomic.Uint64
			stop, err := im.recv(ctx, path, &got)
			if err != nil {
				return err
			}
			// Idle baseline: same process, receiver blocked, no senders.
			c0 := cpuNow()
			time.Sleep(window)
			idle := cpuNow() - c0
			sender := self("-role", "paced", "-sock", path, "-senders", strconv.Itoa(senders), "-hz", fmt.Sprint(hz))
			if err := sender.Start(); err != nil {
				return err
			}
			time.Sleep(time.Second) // let all senders reach their pace
			n0, c1, t1 := got.Load(), cpuNow(), time.Now()
			time.Sleep(window)
			n, busy, el := got.Load()-n0, cpuNow()-c1, time.Since(t1)
			sender.Process.Kill()
			sender.Wait()
			stop()
			net := busy - time.Duration(float64(idle)*el.Seconds()/window.Seconds())
			perDgram := float64(net.Nanoseconds()) / 1e3 / float64(n)
			fmt.Printf("%-18s %6.0f datagrams/s received; CPU %5.2f %% of a core (idle baseline %4.2f %%), net %5.2f %% → %5.1f µs per datagram\n",
				im.name, float64(n)/el.Seconds(), 100*busy.Seconds()/el.Seconds(), 100*idle.Seconds()/window.Seconds(),
				100*net.Seconds()/el.Seconds(), perDgram)
			realRate := float64(senders) / realPeriod.Seconds()
			fmt.Printf("%-18s projection: %d workers every %v = %.2f datagrams/s → %.4f %% of a core (%.1f µs CPU per second)\n",
				"", senders, realPeriod, realRate, realRate*perDgram/1e4, realRate*perDgram)
		}
	}
	return nil
}

func numCPU() int {
	var s unix.CPUSet
	if unix.SchedGetaffinity(0, &s) != nil {
		return 0
	}
	return s.Count()
}

func dial(path string) (*net.UnixConn, error) {
	return net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"})
}

func sendFlood(path string, n int) error {
	c, err := dial(path)
	if err != nil {
		return err
	}
	defer c.Close()
	for range n {
		if _, err := c.Write(payload); err != nil { // blocking: waits for room
			return err
		}
	}
	return nil
}

// sendPaced: senders goroutines, each its own socket (like separate
// workers; one process keeps the host quiet), random phase, fixed rate.
func sendPaced(path string, senders int, hz float64) error {
	var wg sync.WaitGroup
	errs := make(chan error, senders)
	period := time.Duration(float64(time.Second) / hz)
	for range senders {
		c, err := dial(path)
		if err != nil {
			return err
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer c.Close()
			time.Sleep(rand.N(period))
			t := time.NewTicker(period)
			defer t.Stop()
			for range t.C {
				if _, err := c.Write(payload); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	return <-errs
}
