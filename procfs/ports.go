package procfs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// Port ownership: which process holds the listening socket(s) on a TCP
// port. Between the hive's bind check and a worker's own bind any local
// process can take the port; a worker is only ready, and only gets traffic,
// when every listening socket on its port is held by a process in its leaf.

// ErrNoListener means no socket listens on the port (yet).
var ErrNoListener = errors.New("procfs: nothing listens on the port")

// ErrSquatter means a socket listens on the port that no process of the
// given set holds.
var ErrSquatter = errors.New("procfs: port held by a process outside the worker")

// Listener is one listening TCP socket.
type Listener struct {
	Inode uint64
	// UID owns the socket (the fsuid of the process that created it).
	UID  uint32
	IPv6 bool
	// PID is the process of the set that holds the socket, 0 if none does.
	PID int
}

// SquatterError names the listening sockets on Port that no process of the
// set holds. errors.Is(err, ErrSquatter) is true.
type SquatterError struct {
	Port    int
	Foreign []Listener
}

func (e *SquatterError) Error() string {
	parts := make([]string, len(e.Foreign))
	for i, l := range e.Foreign {
		parts[i] = fmt.Sprintf("socket:[%d] uid %d", l.Inode, l.UID)
	}
	return fmt.Sprintf("procfs: port %d: listening %s held by no process of the worker", e.Port, strings.Join(parts, ", "))
}

func (e *SquatterError) Is(target error) bool { return target == ErrSquatter }

// PortOwner returns the pid among pids that holds the listening socket on
// port (IPv4 and IPv6, any local address). ErrNoListener: nothing listens.
// A *SquatterError: at least one listening socket on the port is held by no
// pid of the set, even when another one is (with SO_REUSEPORT the kernel
// would share connections between them). Pids that vanish are skipped.
//
// Reading another uid's /proc/<pid>/fd needs CAP_SYS_PTRACE (or the same
// uid); without it the check fails with a permission error naming the pid,
// never with an owner.
func (r *Reader) PortOwner(port int, pids []int) (int, error) {
	return r.portOwner(port, pids, r.root == DefaultRoot)
}

func (r *Reader) portOwner(port int, pids []int, diag bool) (int, error) {
	ls, err := r.portListeners(port, pids, diag)
	if err != nil {
		return 0, err
	}
	if len(ls) == 0 {
		return 0, fmt.Errorf("procfs: port %d: %w", port, ErrNoListener)
	}
	var foreign []Listener
	owner := 0
	for _, l := range ls {
		if l.PID == 0 {
			foreign = append(foreign, l)
		} else if owner == 0 {
			owner = l.PID
		}
	}
	if len(foreign) > 0 {
		return 0, &SquatterError{Port: port, Foreign: foreign}
	}
	return owner, nil
}

// PortListeners lists the listening sockets on port, with the pid of pids
// that holds each (0 for none). On the host's own /proc it asks the kernel
// through NETLINK_SOCK_DIAG, which walks only the listening hash; reading
// net/tcp walks every socket of the namespace (milliseconds on a busy
// host), so it is only the fallback, and the source for a fixture root.
func (r *Reader) PortListeners(port int, pids []int) ([]Listener, error) {
	return r.portListeners(port, pids, r.root == DefaultRoot)
}

func (r *Reader) portListeners(port int, pids []int, diag bool) ([]Listener, error) {
	if port <= 0 || port > 65535 {
		return nil, fmt.Errorf("procfs: port %d out of range 1-65535", port)
	}
	var ls []Listener
	var err error
	if diag {
		ls, err = diagListeners(port)
	}
	if !diag || err != nil {
		// sock_diag may be missing (CONFIG_INET_DIAG=n) or filtered.
		if ls, err = r.procListeners(port); err != nil {
			return nil, err
		}
	}
	if len(ls) == 0 {
		return nil, nil
	}
	want := make(map[uint64]int, len(ls))
	for i, l := range ls {
		want[l.Inode] = i
	}
	left := len(want)
	for _, pid := range pids {
		if left == 0 {
			break
		}
		found, err := r.socketInodes(pid, want)
		if err != nil {
			return nil, err
		}
		for _, ino := range found {
			if i := want[ino]; ls[i].PID == 0 {
				ls[i].PID = pid
				left--
			}
		}
	}
	return ls, nil
}

// procListeners reads the listening sockets on port from net/tcp and tcp6.
func (r *Reader) procListeners(port int) ([]Listener, error) {
	var ls []Listener
	for _, f := range []struct {
		name string
		v6   bool
	}{{"tcp", false}, {"tcp6", true}} {
		b, err := os.ReadFile(filepath.Join(r.root, "net", f.name))
		if err != nil {
			if errors.Is(err, os.ErrNotExist) && f.v6 {
				continue // IPv6 disabled
			}
			return nil, fmt.Errorf("procfs: read net/%s: %w", f.name, err)
		}
		got, err := parseListeners(b, port, f.v6)
		if err != nil {
			return nil, fmt.Errorf("procfs: net/%s: %w", f.name, err)
		}
		ls = append(ls, got...)
	}
	return ls, nil
}

// tcpListen is the TCP_LISTEN state as /proc/net/tcp prints it.
const tcpListen = "0A"

// parseListeners returns the sockets in LISTEN state on port from the text
// of /proc/net/tcp or tcp6: "sl local rem st tx:rx tr:when retr uid
// timeout inode ...", addresses as HEXADDR:HEXPORT.
func parseListeners(b []byte, port int, v6 bool) ([]Listener, error) {
	var out []Listener
	sc := bufio.NewScanner(bytes.NewReader(b))
	first := true
	for sc.Scan() {
		if first { // header
			first = false
			continue
		}
		f := strings.Fields(sc.Text())
		if len(f) < 10 {
			continue
		}
		if f[3] != tcpListen {
			continue
		}
		_, hexPort, ok := strings.Cut(f[1], ":")
		if !ok {
			return nil, fmt.Errorf("malformed local address %q", f[1])
		}
		p, err := strconv.ParseUint(hexPort, 16, 16)
		if err != nil {
			return nil, fmt.Errorf("malformed local port %q: %w", hexPort, err)
		}
		if int(p) != port {
			continue
		}
		uid, err := strconv.ParseUint(f[7], 10, 32)
		if err != nil {
			return nil, fmt.Errorf("malformed uid %q: %w", f[7], err)
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("malformed inode %q: %w", f[9], err)
		}
		out = append(out, Listener{Inode: ino, UID: uint32(uid), IPv6: v6})
	}
	return out, sc.Err()
}

// socketInodes returns the inodes of want that pid holds among its fds. A
// vanished pid holds none.
func (r *Reader) socketInodes(pid int, want map[uint64]int) ([]uint64, error) {
	dir := filepath.Join(r.root, strconv.Itoa(pid), "fd")
	d, err := os.Open(dir)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("procfs: pid %d fds: %w", pid, err)
	}
	names, err := d.Readdirnames(-1)
	d.Close()
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, fmt.Errorf("procfs: pid %d fds: %w", pid, err)
	}
	var found []uint64
	for _, n := range names {
		target, err := os.Readlink(dir + "/" + n)
		if err != nil {
			if errors.Is(err, os.ErrPermission) {
				// Another uid's fds need CAP_SYS_PTRACE: say so rather
				// than report its sockets as a squatter's.
				return nil, fmt.Errorf("procfs: pid %d fds: %w", pid, err)
			}
			continue // closed since the listing
		}
		rest, ok := strings.CutPrefix(target, "socket:[")
		if !ok {
			continue
		}
		ino, err := strconv.ParseUint(strings.TrimSuffix(rest, "]"), 10, 64)
		if err != nil {
			continue
		}
		if _, ok := want[ino]; ok {
			found = append(found, ino)
		}
	}
	return found, nil
}

// PortHeldBy checks a port against a worker that has a uid of its own:
// every listening socket on port must belong to uid (the kernel records the
// creator's fsuid in each socket). Only a process running as uid can create
// such a socket, and with one uid per worker that is the worker itself, so
// no /proc/<pid>/fd is read: cheaper than PortOwner, and the hive needs
// neither CAP_SYS_PTRACE nor CAP_DAC_READ_SEARCH for it. Workers that share
// a uid (a fixed system user, root) need PortOwner. ErrNoListener: nothing
// listens; a *SquatterError names the sockets of other uids.
func (r *Reader) PortHeldBy(port int, uid uint32) error {
	ls, err := r.portListeners(port, nil, r.root == DefaultRoot)
	if err != nil {
		return err
	}
	if len(ls) == 0 {
		return fmt.Errorf("procfs: port %d: %w", port, ErrNoListener)
	}
	var foreign []Listener
	for _, l := range ls {
		if l.UID != uid {
			foreign = append(foreign, l)
		}
	}
	if len(foreign) > 0 {
		return &SquatterError{Port: port, Foreign: foreign}
	}
	return nil
}
