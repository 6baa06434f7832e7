package fdhandover

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// activated is the next hive start under the fake systemd: it takes the
// stored listener and pipe from LISTEN_FDS by name.
func activated() int {
	r, err := Receive()
	if err != nil {
		return fail("receive: %v", err)
	}
	if got := strings.Join(r.Names(), ","); got != "api,w-abc.stdout" {
		return fail("names %q", got)
	}
	if os.Getenv("LISTEN_FDS") != "" {
		return fail("LISTEN_FDS left in the environment")
	}
	out := r.Take("w-abc.stdout")
	line, err := bufio.NewReader(out).ReadString('\n')
	if line != "written while the hive was away\n" {
		return fail("pipe: %q %v", line, err)
	}
	ln, err := r.Listener("api")
	if err != nil {
		return fail("listener: %v", err)
	}
	c, err := ln.Accept()
	if err != nil {
		return fail("accept: %v", err)
	}
	msg, _ := bufio.NewReader(c).ReadString('\n')
	fmt.Fprintf(c, "pong %s", msg)
	c.Close()
	fmt.Println("ok")
	return 0
}

// fakeSystemd is the receiving end of the notify socket.
type fakeSystemd struct {
	path string
	conn *net.UnixConn
}

func newFakeSystemd(t *testing.T) *fakeSystemd {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &fakeSystemd{path: path, conn: conn}
}

// recv reads one datagram and the descriptors that came with it.
func (f *fakeSystemd) recv(t *testing.T) (string, []*os.File) {
	t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, unix.CmsgSpace(16*4))
	n, oobn, flags, _, err := f.conn.ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		t.Fatal("control data truncated")
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil {
		t.Fatal(err)
	}
	var files []*os.File
	for _, m := range msgs {
		fds, err := unix.ParseUnixRights(&m)
		if err != nil {
			t.Fatal(err)
		}
		for _, fd := range fds {
			files = append(files, os.NewFile(uintptr(fd), "stored"))
		}
	}
	return string(buf[:n]), files
}

func inode(t *testing.T, fd uintptr) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Fstat(int(fd), &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// TestFDStoreRoundTrip plays systemd: the hive stores its listener and a
// worker's pipe, dies (closes everything), the worker keeps writing without
// EPIPE, a client connects while no hive runs, and the next start receives
// both by name through LISTEN_FDS and serves the waiting client and the
// output written meanwhile.
func TestFDStoreRoundTrip(t *testing.T) {
	sd := newFakeSystemd(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer pw.Close()
	tests := []struct {
		name string
		poll bool
		conn interface{ Fd() uintptr }
		want string
	}{
		{"api", false, nil, "FDSTORE=1\nFDNAME=api\nFDPOLL=0\n"},
		{"w-abc.stdout", true, pr, "FDSTORE=1\nFDNAME=w-abc.stdout\n"},
	}
	lnFile, err := ln.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	tests[0].conn = lnFile
	var stored []*os.File
	for _, tc := range tests {
		if err := Store(sd.path, tc.name, tc.poll, tc.conn.(*os.File)); err != nil {
			t.Fatal(err)
		}
		msg, files := sd.recv(t)
		if msg != tc.want {
			t.Errorf("datagram %q, want %q", msg, tc.want)
		}
		if len(files) != 1 {
			t.Fatalf("%s: %d descriptors, want 1", tc.name, len(files))
		}
		if got, want := inode(t, files[0].Fd()), inode(t, tc.conn.Fd()); got != want {
			t.Errorf("%s: stored inode %d, want %d", tc.name, got, want)
		}
		stored = append(stored, files[0])
	}
	if err := Remove(sd.path, "old"); err != nil {
		t.Fatal(err)
	}
	if msg, files := sd.recv(t); msg != "FDSTOREREMOVE=1\nFDNAME=old\n" || len(files) != 0 {
		t.Errorf("remove: %q with %d fds", msg, len(files))
	}

	// The hive dies: its descriptors are gone, only the store holds them.
	addr := ln.Addr().String()
	ln.Close()
	lnFile.Close()
	pr.Close()
	if _, err := pw.WriteString("written while the hive was away\n"); err != nil {
		t.Fatalf("worker write with the hive gone: %v", err)
	}
	waiting, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("connect with the hive gone: %v", err)
	}
	defer waiting.Close()
	io.WriteString(waiting, "ping\n")

	// The next start, as systemd runs it: descriptors from 3 on, names in
	// LISTEN_FDNAMES, LISTEN_PID = the started process (set by a shell that
	// then execs, because the pid is known only after the fork).
	exe, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ exec "$0"`, exe)
	cmd.ExtraFiles = stored
	cmd.Env = append(os.Environ(), roleEnv+"=activated", "LISTEN_FDS=2", "LISTEN_FDNAMES=api:w-abc.stdout")
	out, err := cmd.CombinedOutput()
	if err != nil || string(out) != "ok\n" {
		t.Fatalf("next start: %v\n%s", err, out)
	}
	reply, err := io.ReadAll(waiting)
	if err != nil || string(reply) != "pong ping\n" {
		t.Errorf("client that connected while no hive ran: %q %v", reply, err)
	}
}

func TestNotifyWithoutSocket(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Notify("", "READY=1"); err != ErrNoNotifySocket {
		t.Errorf("Notify without NOTIFY_SOCKET: %v", err)
	}
}

// TestNotifyAbstractSocket: NOTIFY_SOCKET may name an abstract socket
// ("@..."), as systemd uses for some units.
func TestNotifyAbstractSocket(t *testing.T) {
	name := fmt.Sprintf("@rbee-fdhandover-test-%d", os.Getpid())
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: name, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	t.Setenv("NOTIFY_SOCKET", name)
	if err := Notify("", "READY=1\n"); err != nil {
		t.Fatal(err)
	}
	sd := &fakeSystemd{path: name, conn: conn}
	if msg, files := sd.recv(t); msg != "READY=1\n" || len(files) != 0 {
		t.Errorf("got %q with %d fds", msg, len(files))
	}
}
