package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strings"
	"syscall"
	"time"
	"unicode/utf8"
)

// MaxDatagram is the hive's limit for one notify datagram; longer ones are
// dropped by the hive, so heartbeats are trimmed to fit (figures go first).
const MaxDatagram = 4096

// maxKeyLen is the hive's limit for one key; a longer key makes it drop the
// whole datagram as malformed.
const maxKeyLen = 64

// sendTimeout bounds one datagram write or HTTP call when ctx has no earlier
// deadline: a wedged hive must not wedge the worker's heartbeat loop.
const sendTimeout = 5 * time.Second

// HealthStatus is RBEE_HEALTH / health_status.
type HealthStatus string

const (
	Healthy  HealthStatus = "healthy"
	Degraded HealthStatus = "degraded"
)

// Health is what a worker reports with each heartbeat.
type Health struct {
	Status HealthStatus // empty means Healthy
	// Figures are extra RBEE_* fields (e.g. "RBEE_TOKENS_PER_SEC": "41.5").
	// Keys without the RBEE_ prefix get it; keys that are not 1..64 of
	// [A-Z0-9_] after upper-casing, and values that contain a newline or a
	// NUL or are not UTF-8, are skipped: the hive drops a whole datagram
	// with any of those, heartbeat included.
	Figures map[string]string
}

// HealthFunc is called before every heartbeat.
type HealthFunc func(ctx context.Context) Health

// ReadyInfo is the body of the HTTP ready callback (POST /v1/workers/ready). Over the
// socket only READY=1 is sent: the hive already knows who the sender is.
type ReadyInfo struct {
	URL      string `json:"url"`
	ModelRef string `json:"model_ref"`
	Backend  string `json:"backend"`
	Device   uint32 `json:"device"`
}

// Notifier talks to the hive. The zero value is not usable; use New or
// FromEnv. It is safe for concurrent use.
type Notifier struct {
	env  Env
	http *http.Client
	now  func() time.Time
}

// Option configures a Notifier.
type Option func(*Notifier)

// WithHTTPClient sets the client for the HTTP fallback.
func WithHTTPClient(c *http.Client) Option { return func(n *Notifier) { n.http = c } }

// New returns a Notifier for env.
func New(env Env, opts ...Option) *Notifier {
	n := &Notifier{env: env, http: &http.Client{Timeout: sendTimeout}, now: time.Now}
	for _, o := range opts {
		o(n)
	}
	return n
}

// FromEnv is New(EnvFromOS()).
func FromEnv(opts ...Option) (*Notifier, error) {
	env, err := EnvFromOS()
	if err != nil {
		return nil, err
	}
	return New(env, opts...), nil
}

// Env returns the contract this Notifier was built from.
func (n *Notifier) Env() Env { return n.env }

// Mode reports the transport in use.
func (n *Notifier) Mode() Mode { return n.env.Mode() }

// Ready tells the hive the worker has loaded and serves. Socket: READY=1.
// HTTP: POST /v1/workers/ready with info.
func (n *Notifier) Ready(ctx context.Context, info ReadyInfo) error {
	switch n.Mode() {
	case ModeSocket:
		return n.Notify(ctx, KeyReady+"=1")
	case ModeHTTP:
		body := struct {
			WorkerID string `json:"worker_id"`
			ReadyInfo
		}{n.env.WorkerID, info}
		return n.post(ctx, PathReady, body)
	}
	return nil
}

// Status sends STATUS=<s> (newlines become spaces, bytes that are not
// UTF-8 become U+FFFD, since the hive drops such a datagram; cut to fit one
// datagram). No-op over HTTP, which has no such route.
func (n *Notifier) Status(ctx context.Context, s string) error {
	if n.Mode() != ModeSocket {
		return nil
	}
	s = KeyStatus + "=" + strings.ToValidUTF8(strings.NewReplacer("\n", " ", "\r", " ", "\x00", " ").Replace(s), "\uFFFD")
	if len(s) > MaxDatagram {
		s = strings.ToValidUTF8(s[:MaxDatagram], "")
	}
	return n.Notify(ctx, s)
}

// Stopping sends STOPPING=1 at the start of a graceful shutdown. No-op over
// HTTP.
func (n *Notifier) Stopping(ctx context.Context) error {
	if n.Mode() != ModeSocket {
		return nil
	}
	return n.Notify(ctx, KeyStopping+"=1")
}

// Heartbeat sends one heartbeat with h. Socket: WATCHDOG=1, RBEE_HEALTH and
// the figures. HTTP: POST /v1/heartbeat {worker_id,timestamp,health_status}.
func (n *Notifier) Heartbeat(ctx context.Context, h Health) error {
	status := h.Status
	if status != Degraded {
		status = Healthy
	}
	switch n.Mode() {
	case ModeSocket:
		return n.Notify(ctx, HeartbeatMessage(status, h.Figures))
	case ModeHTTP:
		body := struct {
			WorkerID     string       `json:"worker_id"`
			Timestamp    string       `json:"timestamp"`
			HealthStatus HealthStatus `json:"health_status"`
		}{n.env.WorkerID, n.now().UTC().Format(time.RFC3339), status}
		return n.post(ctx, PathHeartbeat, body)
	}
	return nil
}

// HeartbeatMessage builds the datagram text: WATCHDOG=1, RBEE_HEALTH, then
// the valid figures in key order, stopping before MaxDatagram is exceeded.
func HeartbeatMessage(status HealthStatus, figures map[string]string) string {
	var b strings.Builder
	b.WriteString(KeyWatchdog + "=1\n" + KeyHealth + "=")
	b.WriteString(string(status))
	keys := make([]string, 0, len(figures))
	for k := range figures {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		v := figures[k]
		key, ok := figureKey(k)
		if !ok || strings.ContainsAny(v, "\n\x00") || !utf8.ValidString(v) || key == KeyHealth {
			continue
		}
		if b.Len()+1+len(key)+1+len(v) > MaxDatagram {
			break
		}
		b.WriteByte('\n')
		b.WriteString(key)
		b.WriteByte('=')
		b.WriteString(v)
	}
	return b.String()
}

func figureKey(k string) (string, bool) {
	k = strings.ToUpper(k)
	if !strings.HasPrefix(k, FigurePrefix) {
		k = FigurePrefix + k
	}
	if len(k) == len(FigurePrefix) || len(k) > maxKeyLen {
		return "", false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
		if !(c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return "", false
		}
	}
	return k, true
}

// Notify sends one raw sd_notify datagram (newline-separated KEY=VALUE) to
// NOTIFY_SOCKET. Like sd_notify(3) it dials afresh each time, so a hive that
// re-created its socket is reached again. It returns nil when there is no
// socket, and an error wrapping ErrHiveUnavailable (and the errno) when the
// socket is missing or nobody listens.
func (n *Notifier) Notify(ctx context.Context, state string) error {
	if n.env.NotifySocket == "" {
		return nil
	}
	if len(state) > MaxDatagram {
		return fmt.Errorf("worker: notify message of %d bytes exceeds %d", len(state), MaxDatagram)
	}
	// Go maps a leading '@' to the abstract namespace, as sd_notify does.
	addr := &net.UnixAddr{Name: n.env.NotifySocket, Net: "unixgram"}
	conn, err := net.DialUnix("unixgram", nil, addr)
	if err != nil {
		return wrapSendErr(err)
	}
	defer conn.Close()
	deadline := time.Now().Add(sendTimeout)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	// A connected datagram socket blocks when the receiver's queue is full;
	// the deadline keeps a stalled hive from stalling us.
	if err := conn.SetWriteDeadline(deadline); err != nil {
		return fmt.Errorf("worker: notify: %w", err)
	}
	if _, err := conn.Write([]byte(state)); err != nil {
		return wrapSendErr(err)
	}
	return nil
}

func wrapSendErr(err error) error {
	if errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("%w: %w", ErrHiveUnavailable, err)
	}
	return fmt.Errorf("worker: notify: %w", err)
}

func (n *Notifier) post(ctx context.Context, path string, body any) error {
	buf, err := json.Marshal(body)
	if err != nil {
		return fmt.Errorf("worker: encode %s: %w", path, err)
	}
	url := strings.TrimRight(n.env.HiveURL, "/") + path
	ctx, cancel := context.WithTimeout(ctx, sendTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(buf))
	if err != nil {
		return fmt.Errorf("worker: %s: %w", path, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+n.env.Token)
	resp, err := n.http.Do(req)
	if err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return fmt.Errorf("%w: %w", ErrHiveUnavailable, err)
		}
		return fmt.Errorf("worker: POST %s: %w", path, err)
	}
	defer resp.Body.Close()
	msg, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	if resp.StatusCode/100 == 2 {
		return nil
	}
	err = fmt.Errorf("worker: POST %s: %s: %s", path, resp.Status, bytes.TrimSpace(msg))
	if resp.StatusCode >= 500 {
		return fmt.Errorf("%w: %w", ErrHiveUnavailable, err)
	}
	return err
}

// RunHeartbeat sends a heartbeat now and then every HeartbeatInterval until
// ctx ends, asking health (may be nil: always healthy) each time. Send
// errors go to onErr (may be nil) and never stop the loop, so a worker
// rides through a hive restart. It returns nil when ctx ends, at once when
// there is no hive to talk to.
func (n *Notifier) RunHeartbeat(ctx context.Context, health HealthFunc, onErr func(error)) error {
	if n.Mode() == ModeNone {
		return nil
	}
	t := time.NewTicker(n.env.HeartbeatInterval())
	defer t.Stop()
	for {
		h := Health{Status: Healthy}
		if health != nil {
			h = health(ctx)
		}
		if err := n.Heartbeat(ctx, h); err != nil && onErr != nil && ctx.Err() == nil {
			onErr(err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
