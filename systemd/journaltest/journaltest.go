// Package journaltest runs a real systemd-journald for tests, isolated from
// the host's journal and from other test packages, and reads its entries back
// with journalctl.
//
// Isolation: Main re-executes the test binary in a private mount namespace
// with fresh tmpfs mounts on /run/systemd and /run/log (and on
// /var/log/journal when it exists). journald's sockets
// (/run/systemd/journal/socket, the path go-systemd's journal package always
// uses) and its files therefore exist only for this test process: several
// test packages can run at once, a test may kill or stop its journald, and
// the host's journal (if any) is neither read nor written. Each Start runs a
// new journald on an empty journal.
//
// Use it from the package's TestMain:
//
//	func TestMain(m *testing.M) { os.Exit(journaltest.Main(m)) }
//
// and in a test:
//
//	j := journaltest.Start(t)
//	... log ...
//	entries := j.WaitFor(t, 1, 5*time.Second, "RBEE_WORKER_ID=w-abc")
//
// It needs root (mount namespaces) and /lib/systemd/systemd-journald and
// journalctl (Debian package "systemd"); without them Start skips the test
// (fails it in CI: testkit.Skip)
// and says why.
package journaltest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// Paths of the Debian/Ubuntu "systemd" package.
const (
	JournaldPath   = "/lib/systemd/systemd-journald"
	JournalctlPath = "/usr/bin/journalctl"
	// Socket is where journald listens for native entries and where
	// go-systemd's journal.Send writes.
	Socket = "/run/systemd/journal/socket"
	// Dir holds the (volatile) journal files.
	Dir = "/run/log/journal"
)

// stateEnv carries Main's outcome to Start in the same process (and from the
// parent to the re-executed child): "child" before isolation, "ready" after,
// anything else is the reason Start skips.
const stateEnv = "RBEE_JOURNALTEST_STATE"

// config makes the test journald self-contained: volatile storage only, no
// kernel log import (that would pull the host's dmesg into every journal),
// no forwarding anywhere, and no rate limit (tests log bursts on purpose).
const config = `[Journal]
Storage=volatile
ReadKMsg=no
Audit=no
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
RateLimitIntervalSec=0
RuntimeMaxUse=32M
`

// Main runs m in a private mount namespace (see the package comment) and
// returns its exit code. Call it from TestMain. When isolation is impossible
// (not root, no journald, unshare refused) it runs m in this process and
// every Start skips with the reason.
func Main(m *testing.M) int {
	switch os.Getenv(stateEnv) {
	case "child":
		if err := isolate(); err != nil {
			os.Setenv(stateEnv, "cannot isolate journald: "+err.Error())
		} else {
			os.Setenv(stateEnv, "ready")
		}
		return m.Run()
	case "", "ready":
	default: // a reason from an outer run
		return m.Run()
	}
	if reason := unavailable(); reason != "" {
		os.Setenv(stateEnv, reason)
		return m.Run()
	}
	code, err := reexec()
	if err != nil {
		os.Setenv(stateEnv, "cannot start the test binary in a mount namespace: "+err.Error())
		return m.Run()
	}
	return code
}

// unavailable says why no journald can be run here, or "".
func unavailable() string {
	if os.Geteuid() != 0 {
		return "journald tests need root (mount namespace, journald)"
	}
	for _, p := range []string{JournaldPath, JournalctlPath} {
		if _, err := os.Stat(p); err != nil {
			return fmt.Sprintf("%s missing (apt-get install systemd)", p)
		}
	}
	return ""
}

// reexec runs this test binary again, with the same arguments, in a new
// mount namespace, and returns its exit code.
func reexec() (int, error) {
	// Pdeathsig belongs to the thread that forked: keep this one.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	cmd := exec.Command("/proc/self/exe", os.Args[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), stateEnv+"=child")
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Unshareflags: syscall.CLONE_NEWNS, // Go also makes / MS_PRIVATE, so nothing leaks out
		Pdeathsig:    syscall.SIGKILL,     // the go tool killing us must not orphan the child
	}
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
		return 0, nil
	case errors.As(err, &exit):
		if exit.ExitCode() < 0 {
			return 1, nil // killed by a signal; the child printed what it could
		}
		return exit.ExitCode(), nil
	default:
		return 0, fmt.Errorf("re-exec: %w", err)
	}
}

// isolate mounts the private tmpfs trees journald will use. It runs in the
// re-executed child, inside its own mount namespace.
func isolate() error {
	mounts := []string{"/run/systemd", "/run/log"}
	if fi, err := os.Stat("/var/log/journal"); err == nil && fi.IsDir() {
		mounts = append(mounts, "/var/log/journal") // never write the host's persistent journal
	}
	for _, dir := range mounts {
		if err := os.MkdirAll(dir, 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", dir, err)
		}
		if err := syscall.Mount("tmpfs", dir, "tmpfs", syscall.MS_NOSUID|syscall.MS_NODEV, "mode=0755,size=64m"); err != nil {
			return fmt.Errorf("mount tmpfs on %s: %w", dir, err)
		}
	}
	// A drop-in in /run wins over /etc/systemd/journald.conf; "zz-" sorts
	// it after any other drop-in.
	dropin := "/run/systemd/journald.conf.d/zz-journaltest.conf"
	if err := os.MkdirAll(filepath.Dir(dropin), 0o755); err != nil {
		return fmt.Errorf("mkdir: %w", err)
	}
	if err := os.WriteFile(dropin, []byte(config), 0o644); err != nil {
		return fmt.Errorf("write %s: %w", dropin, err)
	}
	return nil
}

// Journal is one running systemd-journald started by Start.
type Journal struct {
	mu     sync.Mutex
	cmd    *exec.Cmd
	waited chan struct{}
	stderr *bytes.Buffer
}

// Start runs a new journald on an empty journal and stops it when the test
// ends. Tests using it must not run in parallel with each other (there is one
// journald socket path per process).
func Start(t testing.TB) *Journal {
	t.Helper()
	switch state := os.Getenv(stateEnv); state {
	case "ready":
	case "":
		t.Fatal("journaltest: call journaltest.Main from the package's TestMain")
	default:
		testkit.Skip(t, "journaltest: %s", state)
	}
	for _, dir := range []string{"/run/systemd/journal", Dir} { // fresh journal per Start
		if err := os.RemoveAll(dir); err != nil {
			t.Fatalf("journaltest: %v", err)
		}
	}
	j := &Journal{}
	j.start(t)
	t.Cleanup(func() { j.stop() })
	return j
}

// start launches journald and waits for its READY=1 (it speaks sd_notify
// like any Type=notify service).
func (j *Journal) start(t testing.TB) {
	t.Helper()
	notifyPath := filepath.Join(t.TempDir(), "notify")
	ln, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: notifyPath, Net: "unixgram"})
	if err != nil {
		t.Fatalf("journaltest: %v", err)
	}
	defer ln.Close()

	runtime.LockOSThread() // for Pdeathsig, see reexec
	defer runtime.UnlockOSThread()
	stderr := &bytes.Buffer{}
	cmd := exec.Command(JournaldPath)
	cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin",
		"NOTIFY_SOCKET=" + notifyPath,
		"SYSTEMD_LOG_TARGET=console", // its own messages to our buffer, not to the host's kmsg
	}
	cmd.Stdout, cmd.Stderr = stderr, stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("journaltest: start %s: %v", JournaldPath, err)
	}
	waited := make(chan struct{})
	go func() { cmd.Wait(); close(waited) }()

	ready := make(chan error, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			n, err := ln.Read(buf)
			if err != nil {
				ready <- err
				return
			}
			for _, line := range strings.Split(string(buf[:n]), "\n") {
				if line == "READY=1" {
					ready <- nil
					return
				}
			}
		}
	}()
	select {
	case err := <-ready:
		if err != nil {
			t.Fatalf("journaltest: reading journald's notifications: %v", err)
		}
	case <-waited:
		t.Fatalf("journaltest: journald exited at start: %s", stderr)
	case <-time.After(15 * time.Second):
		cmd.Process.Kill()
		t.Fatalf("journaltest: journald not ready within 15s: %s", stderr)
	}
	j.mu.Lock()
	j.cmd, j.waited, j.stderr = cmd, waited, stderr
	j.mu.Unlock()
}

// Pid is journald's process id.
func (j *Journal) Pid() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.cmd.Process.Pid
}

// Kill kills journald with SIGKILL, as a crash would. Its socket file stays,
// so senders get ECONNREFUSED rather than ENOENT.
func (j *Journal) Kill(t testing.TB) {
	t.Helper()
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.cmd.Process.Kill(); err != nil {
		t.Fatalf("journaltest: kill journald: %v", err)
	}
	<-j.waited
}

// Pause stops journald with SIGSTOP: it reads nothing, its socket's receive
// queue fills up and senders block, which is what a slow journald looks like.
func (j *Journal) Pause(t testing.TB) { j.signal(t, syscall.SIGSTOP) }

// Resume continues a paused journald.
func (j *Journal) Resume(t testing.TB) { j.signal(t, syscall.SIGCONT) }

func (j *Journal) signal(t testing.TB, sig syscall.Signal) {
	t.Helper()
	j.mu.Lock()
	defer j.mu.Unlock()
	if err := j.cmd.Process.Signal(sig); err != nil {
		t.Fatalf("journaltest: %v to journald: %v", sig, err)
	}
}

// Restart starts journald again after Kill (or replaces a running one),
// keeping the entries already written.
func (j *Journal) Restart(t testing.TB) {
	t.Helper()
	j.stop()
	j.start(t)
}

// stop ends journald: SIGCONT (it may be paused), SIGTERM so it closes its
// files cleanly, SIGKILL after 5s.
func (j *Journal) stop() {
	j.mu.Lock()
	defer j.mu.Unlock()
	select {
	case <-j.waited:
		return
	default:
	}
	j.cmd.Process.Signal(syscall.SIGCONT)
	j.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-j.waited:
	case <-time.After(5 * time.Second):
		j.cmd.Process.Kill()
		<-j.waited
	}
}

// Entry is one journal entry as journalctl -o json prints it. Binary values
// (arrays of bytes) are decoded; a field that occurs several times keeps its
// first value.
type Entry map[string]string

// Entries returns the entries matching all of matches: journalctl match
// syntax ("FIELD=value", e.g. "RBEE_WORKER_ID=w-1") or other journalctl
// filter arguments ("-t", "rbee-worker"; "-p", "warning").
func (j *Journal) Entries(t testing.TB, matches ...string) []Entry {
	t.Helper()
	entries, err := Query(matches...)
	if err != nil {
		t.Fatalf("journaltest: %v", err)
	}
	return entries
}

// WaitFor polls until at least n entries match (journald writes
// asynchronously) and returns them; it fails the test after timeout.
func (j *Journal) WaitFor(t testing.TB, n int, timeout time.Duration, matches ...string) []Entry {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		entries := j.Entries(t, matches...)
		if len(entries) >= n {
			return entries
		}
		if time.Now().After(deadline) {
			t.Fatalf("journaltest: %d entries matching %q after %v, want %d", len(entries), matches, timeout, n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Query runs journalctl on the test journal. Outside a test (e.g. in a
// helper goroutine) use it instead of Entries.
func Query(matches ...string) ([]Entry, error) {
	// --all: without it journalctl prints fields over 4 KiB as null.
	args := append([]string{"--no-pager", "-q", "--all", "-o", "json", "--directory", Dir}, matches...)
	cmd := exec.Command(JournalctlPath, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("journalctl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	var entries []Entry
	dec := json.NewDecoder(bytes.NewReader(out))
	for dec.More() {
		var raw map[string]any
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("journalctl output: %w", err)
		}
		e := make(Entry, len(raw))
		for k, v := range raw {
			e[k] = decodeValue(v)
		}
		entries = append(entries, e)
	}
	return entries, nil
}

// decodeValue turns journalctl's JSON value forms into a string: a string;
// an array of numbers for binary data; an array of those for a repeated field.
func decodeValue(v any) string {
	switch v := v.(type) {
	case string:
		return v
	case []any:
		if len(v) == 0 {
			return ""
		}
		if _, isNum := v[0].(float64); isNum {
			b := make([]byte, 0, len(v))
			for _, x := range v {
				f, _ := x.(float64)
				b = append(b, byte(f))
			}
			return string(b)
		}
		return decodeValue(v[0])
	case nil:
		return ""
	default:
		return fmt.Sprint(v)
	}
}
