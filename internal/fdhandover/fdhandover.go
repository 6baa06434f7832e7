// Package fdhandover carries named file descriptors (the API listener, the
// notify socket, per-worker pipes) from one hive to the next, so that a
// restart or an upgrade refuses no connection and loses no datagram:
//
//   - Exec replaces the running binary in the same pid (an in-place upgrade)
//     and passes the descriptors in the environment variable EnvFDs;
//   - Store pushes them to systemd's file descriptor store (FDSTORE=1), from
//     which systemd passes them to the next start of the unit (LISTEN_FDS,
//     LISTEN_FDNAMES), also after a crash;
//   - Receive, at start, takes both kinds by name.
package fdhandover

import (
	"errors"
	"fmt"
	"net"
	"os"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

const (
	// EnvFDs lists the handed-over descriptors as "name=fd,name=fd".
	EnvFDs = "RBEE_HIVE_FDS"
	// EnvPID is the pid EnvFDs is meant for. A child that inherits the
	// environment by mistake has another pid and takes nothing (the same
	// guard as systemd's LISTEN_PID).
	EnvPID = "RBEE_HIVE_FDS_PID"
)

// namePattern keeps names valid as systemd FDNAME= values (no ':', no
// control characters) and as EnvFDs items (no ',' or '=').
var namePattern = regexp.MustCompile(`^[A-Za-z0-9._-]{1,255}$`)

// ErrName marks an invalid descriptor name.
var ErrName = errors.New("fdhandover: invalid name")

func checkName(name string) error {
	if !namePattern.MatchString(name) {
		return fmt.Errorf("%w %q (want %s)", ErrName, name, namePattern)
	}
	return nil
}

// Set is the descriptors to hand over, by name. Everything added must stay
// open until Exec (on success it never returns).
type Set struct {
	names []string
	fds   []int
	keep  []syscall.Conn
}

// Add names c's descriptor. c is anything with a descriptor: *os.File,
// *net.TCPListener, *net.UnixListener, *net.UnixConn.
func (s *Set) Add(name string, c syscall.Conn) error {
	if err := checkName(name); err != nil {
		return err
	}
	if slices.Contains(s.names, name) {
		return fmt.Errorf("%w %q: added twice", ErrName, name)
	}
	fd, err := rawFD(c)
	if err != nil {
		return fmt.Errorf("fdhandover: %s: %w", name, err)
	}
	s.names = append(s.names, name)
	s.fds = append(s.fds, fd)
	s.keep = append(s.keep, c)
	return nil
}

// Len is the number of descriptors in the set.
func (s *Set) Len() int { return len(s.names) }

func rawFD(c syscall.Conn) (int, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return -1, err
	}
	fd := -1
	if err := rc.Control(func(f uintptr) { fd = int(f) }); err != nil {
		return -1, err
	}
	return fd, nil
}

// Env returns the EnvFDs and EnvPID entries describing s for pid.
func (s *Set) Env(pid int) []string {
	items := make([]string, len(s.names))
	for i, n := range s.names {
		items[i] = n + "=" + strconv.Itoa(s.fds[i])
	}
	return []string{EnvFDs + "=" + strings.Join(items, ","), EnvPID + "=" + strconv.Itoa(pid)}
}

// Exec replaces this process with path (argv, env; a previous EnvFDs/EnvPID
// in env is replaced) in the same pid, keeping the set's descriptors open
// across the exec. Children stay children: workers keep running. It
// returns only on failure, with every descriptor as it was (close-on-exec).
//
// While the descriptors are inheritable no fork may run, or a worker started
// at that moment would inherit the hive's listener: Exec holds
// syscall.ForkLock, which every os/exec start takes for writing.
func Exec(path string, argv, env []string, s *Set) error {
	env = slices.DeleteFunc(slices.Clone(env), func(kv string) bool {
		return strings.HasPrefix(kv, EnvFDs+"=") || strings.HasPrefix(kv, EnvPID+"=")
	})
	env = append(env, s.Env(os.Getpid())...)
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	for i, fd := range s.fds {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, 0); err != nil {
			restore(s.fds[:i])
			return fmt.Errorf("fdhandover: clear close-on-exec on %s (fd %d): %w", s.names[i], fd, err)
		}
	}
	err := syscall.Exec(path, argv, env)
	restore(s.fds)
	runtime.KeepAlive(s.keep)
	return fmt.Errorf("fdhandover: exec %s: %w", path, err)
}

func restore(fds []int) {
	for _, fd := range fds {
		unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC)
	}
}

// Received is what this process was handed at start, by name.
type Received struct {
	files map[string][]*os.File
}

// Receive takes the descriptors handed to this process: EnvFDs from Exec
// and LISTEN_FDS/LISTEN_FDNAMES from systemd (socket units and the fd store).
// It makes each close-on-exec again, owns it as an *os.File, and removes the
// variables from the environment so that no child sees them. A descriptor
// that is not open, or an EnvFDs entry that does not parse, is an error
// naming it; the rest are still returned.
func Receive() (*Received, error) {
	r := &Received{files: map[string][]*os.File{}}
	var errs []error
	if v, ok := os.LookupEnv(EnvFDs); ok {
		if os.Getenv(EnvPID) == strconv.Itoa(os.Getpid()) {
			errs = append(errs, r.takeEnv(v)...)
		}
		os.Unsetenv(EnvFDs)
		os.Unsetenv(EnvPID)
	}
	for _, f := range activation.Files(true) {
		r.files[f.Name()] = append(r.files[f.Name()], f)
	}
	return r, errors.Join(errs...)
}

func (r *Received) takeEnv(v string) []error {
	var errs []error
	for item := range strings.SplitSeq(v, ",") {
		name, num, ok := strings.Cut(item, "=")
		fd, err := strconv.Atoi(num)
		if !ok || checkName(name) != nil || err != nil || fd < 3 {
			errs = append(errs, fmt.Errorf("fdhandover: %s: bad item %q", EnvFDs, item))
			continue
		}
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFD, unix.FD_CLOEXEC); err != nil {
			errs = append(errs, fmt.Errorf("fdhandover: %s (fd %d): %w", name, fd, err))
			continue
		}
		r.files[name] = append(r.files[name], os.NewFile(uintptr(fd), name))
	}
	return errs
}

// Take removes and returns the descriptor named name (the first, if systemd
// holds several under one name), or nil.
func (r *Received) Take(name string) *os.File {
	fs := r.files[name]
	if len(fs) == 0 {
		return nil
	}
	if len(fs) == 1 {
		delete(r.files, name)
	} else {
		r.files[name] = fs[1:]
	}
	return fs[0]
}

// ErrNotHanded means no descriptor of that name was handed over.
var ErrNotHanded = errors.New("fdhandover: not handed over")

// Listener takes name as a net.Listener (net dups the descriptor; the
// *os.File is closed).
func (r *Received) Listener(name string) (net.Listener, error) {
	f := r.Take(name)
	if f == nil {
		return nil, fmt.Errorf("%w: %s", ErrNotHanded, name)
	}
	defer f.Close()
	ln, err := net.FileListener(f)
	if err != nil {
		return nil, fmt.Errorf("fdhandover: %s: %w", name, err)
	}
	return ln, nil
}

// PacketConn takes name as a net.PacketConn (e.g. the notify socket).
func (r *Received) PacketConn(name string) (net.PacketConn, error) {
	f := r.Take(name)
	if f == nil {
		return nil, fmt.Errorf("%w: %s", ErrNotHanded, name)
	}
	defer f.Close()
	pc, err := net.FilePacketConn(f)
	if err != nil {
		return nil, fmt.Errorf("fdhandover: %s: %w", name, err)
	}
	return pc, nil
}

// Names returns the names not taken yet, sorted.
func (r *Received) Names() []string {
	out := make([]string, 0, len(r.files))
	for n := range r.files {
		out = append(out, n)
	}
	slices.Sort(out)
	return out
}

// CloseRest closes every descriptor not taken (e.g. the pipes of workers
// that did not survive) and returns their names.
func (r *Received) CloseRest() []string {
	names := r.Names()
	for _, n := range names {
		for _, f := range r.files[n] {
			f.Close()
		}
		delete(r.files, n)
	}
	return names
}
