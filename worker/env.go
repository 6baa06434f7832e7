// Package worker is the worker side of the rbee-hive protocol: READY=1,
// heartbeats (WATCHDOG=1 plus RBEE_HEALTH and RBEE_* figures), STATUS= and
// STOPPING=1 over the sd_notify datagram socket named by NOTIFY_SOCKET, with
// an HTTP fallback (POST /v1/workers/ready, POST /v1/heartbeat) when the hive
// gives a URL and token instead of a socket.
//
// The wire format is exactly sd_notify's, so the same worker runs under
// systemd (Type=notify, WatchdogSec=) unchanged, and any sd_notify client
// (go-systemd's daemon.SdNotify, systemd-notify, libsystemd) can stand in
// for this package. It depends on nothing else of rbee-hive.
package worker

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"
)

// Environment variable names of the worker contract.
const (
	EnvWorkerID     = "RBEE_WORKER_ID"
	EnvNotifySocket = "NOTIFY_SOCKET"
	EnvWatchdogUSec = "WATCHDOG_USEC"
	EnvWatchdogPID  = "WATCHDOG_PID"
	EnvHiveURL      = "RBEE_HIVE_URL"
	EnvWorkerToken  = "RBEE_WORKER_TOKEN"
)

// DefaultHeartbeatInterval is used when WATCHDOG_USEC is absent: half the
// hive's default 60 s stale threshold.
const DefaultHeartbeatInterval = 30 * time.Second

// Env is the worker contract as read from the environment.
type Env struct {
	WorkerID     string
	NotifySocket string        // path, or "@name" for the abstract namespace
	Watchdog     time.Duration // the stale threshold (WATCHDOG_USEC); 0 when absent
	HiveURL      string
	Token        string
}

// Mode says how a Notifier reaches the hive.
type Mode int

const (
	ModeNone   Mode = iota // nothing configured: every call is a silent no-op
	ModeSocket             // sd_notify datagrams to NOTIFY_SOCKET
	ModeHTTP               // POST to RBEE_HIVE_URL with RBEE_WORKER_TOKEN
)

func (m Mode) String() string {
	switch m {
	case ModeSocket:
		return "socket"
	case ModeHTTP:
		return "http"
	default:
		return "none"
	}
}

// Mode reports which transport this environment selects. The socket wins
// when both are given; HTTP needs both URL and token.
func (e Env) Mode() Mode {
	switch {
	case e.NotifySocket != "":
		return ModeSocket
	case e.HiveURL != "" && e.Token != "":
		return ModeHTTP
	default:
		return ModeNone
	}
}

// HeartbeatInterval is half the watchdog timeout, as sd_watchdog_enabled(3)
// recommends, or DefaultHeartbeatInterval when none was given.
func (e Env) HeartbeatInterval() time.Duration {
	if e.Watchdog <= 0 {
		return DefaultHeartbeatInterval
	}
	return e.Watchdog / 2
}

// ParseEnv reads the contract through lookup (os.LookupEnv in production).
// WATCHDOG_USEC is ignored when WATCHDOG_PID names another process, as
// systemd does, so a value inherited from a parent is never acted on.
func ParseEnv(lookup func(string) (string, bool)) (Env, error) {
	get := func(k string) string {
		v, _ := lookup(k)
		return v
	}
	e := Env{
		WorkerID:     get(EnvWorkerID),
		NotifySocket: get(EnvNotifySocket),
		HiveURL:      get(EnvHiveURL),
		Token:        get(EnvWorkerToken),
	}
	if s := get(EnvWatchdogUSec); s != "" {
		usec, err := strconv.ParseUint(s, 10, 63)
		if err != nil || usec == 0 {
			return e, fmt.Errorf("worker: bad %s=%q: want a positive integer of microseconds", EnvWatchdogUSec, s)
		}
		if usec > uint64(365*24*time.Hour/time.Microsecond) {
			return e, fmt.Errorf("worker: %s=%q is more than a year", EnvWatchdogUSec, s)
		}
		e.Watchdog = time.Duration(usec) * time.Microsecond
		if p := get(EnvWatchdogPID); p != "" {
			pid, err := strconv.Atoi(p)
			if err != nil {
				return e, fmt.Errorf("worker: bad %s=%q: %w", EnvWatchdogPID, p, err)
			}
			if pid != os.Getpid() {
				e.Watchdog = 0
			}
		}
	}
	if len(e.NotifySocket) > 0 && e.NotifySocket[0] != '/' && e.NotifySocket[0] != '@' {
		return e, fmt.Errorf("worker: %s=%q: want an absolute path or @abstract name", EnvNotifySocket, e.NotifySocket)
	}
	return e, nil
}

// EnvFromOS is ParseEnv(os.LookupEnv).
func EnvFromOS() (Env, error) { return ParseEnv(os.LookupEnv) }

// ErrHiveUnavailable wraps send failures that are expected while the hive
// restarts (ECONNREFUSED, ENOENT on the socket, connection refused or 5xx
// over HTTP). Heartbeat loops keep going through them.
var ErrHiveUnavailable = errors.New("worker: hive unavailable")
