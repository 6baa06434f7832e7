package fdhandover

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// ErrNoNotifySocket means NOTIFY_SOCKET is unset: not running under systemd
// (or NotifyAccess= forbids it), so there is no fd store.
var ErrNoNotifySocket = errors.New("fdhandover: no notify socket")

// Store pushes conns to systemd's file descriptor store under name
// ("FDSTORE=1", "FDNAME=name", the descriptors as SCM_RIGHTS) through the
// notify socket at socketPath ("" = $NOTIFY_SOCKET). systemd keeps them
// while the unit is restarted and passes them to the next start in
// LISTEN_FDS/LISTEN_FDNAMES (see Receive). The unit needs
// FileDescriptorStoreMax= large enough, or systemd drops them (it logs
// that). poll=false sends FDPOLL=0: systemd then keeps a descriptor even
// after it reports POLLHUP/POLLERR (by default it drops it, which suits a
// pipe whose writer is gone but not, say, a listener that is merely idle).
func Store(socketPath, name string, poll bool, conns ...syscall.Conn) error {
	if err := checkName(name); err != nil {
		return err
	}
	if len(conns) == 0 {
		return errors.New("fdhandover: store: no descriptors")
	}
	state := "FDSTORE=1\nFDNAME=" + name + "\n"
	if !poll {
		state += "FDPOLL=0\n"
	}
	return Notify(socketPath, state, conns...)
}

// Remove drops every descriptor stored under name (FDSTOREREMOVE=1).
func Remove(socketPath, name string) error {
	if err := checkName(name); err != nil {
		return err
	}
	return Notify(socketPath, "FDSTOREREMOVE=1\nFDNAME="+name+"\n")
}

// Notify sends one sd_notify datagram with conns' descriptors attached.
func Notify(socketPath, state string, conns ...syscall.Conn) error {
	if socketPath == "" {
		socketPath = os.Getenv("NOTIFY_SOCKET")
	}
	if socketPath == "" {
		return ErrNoNotifySocket
	}
	// Dups keep the descriptors valid for the send whatever the caller does
	// concurrently; systemd receives its own copies anyway.
	fds := make([]int, 0, len(conns))
	defer func() {
		for _, fd := range fds {
			unix.Close(fd)
		}
	}()
	for _, c := range conns {
		rc, err := c.SyscallConn()
		if err != nil {
			return fmt.Errorf("fdhandover: notify: %w", err)
		}
		var derr error
		if err := rc.Control(func(fd uintptr) {
			var d int
			d, derr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 3)
			if derr == nil {
				fds = append(fds, d)
			}
		}); err != nil {
			return fmt.Errorf("fdhandover: notify: %w", err)
		}
		if derr != nil {
			return fmt.Errorf("fdhandover: notify: dup: %w", derr)
		}
	}
	sock, err := unix.Socket(unix.AF_UNIX, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("fdhandover: notify: socket: %w", err)
	}
	defer unix.Close(sock)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	// x/sys/unix maps a leading '@' to the abstract namespace.
	if err := unix.Sendmsg(sock, []byte(state), oob, &unix.SockaddrUnix{Name: socketPath}, 0); err != nil {
		return fmt.Errorf("fdhandover: notify %s: %w", socketPath, err)
	}
	return nil
}
