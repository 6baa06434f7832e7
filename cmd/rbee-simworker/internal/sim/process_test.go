package sim

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The process tests build the real binary once and run it against a real
// notify socket, as the hive would.

var buildOnce struct {
	sync.Once
	path string
	err  error
}

func simBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "rbee-simworker-test")
		if err != nil {
			buildOnce.err = err
			return
		}
		buildOnce.path = filepath.Join(dir, "rbee-simworker")
		out, err := exec.Command("go", "build", "-o", buildOnce.path, "github.com/rbee/rbee-hive/cmd/rbee-simworker").CombinedOutput()
		if err != nil {
			buildOnce.err = fmt.Errorf("go build: %w: %s", err, out)
		}
	})
	if buildOnce.err != nil {
		t.Fatal(buildOnce.err)
	}
	return buildOnce.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildOnce.path != "" {
		os.RemoveAll(filepath.Dir(buildOnce.path))
	}
	os.Exit(code)
}

type syncWriter struct {
	mu sync.Mutex
	w  io.Writer
}

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.w.Write(p)
}

type dgram struct {
	text string
	pid  int32
}

// proc is a running simworker with its notify socket.
type proc struct {
	cmd   *exec.Cmd
	msgs  chan dgram
	addr  chan string
	done  chan struct{}
	code  int
	state *os.ProcessState
}

func startSim(t *testing.T, watchdog time.Duration, args ...string) *proc {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := conn.SyscallConn()
	raw.Control(func(fd uintptr) { unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1) })
	p := &proc{msgs: make(chan dgram, 1024), addr: make(chan string, 1), done: make(chan struct{})}
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, unix.CmsgSpace(unix.SizeofUcred))
		for {
			n, oobn, _, _, err := conn.ReadMsgUnix(buf, oob)
			if err != nil {
				close(p.msgs)
				return
			}
			var pid int32
			if cm, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil && len(cm) == 1 {
				if c, err := unix.ParseUnixCredentials(&cm[0]); err == nil {
					pid = c.Pid
				}
			}
			p.msgs <- dgram{string(buf[:n]), pid}
		}
	}()
	p.cmd = exec.Command(simBinary(t), args...)
	env := []string{"NOTIFY_SOCKET=" + sock, "RBEE_WORKER_ID=w-test", "PATH=" + os.Getenv("PATH")}
	if watchdog > 0 {
		env = append(env, "WATCHDOG_USEC="+strconv.FormatInt(watchdog.Microseconds(), 10))
	}
	p.cmd.Env = env
	stderr, err := p.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	re := regexp.MustCompile(`msg=listening .*addr=(\S+)`)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			if m := re.FindStringSubmatch(sc.Text()); m != nil {
				p.addr <- m[1]
			}
			t.Logf("sim: %s", sc.Text())
		}
	}()
	go func() {
		p.cmd.Wait()
		p.state = p.cmd.ProcessState
		p.code = p.state.ExitCode()
		close(p.done)
	}()
	t.Cleanup(func() {
		p.cmd.Process.Kill()
		<-p.done
		conn.Close()
	})
	return p
}

// expect waits for a datagram starting with prefix, skipping others, and
// checks it came from the worker's own pid.
func (p *proc) expect(t *testing.T, prefix string, within time.Duration) dgram {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case d := <-p.msgs:
			if strings.HasPrefix(d.text, prefix) {
				if d.pid != int32(p.cmd.Process.Pid) {
					t.Fatalf("%q from pid %d, want %d", d.text, d.pid, p.cmd.Process.Pid)
				}
				return d
			}
		case <-deadline:
			t.Fatalf("no %q within %v", prefix, within)
		}
	}
}

// quiet asserts no datagram starting with prefix arrives within d.
func (p *proc) quiet(t *testing.T, prefix string, d time.Duration) {
	t.Helper()
	deadline := time.After(d)
	for {
		select {
		case m := <-p.msgs:
			if strings.HasPrefix(m.text, prefix) {
				t.Fatalf("unexpected %q", m.text)
			}
		case <-deadline:
			return
		}
	}
}

func (p *proc) drain(d time.Duration) {
	deadline := time.After(d)
	for {
		select {
		case <-p.msgs:
		case <-deadline:
			return
		}
	}
}

func (p *proc) wait(t *testing.T, within time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
		return p.code
	case <-time.After(within):
		t.Fatalf("still running after %v", within)
		return -1
	}
}

func (p *proc) url(t *testing.T) string {
	t.Helper()
	select {
	case a := <-p.addr:
		return "http://" + a
	case <-time.After(5 * time.Second):
		t.Fatal("no listening line")
		return ""
	}
}

func vmRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.Fields(rest)[0], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return kb << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func httpGet(url string, timeout time.Duration) (int, error) {
	c := http.Client{Timeout: timeout}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

func TestProcessLifecycle(t *testing.T) {
	p := startSim(t, 200*time.Millisecond, "--port", "0", "--load-time", "300ms")
	base := p.url(t)
	if code, err := httpGet(base+"/health", time.Second); err != nil || code != 503 {
		t.Fatalf("health while loading: %d %v", code, err)
	}
	p.expect(t, "STATUS=loading", 2*time.Second)
	p.expect(t, "READY=1", 2*time.Second)
	if code, err := httpGet(base+"/health", time.Second); err != nil || code != 200 {
		t.Fatalf("health after READY: %d %v", code, err)
	}
	start := time.Now()
	for range 3 {
		d := p.expect(t, "WATCHDOG=1\n", time.Second)
		if !strings.Contains(d.text, "\nRBEE_HEALTH=healthy") || !strings.Contains(d.text, "\nRBEE_RSS_BYTES=") {
			t.Fatalf("heartbeat %q", d.text)
		}
	}
	if el := time.Since(start); el < 150*time.Millisecond {
		t.Fatalf("3 heartbeats in %v: faster than WATCHDOG_USEC/2", el)
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	p.expect(t, "STOPPING=1", 2*time.Second)
	if code := p.wait(t, 5*time.Second); code != ExitOK {
		t.Fatalf("exit %d after SIGTERM, want 0", code)
	}
}

func TestProcessFaults(t *testing.T) {
	tests := []struct {
		name string
		args []string
		run  func(t *testing.T, p *proc)
	}{
		{"crash-after exits 1 without STOPPING", []string{"--crash-after", "400ms"}, func(t *testing.T, p *proc) {
			p.expect(t, "READY=1", 2*time.Second)
			if code := p.wait(t, 5*time.Second); code != ExitCrash {
				t.Fatalf("exit %d, want %d", code, ExitCrash)
			}
			p.quiet(t, "STOPPING=1", 100*time.Millisecond)
		}},
		{"crash during load never READY", []string{"--crash-after", "100ms", "--load-time", "1s"}, func(t *testing.T, p *proc) {
			if code := p.wait(t, 5*time.Second); code != ExitCrash {
				t.Fatalf("exit %d", code)
			}
			p.quiet(t, "READY=1", 100*time.Millisecond)
		}},
		{"ignore-sigterm survives SIGTERM", []string{"--ignore-sigterm"}, func(t *testing.T, p *proc) {
			p.expect(t, "READY=1", 2*time.Second)
			p.cmd.Process.Signal(syscall.SIGTERM)
			select {
			case <-p.done:
				t.Fatalf("exited (%d) after SIGTERM", p.code)
			case <-time.After(500 * time.Millisecond):
			}
			p.expect(t, "WATCHDOG=1", time.Second) // still alive and beating
			p.cmd.Process.Signal(syscall.SIGINT)
			if code := p.wait(t, 5*time.Second); code != ExitOK {
				t.Fatalf("exit %d after SIGINT", code)
			}
		}},
		{"no-heartbeat serves but never pings", []string{"--no-heartbeat", "--port", "0"}, func(t *testing.T, p *proc) {
			base := p.url(t)
			p.expect(t, "READY=1", 2*time.Second)
			p.quiet(t, "WATCHDOG=", 700*time.Millisecond) // > 3 intervals
			if code, err := httpGet(base+"/health", time.Second); err != nil || code != 200 {
				t.Fatalf("health %d %v", code, err)
			}
		}},
		{"hang-after stops HTTP and heartbeats", []string{"--hang-after", "500ms", "--port", "0"}, func(t *testing.T, p *proc) {
			base := p.url(t)
			p.expect(t, "READY=1", 2*time.Second)
			p.expect(t, "WATCHDOG=1", time.Second)
			if code, err := httpGet(base+"/health", time.Second); err != nil || code != 200 {
				t.Fatalf("health before hang %d %v", code, err)
			}
			time.Sleep(600 * time.Millisecond)
			p.drain(150 * time.Millisecond) // beats sent before the hang
			p.quiet(t, "WATCHDOG=", 600*time.Millisecond)
			if _, err := httpGet(base+"/health", 500*time.Millisecond); err == nil || !isTimeout(err) {
				t.Fatalf("health after hang: want timeout, got %v", err)
			}
			select {
			case <-p.done:
				t.Fatal("a wedged worker must stay alive")
			default:
			}
			p.cmd.Process.Signal(syscall.SIGTERM)
			start := time.Now()
			if code := p.wait(t, 5*time.Second); code != ExitOK || time.Since(start) > 2*time.Second {
				t.Fatalf("SIGTERM while wedged: exit %d after %v", code, time.Since(start))
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.run(t, startSim(t, 200*time.Millisecond, tt.args...))
		})
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestProcessMemory(t *testing.T) {
	t.Run("alloc-mib raises RSS", func(t *testing.T) {
		base := startSim(t, 0)
		base.expect(t, "READY=1", 2*time.Second)
		baseline := vmRSS(t, base.cmd.Process.Pid)
		p := startSim(t, 0, "--alloc-mib", "96")
		p.expect(t, "READY=1", 5*time.Second)
		rss := vmRSS(t, p.cmd.Process.Pid)
		if rss-baseline < 90<<20 {
			t.Fatalf("RSS %d MiB vs baseline %d MiB: want +96 MiB", rss>>20, baseline>>20)
		}
	})
	t.Run("leak-mib-per-sec grows RSS", func(t *testing.T) {
		p := startSim(t, 0, "--leak-mib-per-sec", "64")
		p.expect(t, "READY=1", 2*time.Second)
		r0 := vmRSS(t, p.cmd.Process.Pid)
		time.Sleep(time.Second)
		r1 := vmRSS(t, p.cmd.Process.Pid)
		if grown := r1 - r0; grown < 40<<20 || grown > 100<<20 {
			t.Fatalf("grew %d MiB in 1s at 64 MiB/s", grown>>20)
		}
	})
}

func TestProcessUsageError(t *testing.T) {
	tests := [][]string{{"--port", "x"}, {"--bogus"}, {"--alloc-mib", "-5"}}
	for _, args := range tests {
		t.Run(strings.Join(args, " "), func(t *testing.T) {
			p := startSim(t, 0, args...)
			if code := p.wait(t, 5*time.Second); code != ExitUsage {
				t.Fatalf("exit %d, want %d", code, ExitUsage)
			}
		})
	}
}
