package systemd

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"
)

// Notifier sends sd_notify(3) messages for the hive itself to the service
// manager. Under systemd (NOTIFY_SOCKET set) every method sends one datagram;
// otherwise every method does nothing and returns nil, so callers need no
// "are we under systemd" branches.
//
// The socket address and the watchdog timeout are read once, in NewNotifier,
// and kept here: later changes to the process environment (os.Unsetenv,
// allow-listed worker environments) do not affect the Notifier.
type Notifier struct {
	addr     *net.UnixAddr // nil: not under systemd
	watchdog time.Duration // WATCHDOG_USEC meant for this pid; 0: no watchdog
	log      *slog.Logger

	mu         sync.Mutex
	lastStatus string
	statusSent bool
}

// NewNotifier reads NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID from the
// environment once. WATCHDOG_USEC counts only when WATCHDOG_PID is unset or
// names this process (go-systemd's daemon.SdWatchdogEnabled rule), so a child
// that inherited the variables never pings on the parent's behalf.
// log receives watchdog state changes; nil discards them.
func NewNotifier(log *slog.Logger) (*Notifier, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	n := &Notifier{log: log}
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock != "" {
		// Path or Linux abstract socket ("@name"; Go maps '@' to the
		// leading NUL itself). vsock addresses only occur inside VMs and
		// go-systemd does not speak them either.
		if sock[0] != '/' && sock[0] != '@' {
			return nil, fmt.Errorf("NOTIFY_SOCKET=%q: only path and @abstract sockets are supported", sock)
		}
		n.addr = &net.UnixAddr{Name: sock, Net: "unixgram"}
	}
	wd, err := daemon.SdWatchdogEnabled(false) // false: never touch the environment
	if err != nil {
		return nil, fmt.Errorf("reading the systemd watchdog settings: %w", err)
	}
	if n.addr != nil {
		n.watchdog = wd
	}
	return n, nil
}

// Enabled reports whether the hive runs under a service manager that listens
// for notifications.
func (n *Notifier) Enabled() bool { return n.addr != nil }

// WatchdogTimeout is WATCHDOG_USEC for this process, 0 when systemd set no
// watchdog. RunWatchdog pings at half of it.
func (n *Notifier) WatchdogTimeout() time.Duration { return n.watchdog }

// Ready tells systemd that start-up is complete (Type=notify). Send it after
// state restore, re-adoption and the socket and HTTP listener binds: it also
// arms the watchdog.
func (n *Notifier) Ready() error { return n.send(daemon.SdNotifyReady) }

// Reloading tells systemd that a reload (the in-place upgrade) has begun;
// READY=1 ends it. MONOTONIC_USEC= lets systemd tell this reload's READY=1
// from an earlier one.
func (n *Notifier) Reloading() error {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return fmt.Errorf("sd_notify RELOADING: %w", err)
	}
	return n.send(fmt.Sprintf("RELOADING=1\nMONOTONIC_USEC=%d\nSTATUS=upgrading", ts.Nano()/1000))
}

// Stopping tells systemd that a graceful shutdown has begun.
func (n *Notifier) Stopping() error { return n.send(daemon.SdNotifyStopping) }

// Status sets the one-line status shown by `systemctl status`. It sends only
// when line differs from the last status sent, so callers may call it on
// every supervision round. Newlines are replaced: one would start a new
// assignment in the datagram (e.g. a forged READY=1).
func (n *Notifier) Status(line string) error {
	if n.addr == nil {
		return nil
	}
	line = strings.NewReplacer("\r\n", " ", "\n", " ", "\r", " ").Replace(line)
	n.mu.Lock()
	defer n.mu.Unlock() // held while sending: keeps concurrent updates in order
	if n.statusSent && line == n.lastStatus {
		return nil
	}
	if err := n.send("STATUS=" + line); err != nil {
		return err // not recorded: the next call retries
	}
	n.lastStatus, n.statusSent = line, true
	return nil
}

// ExtendTimeout asks systemd for d more time for the current start, reload
// or stop (EXTEND_TIMEOUT_USEC): the deadline becomes now+d, not old+d, so a
// long drain must repeat it before d runs out (see KeepExtending).
func (n *Notifier) ExtendTimeout(d time.Duration) error {
	if d <= 0 {
		return fmt.Errorf("extend timeout by %v: must be positive", d)
	}
	return n.send(fmt.Sprintf("EXTEND_TIMEOUT_USEC=%d", d.Microseconds()))
}

// KeepExtending sends ExtendTimeout(d) now and every d/2 until ctx is done,
// e.g. around a worker drain that may outlast TimeoutStopSec. Send errors are
// logged, not returned: a missed extension only lets systemd's own timeout
// apply. It returns when ctx is done.
func (n *Notifier) KeepExtending(ctx context.Context, d time.Duration) {
	if n.addr == nil || d <= 0 {
		return
	}
	t := time.NewTicker(d / 2)
	defer t.Stop()
	for {
		if err := n.ExtendTimeout(d); err != nil {
			n.log.Warn("systemd: extending the timeout failed", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// RunWatchdog pings systemd's watchdog (WATCHDOG=1) every half of
// WATCHDOG_USEC, but only after alive answered nil within a quarter of
// WATCHDOG_USEC. alive should be a round trip through the supervision loop
// (e.g. a request its select loop answers), so a wedged loop stops the pings
// and systemd restarts the hive; an independent ticker that always pings
// would defeat the watchdog.
//
// At most one alive call is outstanding: while one hangs, no new one starts
// and no ping is sent; a late answer is discarded. alive gets a context that
// ends at its deadline. RunWatchdog returns nil at once when systemd set no
// watchdog for this process, and nil when ctx is done.
func (n *Notifier) RunWatchdog(ctx context.Context, alive func(ctx context.Context) error) error {
	if n.addr == nil || n.watchdog <= 0 {
		return nil
	}
	if alive == nil {
		return errors.New("systemd watchdog: alive func is nil")
	}
	interval, budget := n.watchdog/2, n.watchdog/4
	type answer struct {
		err  error
		late bool
	}
	answers := make(chan answer, 1) // buffered: a late answer never blocks its goroutine
	check := func() {
		start := time.Now()
		cctx, cancel := context.WithTimeout(ctx, budget)
		defer cancel()
		err := alive(cctx)
		answers <- answer{err: err, late: time.Since(start) > budget}
	}

	healthy := true // log on transitions only
	setHealthy := func(ok bool, msg string, args ...any) {
		if ok != healthy {
			healthy = ok
			if ok {
				n.log.Info("systemd watchdog: supervision loop answers again; pings resumed")
			} else {
				n.log.Error(msg, args...)
			}
		}
	}

	pending := true
	go check()
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case a := <-answers:
			pending = false
			switch {
			case a.late:
				setHealthy(false, "systemd watchdog: supervision loop answered too late; ping withheld", "budget", budget)
			case a.err != nil:
				setHealthy(false, "systemd watchdog: liveness check failed; ping withheld", "error", a.err)
			default:
				if err := n.send(daemon.SdNotifyWatchdog); err != nil {
					n.log.Warn("systemd watchdog: ping failed", "error", err)
					continue
				}
				setHealthy(true, "")
			}
		case <-t.C:
			if pending {
				setHealthy(false, "systemd watchdog: supervision loop does not answer; pings withheld", "budget", budget)
				continue
			}
			pending = true
			go check()
		}
	}
}

// notifySendTimeout bounds one datagram to the manager.
const notifySendTimeout = 2 * time.Second

// send writes one datagram to the manager's socket. A fresh socket per call
// (as go-systemd does) keeps no state that a manager restart could break.
func (n *Notifier) send(state string) error {
	if n.addr == nil {
		return nil
	}
	conn, err := net.DialUnix("unixgram", nil, n.addr)
	if err != nil {
		return fmt.Errorf("sd_notify %s: %w", firstKey(state), err)
	}
	defer conn.Close()
	// A datagram to a manager whose queue is full blocks; bounded, so that
	// STOPPING=1 or a status update cannot hang the hive's shutdown.
	_ = conn.SetWriteDeadline(time.Now().Add(notifySendTimeout))
	if _, err := conn.Write([]byte(state)); err != nil {
		return fmt.Errorf("sd_notify %s: %w", firstKey(state), err)
	}
	return nil
}

// firstKey names a message in errors without echoing free text.
func firstKey(state string) string {
	if k, _, ok := strings.Cut(state, "="); ok {
		return k
	}
	return state
}
