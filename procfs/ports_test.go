package procfs

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

const portsHelperEnv = "RBEE_PROCFS_TEST_HELPER"

func TestMain(m *testing.M) {
	if os.Getenv(portsHelperEnv) == "listen" {
		os.Exit(runListener())
	}
	os.Exit(m.Run())
}

// runListener listens on RBEE_TEST_NET/RBEE_TEST_ADDR, opens RBEE_TEST_FDS
// extra descriptors, prints the port and waits for stdin to close.
func runListener() int {
	ln, err := net.Listen(os.Getenv("RBEE_TEST_NET"), os.Getenv("RBEE_TEST_ADDR"))
	if err != nil {
		fmt.Println("ERR", err)
		return 2
	}
	defer ln.Close()
	n, _ := strconv.Atoi(os.Getenv("RBEE_TEST_FDS"))
	for i := 0; i < n; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			fmt.Println("ERR", err)
			return 2
		}
		defer f.Close()
	}
	fmt.Println(ln.Addr().(*net.TCPAddr).Port)
	_, _ = bufio.NewReader(os.Stdin).ReadString('\n')
	return 0
}

// startListener runs a child process listening on network/addr; it returns
// the child and its port, and stops the child when the test ends.
func startListener(t testing.TB, network, addr string, extraFDs int) (*exec.Cmd, int) {
	return startListenerAs(t, network, addr, extraFDs, nil)
}

// startListenerAs is startListener with the child running as cred (nil:
// this process's identity).
func startListenerAs(t testing.TB, network, addr string, extraFDs int, cred *syscall.Credential) (*exec.Cmd, int) {
	t.Helper()
	c := exec.Command("/proc/self/exe")
	if cred != nil {
		c.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	}
	c.Env = append(os.Environ(), portsHelperEnv+"=listen", "RBEE_TEST_NET="+network, "RBEE_TEST_ADDR="+addr,
		"RBEE_TEST_FDS="+strconv.Itoa(extraFDs))
	stdin, err := c.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := c.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { stdin.Close(); _ = c.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("listener child: %v", err)
	}
	port, err := strconv.Atoi(strings.TrimSpace(line))
	if err != nil {
		t.Fatalf("listener child said %q", line)
	}
	return c, port
}

func hostReader(t testing.TB) *Reader {
	t.Helper()
	r, err := New("")
	if err != nil {
		t.Fatal(err)
	}
	return r
}

func listenHere(t *testing.T, network, addr string) net.Listener {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return ln
}

func TestPortOwnerReal(t *testing.T) {
	r := hostReader(t)
	for _, tc := range []struct {
		src                 string
		diag                bool
		network, addr, twin string
	}{
		{"sock_diag", true, "tcp4", "127.0.0.1:0", "[::1]"},
		{"sock_diag", true, "tcp6", "[::1]:0", "127.0.0.1"},
		{"proc-net", false, "tcp4", "127.0.0.1:0", "[::1]"},
		{"proc-net", false, "tcp6", "[::1]:0", "127.0.0.1"},
	} {
		fam := tc
		t.Run(tc.src+"/"+tc.network, func(t *testing.T) {
			child, port := startListener(t, fam.network, fam.addr, 0)
			// Another process of the test, with nothing on the port: the
			// set may hold pids that do not listen.
			bystander, _ := startListener(t, "tcp4", "127.0.0.1:0", 0)
			self := os.Getpid()

			// The worker's leaf holds the listener.
			got, err := r.portOwner(port, []int{bystander.Process.Pid, child.Process.Pid}, tc.diag)
			if err != nil || got != child.Process.Pid {
				t.Errorf("owner set: PortOwner = %d, %v; want %d", got, err, child.Process.Pid)
			}
			// The listener is outside the set: a squatter.
			_, err = r.portOwner(port, []int{self, bystander.Process.Pid}, tc.diag)
			var se *SquatterError
			if !errors.As(err, &se) || !errors.Is(err, ErrSquatter) || len(se.Foreign) != 1 || se.Foreign[0].IPv6 != (fam.network == "tcp6") {
				t.Errorf("squatter: PortOwner = %v, want a SquatterError with one %s socket", err, fam.network)
			}
			// A vanished pid in the set is no error.
			if _, err := r.portOwner(port, []int{1 << 30}, tc.diag); !errors.Is(err, ErrSquatter) {
				t.Errorf("vanished pid: %v, want ErrSquatter", err)
			}
			// A second listener on the same port in the other family, held
			// by a process outside the set, spoils ownership even though
			// the worker holds its own.
			twin := listenHere(t, "tcp", net.JoinHostPort(strings.Trim(fam.twin, "[]"), strconv.Itoa(port)))
			_, err = r.portOwner(port, []int{child.Process.Pid}, tc.diag)
			if !errors.As(err, &se) || len(se.Foreign) != 1 || se.Foreign[0].IPv6 == (fam.network == "tcp6") {
				t.Errorf("twin listener: PortOwner = %v, want a SquatterError naming the other family's socket", err)
			}
			ls, err := r.portListeners(port, []int{child.Process.Pid, self}, tc.diag)
			if err != nil || len(ls) != 2 || ls[0].PID == 0 || ls[1].PID == 0 || ls[0].UID != uint32(os.Getuid()) {
				t.Errorf("PortListeners = %+v, %v; want both sockets with their holders", ls, err)
			}
			twin.Close()
		})
	}
}

func TestPortOwnerNoListener(t *testing.T) {
	r := hostReader(t)
	// A client connection on a port is no listener: connect to a listener,
	// close it, and the port only has the (non-listening) client side left
	// or nothing at all.
	ln := listenHere(t, "tcp4", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	conn, err := net.Dial("tcp4", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	acc, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer acc.Close()
	ln.Close()
	if _, err := r.PortOwner(port, []int{os.Getpid()}); !errors.Is(err, ErrNoListener) {
		t.Errorf("PortOwner after close with an established connection left = %v, want ErrNoListener", err)
	}
	for _, bad := range []int{0, -1, 65536} {
		if _, err := r.PortOwner(bad, nil); err == nil || errors.Is(err, ErrNoListener) {
			t.Errorf("PortOwner(%d) = %v, want a range error", bad, err)
		}
	}
}

func TestParseListeners(t *testing.T) {
	const hdr = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
	tests := []struct {
		name    string
		body    string
		port    int
		want    []Listener
		wantErr bool
	}{
		{name: "listen v4", port: 8080, body: hdr +
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000   640123        0 4242 1 0000000000000000 100 0 0 10 0\n",
			want: []Listener{{Inode: 4242, UID: 640123}}},
		{name: "established on the port is skipped", port: 8080, body: hdr +
			"   0: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n"},
		{name: "other port", port: 8081, body: hdr +
			"   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 77 1 0000000000000000 100 0 0 10 0\n"},
		{name: "two listeners, any address", port: 80, body: hdr +
			"   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n" +
			"   1: 0200007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1 0 100 0 0 10 0\n",
			want: []Listener{{Inode: 1}, {Inode: 2, UID: 1000}}},
		{name: "short line ignored", port: 80, body: hdr + "garbage\n"},
		{name: "bad inode", port: 80, wantErr: true, body: hdr +
			"   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 x 1 0 100 0 0 10 0\n"},
		{name: "bad port", port: 80, wantErr: true, body: hdr +
			"   0: 00000000:ZZ50 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseListeners([]byte(tc.body), tc.port, false)
			if (err != nil) != tc.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tc.wantErr)
			}
			if fmt.Sprint(got) != fmt.Sprint(tc.want) {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

// BenchmarkPortOwner measures one ownership check of a worker whose leaf
// has two processes (the listener with 100 extra fds, and a bystander),
// with the listeners found by sock_diag and by reading net/tcp{,6}, and the
// uid-only check (PortHeldBy), against
// one TCP connect + close to the same port (what an http health probe
// costs at least), all in the same loop.
func BenchmarkPortOwner(b *testing.B) {
	r := hostReader(b)
	child, port := startListener(b, "tcp4", "127.0.0.1:0", 100)
	bystander, _ := startListener(b, "tcp4", "127.0.0.1:0", 0)
	pids := []int{bystander.Process.Pid, child.Process.Pid}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
	var diag, proc, byUID, dial time.Duration
	for i := 0; i < b.N; i++ {
		tu := time.Now()
		if err := r.PortHeldBy(port, uint32(os.Getuid())); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		byUID += t0.Sub(tu)
		if _, err := r.portOwner(port, pids, true); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := r.portOwner(port, pids, false); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		c, err := net.Dial("tcp4", addr)
		if err != nil {
			b.Fatal(err)
		}
		c.Close()
		t3 := time.Now()
		diag += t1.Sub(t0)
		proc += t2.Sub(t1)
		dial += t3.Sub(t2)
	}
	us := func(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1000 / float64(b.N) }
	b.ReportMetric(us(diag), "diag-us/op")
	b.ReportMetric(us(proc), "procnet-us/op")
	b.ReportMetric(us(byUID), "byuid-us/op")
	b.ReportMetric(us(dial), "dial-us/op")
	b.ReportMetric(float64(byUID)/float64(dial), "byuid/dial")
	b.ReportMetric(float64(diag)/float64(dial), "diag/dial")
	b.ReportMetric(float64(proc)/float64(dial), "procnet/dial")
}

// TestDiagMatchesProcNet: sock_diag (the fast path, which falls back
// silently) finds exactly the listeners net/tcp{,6} shows.
func TestDiagMatchesProcNet(t *testing.T) {
	r := hostReader(t)
	ln4 := listenHere(t, "tcp4", "127.0.0.1:0")
	port := ln4.Addr().(*net.TCPAddr).Port
	listenHere(t, "tcp6", net.JoinHostPort("::1", strconv.Itoa(port)))
	diag, err := diagListeners(port)
	if err != nil {
		t.Fatalf("sock_diag: %v", err)
	}
	proc, err := r.procListeners(port)
	if err != nil {
		t.Fatal(err)
	}
	if len(diag) != 2 || fmt.Sprint(diag) != fmt.Sprint(proc) {
		t.Errorf("sock_diag %+v, net/tcp %+v; want the same two listeners", diag, proc)
	}
}

// TestPortHeldBy: a listener created by the worker's uid passes, one of
// another uid (this root test process, or another worker's uid) is a
// squatter; IPv4 and IPv6.
func TestPortHeldBy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: starts a listener under another uid (CI runs as root)")
	}
	const workerUID, otherUID = 70123, 70124
	r := hostReader(t)
	for _, fam := range []struct{ network, addr, twin string }{
		{"tcp4", "127.0.0.1:0", "::1"},
		{"tcp6", "[::1]:0", "127.0.0.1"},
	} {
		t.Run(fam.network, func(t *testing.T) {
			_, port := startListenerAs(t, fam.network, fam.addr, 0, &syscall.Credential{Uid: workerUID, Gid: workerUID})
			if err := r.PortHeldBy(port, workerUID); err != nil {
				t.Errorf("worker's own listener: %v", err)
			}
			var se *SquatterError
			if err := r.PortHeldBy(port, otherUID); !errors.As(err, &se) || se.Foreign[0].UID != workerUID {
				t.Errorf("checked for another worker's uid: %v, want a SquatterError naming uid %d", err, workerUID)
			}
			twin := listenHere(t, "tcp", net.JoinHostPort(fam.twin, strconv.Itoa(port)))
			if err := r.PortHeldBy(port, workerUID); !errors.As(err, &se) || len(se.Foreign) != 1 || se.Foreign[0].UID != 0 {
				t.Errorf("root listener beside the worker's: %v, want a SquatterError naming uid 0", err)
			}
			twin.Close()
		})
	}
	ln := listenHere(t, "tcp4", "127.0.0.1:0")
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	if err := r.PortHeldBy(port, workerUID); !errors.Is(err, ErrNoListener) {
		t.Errorf("closed port: %v, want ErrNoListener", err)
	}
}
