package procfs

import (
	"encoding/binary"
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"
)

// NETLINK_SOCK_DIAG (linux/inet_diag.h). x/sys/unix has the constants but
// not the inet_diag structs, so requests and replies are laid out here.
const (
	sizeofNlMsghdr     = 16
	sizeofInetDiagReq  = 56 // struct inet_diag_req_v2
	sizeofInetDiagMsg  = 72 // struct inet_diag_msg
	tcpListenState     = 10 // TCP_LISTEN
	tcpListenStateBit  = 1 << tcpListenState
	diagMsgUIDOffset   = 64
	diagMsgInodeOffset = 68
)

// diagListeners asks the kernel for the TCP sockets in LISTEN state on port
// (IPv4 and IPv6). With only LISTEN requested and a source port set, the
// kernel walks just the listening hash and filters by port itself.
func diagListeners(port int) ([]Listener, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, fmt.Errorf("procfs: sock_diag socket: %w", err)
	}
	defer unix.Close(fd)
	var out []Listener
	for seq, fam := range []uint8{unix.AF_INET, unix.AF_INET6} {
		ls, err := diagDump(fd, uint32(seq+1), fam, port)
		if err != nil {
			return nil, err
		}
		out = append(out, ls...)
	}
	return out, nil
}

func diagDump(fd int, seq uint32, family uint8, port int) ([]Listener, error) {
	var req [sizeofNlMsghdr + sizeofInetDiagReq]byte
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	ne.PutUint32(req[8:], seq)
	r := req[sizeofNlMsghdr:]
	r[0] = family
	r[1] = unix.IPPROTO_TCP
	ne.PutUint32(r[4:], tcpListenStateBit)
	binary.BigEndian.PutUint16(r[8:], uint16(port)) // id.idiag_sport
	if err := unix.Sendto(fd, req[:], 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return nil, fmt.Errorf("procfs: sock_diag request: %w", err)
	}
	var out []Listener
	buf := make([]byte, 32<<10)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("procfs: sock_diag reply: %w", err)
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return nil, fmt.Errorf("procfs: sock_diag reply: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if e := int32(ne.Uint32(m.Data)); e != 0 {
						return nil, fmt.Errorf("procfs: sock_diag: %w", syscall.Errno(-e))
					}
				}
				return out, nil
			case unix.SOCK_DIAG_BY_FAMILY:
				d := m.Data
				if len(d) < sizeofInetDiagMsg {
					return nil, fmt.Errorf("procfs: sock_diag: short inet_diag_msg (%d bytes)", len(d))
				}
				if d[1] != tcpListenState || int(binary.BigEndian.Uint16(d[4:])) != port {
					continue // kernels that ignore idiag_sport
				}
				out = append(out, Listener{
					Inode: uint64(ne.Uint32(d[diagMsgInodeOffset:])),
					UID:   ne.Uint32(d[diagMsgUIDOffset:]),
					IPv6:  d[0] == unix.AF_INET6,
				})
			}
		}
	}
}
