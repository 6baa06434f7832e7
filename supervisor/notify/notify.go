// Package notify is the hive's notify socket: a unixgram listener with
// SO_PASSCRED that receives sd_notify datagrams (READY=1, WATCHDOG=1,
// STATUS=, STOPPING=1, RBEE_*) from workers and hands each one, with the
// sender's kernel-attested pid/uid/gid, to a handler.
//
// The socket attests who sent a datagram; deciding whether that pid is a
// worker (its cgroup) is the caller's job. Never trust an id in the payload.
//
// Any sd_notify client is a valid sender: package worker, go-systemd's
// daemon.SdNotify, libsystemd, and systemd-notify(1). systemd-notify is a
// short-lived helper that may exit before the hive maps its pid to a
// cgroup, so a shell worker should name its own long-lived pid:
//
//	systemd-notify --pid=$$ --ready
//	systemd-notify --pid=$$ --no-block WATCHDOG=1 RBEE_HEALTH=healthy
//
// Privileged, the datagram then carries the shell's credentials (systemd
// 252 even claims the parent's pid without --pid); unprivileged, the kernel
// refuses a foreign pid and libsystemd falls back to the helper's own pid,
// which races. Never `exec systemd-notify`: it then claims its parent's pid,
// i.e. the hive's, and is rejected. Without --no-block it follows with
// BARRIER=1 carrying a pipe fd; this socket's control buffer has room for
// credentials only, so the kernel closes that fd at once (the barrier
// completes, no fd reaches the hive) and the BARRIER=1 message itself is
// delivered like any other. It carries systemd-notify's own pid, not
// --pid's, and that helper has usually exited by the time a caller looks
// its cgroup up: a caller should drop a lone BARRIER=1 unattributed (the
// supervisor does) rather than count it as a stranger's.
package notify

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/coreos/go-systemd/v22/activation"
	"golang.org/x/sys/unix"
)

// MaxDatagram is the largest datagram accepted; longer ones are dropped
// (reason oversize).
const MaxDatagram = 4096

// SocketMode is the permission of a socket created by Listen: workers
// reach it through the group.
const SocketMode = 0o660

// Drop reasons, as label values for rbee_hive_heartbeats_rejected_total.
const (
	ReasonOversize      = "oversize"
	ReasonNoCredentials = "no_credentials"
	ReasonMalformed     = "malformed"
)

// Message is one accepted datagram.
type Message struct {
	PID      int32 // sender's pid, as attested by the kernel (never 0)
	UID, GID uint32
	// Fields views the receive buffer: valid only during the Handler call
	// (Clone keeps a message).
	Fields   Fields
	Received time.Time
}

// Clone returns a copy of m that stays valid after the Handler returns.
func (m Message) Clone() Message {
	m.Fields = m.Fields.Clone()
	return m
}

// Handler is called in the receive loop, one message at a time; it must
// not block (hand off to a channel if it has work to do) nor keep
// m.Fields past its return.
type Handler func(Message)

// Stats is a snapshot of the counters. Received == Delivered + Oversize +
// NoCredentials + Malformed. ReadErrors counts failed recvmsg calls (no
// datagram was consumed).
type Stats struct {
	Received      uint64
	Delivered     uint64
	Oversize      uint64
	NoCredentials uint64
	Malformed     uint64
	ReadErrors    uint64
}

// Dropped returns the drop counts keyed by reason label.
func (s Stats) Dropped() map[string]uint64 {
	return map[string]uint64{
		ReasonOversize:      s.Oversize,
		ReasonNoCredentials: s.NoCredentials,
		ReasonMalformed:     s.Malformed,
	}
}

// DroppedTotal is the sum over all reasons.
func (s Stats) DroppedTotal() uint64 { return s.Oversize + s.NoCredentials + s.Malformed }

type counters struct {
	received, delivered, oversize, noCreds, malformed, readErrors atomic.Uint64
}

// Listener is the notify socket.
type Listener struct {
	conn  *net.UnixConn
	raw   syscall.RawConn
	path  string    // for Close: set only when Listen created the file
	ident [2]uint64 // dev, ino of the file we created
	c     counters
}

// Listen creates the socket at path: it makes the parent directory (0755),
// removes a stale socket left by a previous hive (but refuses to remove a
// socket someone still listens on, or a file that is not a socket), binds,
// sets SocketMode and SO_PASSCRED. "@name" binds in the abstract namespace
// (reachable by anything in the network namespace: prefer a path).
func Listen(path string) (*Listener, error) {
	if path == "" {
		return nil, errors.New("notify: empty socket path")
	}
	abstract := path[0] == '@'
	if !abstract {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			return nil, fmt.Errorf("notify: create socket dir: %w", err)
		}
		if err := removeStale(path); err != nil {
			return nil, err
		}
	}
	// SO_PASSCRED before bind: a datagram that arrives between bind and
	// setsockopt would carry no credentials (the kernel decides at send).
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		if err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		}); err != nil {
			return err
		}
		return serr
	}}
	pc, err := lc.ListenPacket(context.Background(), "unixgram", path)
	if err != nil {
		return nil, fmt.Errorf("notify: listen %s: %w", path, err)
	}
	conn := pc.(*net.UnixConn)
	l, err := newListener(conn)
	if err != nil {
		conn.Close()
		if !abstract {
			os.Remove(path)
		}
		return nil, err
	}
	if !abstract {
		// Chmod after bind: bind applies the umask, and the mode is our
		// contract with workers in the group.
		if err := os.Chmod(path, SocketMode); err != nil {
			l.conn.Close()
			os.Remove(path)
			return nil, fmt.Errorf("notify: chmod %s: %w", path, err)
		}
		var st unix.Stat_t
		if err := unix.Stat(path, &st); err == nil {
			l.ident = [2]uint64{uint64(st.Dev), st.Ino}
		}
		l.path = path
	}
	return l, nil
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	if fi.Mode().Type() != os.ModeSocket {
		return fmt.Errorf("notify: %s exists and is not a socket", path)
	}
	if c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: path, Net: "unixgram"}); err == nil {
		c.Close()
		return fmt.Errorf("notify: %s is in use by a live receiver", path)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("notify: remove stale socket: %w", err)
	}
	return nil
}

// FromPacketConn wraps a unixgram socket made elsewhere, e.g. by systemd
// socket activation: a .socket unit with ListenDatagram= keeps datagrams
// queued while the hive restarts. It must say PassCredentials=yes: the
// kernel attaches credentials at send time only if the receiving socket
// already has SO_PASSCRED, so datagrams queued before this call arrive
// without them (dropped, no_credentials). SO_PASSCRED is set here in any
// case. Close does not remove the file.
func FromPacketConn(pc net.PacketConn) (*Listener, error) {
	uc, ok := pc.(*net.UnixConn)
	if !ok {
		return nil, fmt.Errorf("notify: %T is not a unix socket", pc)
	}
	return newListener(uc)
}

// FromFile wraps a unixgram socket fd (it is duplicated; the caller may
// close f).
func FromFile(f *os.File) (*Listener, error) {
	pc, err := net.FilePacketConn(f)
	if err != nil {
		return nil, fmt.Errorf("notify: %w", err)
	}
	l, err := FromPacketConn(pc)
	if err != nil {
		pc.Close()
	}
	return l, err
}

// ErrNotActivated: no datagram socket was passed by systemd.
var ErrNotActivated = errors.New("notify: no activated unix datagram socket")

// FromActivation takes the first unix datagram socket passed by systemd
// (LISTEN_FDS, via go-systemd's activation.PacketConns), or returns
// ErrNotActivated.
func FromActivation() (*Listener, error) {
	pcs, err := activation.PacketConns()
	if err != nil {
		return nil, fmt.Errorf("notify: socket activation: %w", err)
	}
	for _, pc := range pcs {
		if uc, ok := pc.(*net.UnixConn); ok {
			return newListener(uc)
		}
	}
	return nil, ErrNotActivated
}

func newListener(conn *net.UnixConn) (*Listener, error) {
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("notify: %w", err)
	}
	var soErr error
	var typ int
	if err := raw.Control(func(fd uintptr) {
		typ, soErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_TYPE)
		if soErr == nil {
			soErr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PASSCRED, 1)
		}
	}); err != nil {
		return nil, fmt.Errorf("notify: %w", err)
	}
	if soErr != nil {
		return nil, fmt.Errorf("notify: setsockopt SO_PASSCRED: %w", soErr)
	}
	if typ != unix.SOCK_DGRAM {
		return nil, fmt.Errorf("notify: socket type %d is not SOCK_DGRAM", typ)
	}
	return &Listener{conn: conn, raw: raw}, nil
}

// Addr is the socket's address ("@name" for abstract).
func (l *Listener) Addr() string { return l.conn.LocalAddr().String() }

// Conn exposes the socket, e.g. to tune SO_RCVBUF.
func (l *Listener) Conn() *net.UnixConn { return l.conn }

// Stats reads the counters (each atomically; the set is not a snapshot
// while Serve runs).
func (l *Listener) Stats() Stats {
	return Stats{
		Received:      l.c.received.Load(),
		Delivered:     l.c.delivered.Load(),
		Oversize:      l.c.oversize.Load(),
		NoCredentials: l.c.noCreds.Load(),
		Malformed:     l.c.malformed.Load(),
		ReadErrors:    l.c.readErrors.Load(),
	}
}

// Close closes the socket and removes its file if Listen created it and it
// is still the same file (a newer hive may have replaced it).
func (l *Listener) Close() error {
	err := l.conn.Close()
	if l.path != "" {
		var st unix.Stat_t
		if unix.Stat(l.path, &st) == nil && [2]uint64{uint64(st.Dev), st.Ino} == l.ident {
			if rerr := os.Remove(l.path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) && err == nil {
				err = fmt.Errorf("notify: remove socket: %w", rerr)
			}
		}
	}
	if err != nil && !errors.Is(err, net.ErrClosed) {
		return fmt.Errorf("notify: close: %w", err)
	}
	return nil
}

// oobSize fits exactly one SCM_CREDENTIALS. Being this small is deliberate:
// a sender's SCM_RIGHTS fds find no room, so the kernel never installs them
// in the hive (it sets MSG_CTRUNC and closes them).
var oobSize = unix.CmsgSpace(unix.SizeofUcred)

// recvBatch is how many datagrams one recvmmsg call may take: under load
// (many workers, or a burst) the syscall is paid once per batch; a lone
// datagram costs what recvmsg would.
const recvBatch = 8

// mmsghdr is struct mmsghdr (x/sys/unix has no type for it): Go pads it as
// C does, to the alignment of the pointers in Msghdr.
type mmsghdr struct {
	hdr unix.Msghdr
	len uint32
}

// receiver holds everything recvmmsg and the parser need, allocated once
// per Serve: the loop itself does not allocate.
type receiver struct {
	bufs   [recvBatch][MaxDatagram]byte
	oobs   [recvBatch][64]byte
	iovs   [recvBatch]unix.Iovec
	msgs   [recvBatch]mmsghdr
	fields Fields
	n      int // datagrams in msgs after a read
	errno  syscall.Errno
	read   func(fd uintptr) bool
}

func newReceiver() *receiver {
	r := &receiver{}
	for i := range r.iovs {
		r.iovs[i].Base = &r.bufs[i][0]
		r.iovs[i].SetLen(MaxDatagram)
	}
	r.read = func(fd uintptr) bool {
		for i := range r.msgs {
			r.msgs[i] = mmsghdr{hdr: unix.Msghdr{Iov: &r.iovs[i], Control: &r.oobs[i][0]}}
			r.msgs[i].hdr.SetIovlen(1)
			r.msgs[i].hdr.SetControllen(oobSize)
		}
		for {
			n, _, e := syscall.Syscall6(unix.SYS_RECVMMSG, fd, uintptr(unsafe.Pointer(&r.msgs[0])), recvBatch,
				unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC, 0, 0)
			switch e {
			case unix.EINTR:
				continue
			case unix.EAGAIN:
				return false // wait in the netpoller
			}
			r.n, r.errno = int(n), e
			return true
		}
	}
	return r
}

// creds finds SCM_CREDENTIALS in datagram i's control data.
func (r *receiver) creds(i int) (pid int32, uid, gid uint32, ok bool) {
	oob := r.oobs[i][:r.msgs[i].hdr.Controllen]
	hdr := unix.CmsgLen(0)
	for len(oob) >= hdr {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < hdr || l > len(oob) {
			return 0, 0, 0, false
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SCM_CREDENTIALS && l >= unix.CmsgLen(unix.SizeofUcred) {
			d := oob[hdr:]
			pid = int32(binary.NativeEndian.Uint32(d[0:4]))
			uid = binary.NativeEndian.Uint32(d[4:8])
			gid = binary.NativeEndian.Uint32(d[8:12])
			return pid, uid, gid, pid > 0
		}
		if sp := unix.CmsgSpace(l - hdr); sp <= len(oob) {
			oob = oob[sp:]
		} else {
			break
		}
	}
	return 0, 0, 0, false
}

// Serve receives until ctx ends (then returns nil) or the socket fails
// (after Close: an error wrapping net.ErrClosed).
// Datagrams over MaxDatagram, without credentials, or unparseable are
// dropped and counted; the rest go to h. Serve must not run twice at once.
func (l *Listener) Serve(ctx context.Context, h Handler) error {
	if err := l.conn.SetReadDeadline(time.Time{}); err != nil {
		return fmt.Errorf("notify: %w", err)
	}
	stop := context.AfterFunc(ctx, func() {
		// Unblocks the netpoller wait below; Close would also do it but
		// the socket belongs to the caller until Close.
		l.conn.SetReadDeadline(time.Unix(1, 0))
	})
	defer stop()
	r := newReceiver()
	for {
		if err := l.raw.Read(r.read); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("notify: receive: %w", err)
		}
		if r.errno != 0 {
			if ctx.Err() != nil {
				return nil
			}
			l.c.readErrors.Add(1)
			if r.errno == unix.EBADF || r.errno == unix.ENOTSOCK {
				return fmt.Errorf("notify: recvmmsg: %w", r.errno)
			}
			continue
		}
		now := time.Now() // one batch, one moment of reception
		for i := range r.n {
			l.deliver(r, i, now, h)
		}
	}
}

// deliver counts datagram i of r's batch and hands it to h unless it is
// dropped. The outcome is counted before Received, so a reader that sees
// Received reach n also sees the outcomes of those n datagrams.
func (l *Listener) deliver(r *receiver, i int, now time.Time, h Handler) {
	m := &r.msgs[i]
	if m.hdr.Flags&unix.MSG_TRUNC != 0 {
		l.c.oversize.Add(1)
		l.c.received.Add(1)
		return
	}
	pid, uid, gid, ok := r.creds(i)
	if !ok {
		l.c.noCreds.Add(1)
		l.c.received.Add(1)
		return
	}
	if err := r.fields.Parse(r.bufs[i][:m.len]); err != nil {
		l.c.malformed.Add(1)
		l.c.received.Add(1)
		return
	}
	l.c.delivered.Add(1)
	l.c.received.Add(1)
	h(Message{PID: pid, UID: uid, GID: gid, Fields: r.fields, Received: now})
}
