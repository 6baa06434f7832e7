package fdhandover

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// roleEnv makes the test binary play a part in a test instead of running
// the tests: "sender" execs itself as "receiver" (an in-place upgrade);
// "activated" is started by the fake systemd with LISTEN_FDS.
const roleEnv = "FDHANDOVER_TEST_ROLE"

func TestMain(m *testing.M) {
	switch os.Getenv(roleEnv) {
	case "sender":
		os.Exit(sender())
	case "receiver":
		os.Exit(receiver())
	case "activated":
		os.Exit(activated())
	}
	os.Exit(m.Run())
}

func fail(format string, a ...any) int {
	fmt.Printf("FAIL "+format+"\n", a...)
	return 1
}

// sender is the old hive: a listener, a worker's output pipe, a child
// process, and an fd that must not cross the exec.
func sender() int {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return fail("listen: %v", err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return fail("pipe: %v", err)
	}
	child := exec.Command("sleep", "300")
	child.Stdout = pw // the worker writes into the pipe
	if err := child.Start(); err != nil {
		return fail("child: %v", err)
	}
	pw.WriteString("written before the exec\n")
	pw.Close()
	secret, err := os.Open(os.DevNull) // close-on-exec, not in the set
	if err != nil {
		return fail("open: %v", err)
	}
	var set Set
	if err := set.Add("api", ln.(*net.TCPListener)); err != nil {
		return fail("add: %v", err)
	}
	if err := set.Add("w-abc.stdout", pr); err != nil {
		return fail("add: %v", err)
	}
	fmt.Printf("%s %d %d\n", ln.Addr(), os.Getpid(), child.Process.Pid)
	// Wait until the test has queued a connection on the listener.
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		return fail("stdin: %v", err)
	}
	env := slices.DeleteFunc(os.Environ(), func(kv string) bool { return strings.HasPrefix(kv, roleEnv+"=") })
	env = append(env, roleEnv+"=receiver",
		"FDHANDOVER_TEST_CHILD="+strconv.Itoa(child.Process.Pid),
		"FDHANDOVER_TEST_SECRET="+strconv.Itoa(int(secret.Fd())),
		EnvFDs+"=stale=7") // a leftover from an earlier exec: replaced
	exe, _ := os.Executable()
	err = Exec(exe, os.Args, env, &set)
	return fail("exec: %v", err)
}

// receiver is the new binary in the same pid.
func receiver() int {
	r, err := Receive()
	if err != nil {
		return fail("receive: %v", err)
	}
	if os.Getenv(EnvFDs) != "" || os.Getenv(EnvPID) != "" {
		return fail("handover variables left in the environment")
	}
	if got := r.Names(); strings.Join(got, ",") != "api,w-abc.stdout" {
		return fail("names %v", got)
	}
	secret, _ := strconv.Atoi(os.Getenv("FDHANDOVER_TEST_SECRET"))
	if _, err := unix.FcntlInt(uintptr(secret), unix.F_GETFD, 0); !errors.Is(err, unix.EBADF) {
		return fail("fd %d not in the set crossed the exec (%v)", secret, err)
	}
	out := r.Take("w-abc.stdout")
	if flags, err := unix.FcntlInt(out.Fd(), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		return fail("received fd not close-on-exec again: %d %v", flags, err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "written before the exec\n" {
		return fail("pipe: %q %v", line, err)
	}
	// The worker is still our child: we can reap it.
	child, _ := strconv.Atoi(os.Getenv("FDHANDOVER_TEST_CHILD"))
	var ws unix.WaitStatus
	if pid, err := unix.Wait4(child, &ws, unix.WNOHANG, nil); pid != 0 || err != nil {
		return fail("child %d after exec: wait4 = %d, %v (want still running, ours)", child, pid, err)
	}
	unix.Kill(child, unix.SIGKILL)
	if pid, err := unix.Wait4(child, &ws, 0, nil); pid != child || err != nil {
		return fail("child %d not reaped by the new binary: %d %v", child, pid, err)
	}
	ln, err := r.Listener("api")
	if err != nil {
		return fail("listener: %v", err)
	}
	fmt.Printf("ready %d\n", os.Getpid())
	for {
		c, err := ln.Accept()
		if err != nil {
			return fail("accept: %v", err)
		}
		msg, _ := bufio.NewReader(c).ReadString('\n')
		fmt.Fprintf(c, "pong %d %s", os.Getpid(), msg)
		c.Close()
		if msg == "stop\n" {
			return 0
		}
	}
}

func ask(addr, msg string) (string, error) {
	c, err := net.Dial("tcp", addr)
	if err != nil {
		return "", err
	}
	defer c.Close()
	if _, err := io.WriteString(c, msg+"\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// TestExecKeepsListenerPipeAndChildren re-execs a real binary in the same
// pid: a connection queued before the exec is answered after it, none made
// during or after the exec is refused, the worker's pipe keeps its data,
// the worker stays a child, and nothing outside the set crosses.
func TestExecKeepsListenerPipeAndChildren(t *testing.T) {
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), roleEnv+"=sender")
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	out := bufio.NewReader(stdout)
	first, err := out.ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	var addr string
	var pid, child int
	if _, err := fmt.Sscan(first, &addr, &pid, &child); err != nil || pid != cmd.Process.Pid {
		t.Fatalf("sender said %q (%v)", first, err)
	}
	// Queued in the listen backlog before the exec; answered after it.
	early, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(early, "early\n")
	// Clients keep connecting while the binary is replaced.
	var wg sync.WaitGroup
	var mu sync.Mutex
	var refused []error
	done := make(chan struct{})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for i := 0; ; i++ {
			select {
			case <-done:
				return
			default:
			}
			reply, err := ask(addr, "during"+strconv.Itoa(i))
			if err != nil || !strings.HasPrefix(reply, "pong ") {
				mu.Lock()
				refused = append(refused, fmt.Errorf("%q %v", reply, err))
				mu.Unlock()
			}
		}
	}()
	io.WriteString(stdin, "go\n")
	ready, err := out.ReadString('\n')
	if err != nil || ready != fmt.Sprintf("ready %d\n", pid) {
		close(done)
		cmd.Process.Kill()
		rest, _ := io.ReadAll(out)
		t.Fatalf("receiver: %q %v %s", ready, err, rest)
	}
	b, err := io.ReadAll(early)
	if err != nil || string(b) != fmt.Sprintf("pong %d early\n", pid) {
		t.Errorf("connection queued before the exec: %q %v", b, err)
	}
	close(done)
	wg.Wait()
	if len(refused) > 0 {
		t.Errorf("%d connections failed across the exec, first: %v", len(refused), refused[0])
	}
	if reply, err := ask(addr, "stop"); err != nil || reply != fmt.Sprintf("pong %d stop\n", pid) {
		t.Errorf("after the exec: %q %v", reply, err)
	}
	if err := cmd.Wait(); err != nil {
		rest, _ := io.ReadAll(out)
		t.Fatalf("receiver exited: %v %s", err, rest)
	}
}

// TestExecFailureRestoresCloseOnExec: a failed exec leaves the process as
// it was, so a later fork does not leak the listener into a worker.
func TestExecFailureRestoresCloseOnExec(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	var set Set
	if err := set.Add("api", ln.(*net.TCPListener)); err != nil {
		t.Fatal(err)
	}
	err = Exec(filepath.Join(t.TempDir(), "missing"), []string{"x"}, os.Environ(), &set)
	if !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("Exec: %v, want ENOENT", err)
	}
	fd, _ := rawFD(ln.(*net.TCPListener))
	if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC == 0 {
		t.Errorf("fd %d flags %d %v: close-on-exec not restored", fd, flags, err)
	}
}

func TestSetRejectsBadNames(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var set Set
	for _, name := range []string{"", "a:b", "a,b", "a=b", "has space", "nl\n", strings.Repeat("x", 256)} {
		if err := set.Add(name, f); !errors.Is(err, ErrName) {
			t.Errorf("Add(%q): %v, want ErrName", name, err)
		}
	}
	if err := set.Add("ok", f); err != nil {
		t.Fatal(err)
	}
	if err := set.Add("ok", f); !errors.Is(err, ErrName) {
		t.Errorf("duplicate name: %v", err)
	}
	if err := Store("/nonexistent", "a:b", true, f); !errors.Is(err, ErrName) {
		t.Errorf("Store with a bad name: %v", err)
	}
}

func TestReceiveEnv(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	dup, err := unix.Dup(int(f.Fd()))
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name     string
		fds, pid string
		names    string
		errs     []string
	}{
		{"another pid's variables are ignored", fmt.Sprintf("null=%d", dup), "1", "", nil},
		{"bad items are errors, good ones kept", fmt.Sprintf("bad:name=5,nofd=x,low=1,closed=999,null=%d", dup), strconv.Itoa(os.Getpid()),
			"null", []string{`bad item "bad:name=5"`, `bad item "nofd=x"`, `bad item "low=1"`, "closed (fd 999)"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv(EnvFDs, tc.fds)
			t.Setenv(EnvPID, tc.pid)
			t.Setenv("LISTEN_PID", "")
			r, err := Receive()
			for _, want := range tc.errs {
				if err == nil || !strings.Contains(err.Error(), want) {
					t.Errorf("error %v, want it to name %s", err, want)
				}
			}
			if len(tc.errs) == 0 && err != nil {
				t.Errorf("error %v", err)
			}
			if got := strings.Join(r.Names(), ","); got != tc.names {
				t.Errorf("names %q, want %q", got, tc.names)
			}
			if _, ok := os.LookupEnv(EnvFDs); ok {
				t.Error("EnvFDs left set")
			}
			if tc.names != "" {
				if closed := r.CloseRest(); len(closed) != 1 || len(r.Names()) != 0 {
					t.Errorf("CloseRest %v", closed)
				}
			}
		})
	}
}
