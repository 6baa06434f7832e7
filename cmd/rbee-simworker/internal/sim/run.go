package sim

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/rbee/rbee-hive/worker"
)

// Run is the whole worker: bind HTTP (if --port), load (alloc, sleep),
// READY=1, heartbeats, then wait for a signal or a fault. It returns the
// process exit code. sigs delivers SIGTERM/SIGINT (main wires
// signal.Notify); ctx ending is treated like SIGTERM.
func Run(ctx context.Context, cfg Config, n *worker.Notifier, sigs <-chan os.Signal, log *slog.Logger) int {
	start := time.Now()
	s := newState(cfg)
	log = log.With("worker_id", cfg.WorkerID)

	// Faults are timed from process start, so --crash-after shorter than
	// --load-time is a crash during load (a spawn failure).
	crash := timerC(cfg.CrashAfter)
	hang := timerC(cfg.HangAfter)

	var srv *http.Server
	var addr string
	if cfg.Port >= 0 {
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(cfg.Port)))
		if err != nil {
			log.Error("bind failed", "err", err)
			return ExitUsage
		}
		addr = ln.Addr().String()
		srv = &http.Server{Handler: s.Handler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("http serve", "err", err)
			}
		}()
		defer srv.Close()
		log.Info("listening", "addr", addr)
	}

	bg, stopBG := context.WithCancel(ctx)
	defer stopBG()
	notifyErr := func(what string) func(error) {
		return func(err error) { log.Warn("notify failed", "what", what, "err", err) }
	}
	send := func(what string, err error) {
		if err != nil {
			notifyErr(what)(err)
		}
	}

	send("status", n.Status(bg, "loading "+cfg.modelName()))
	if cfg.AllocMiB > 0 {
		s.held = allocate(cfg.AllocMiB)
		log.Info("allocated", "mib", cfg.AllocMiB, "rss_bytes", rssBytes())
	}
	loaded := timerC(cfg.LoadTime)
	if cfg.LoadTime == 0 {
		loaded = closedTimeC()
	}

	// Heartbeats get their own ctx so --hang-after can stop just them.
	hbCtx, stopHB := context.WithCancel(bg)
	defer stopHB()
	for {
		select {
		case <-loaded:
			loaded = nil
			s.ready.Store(true)
			url := ""
			if addr != "" {
				url = "http://" + addr
			}
			send("ready", n.Ready(bg, worker.ReadyInfo{URL: url, ModelRef: cfg.ModelRef, Backend: cfg.Backend, Device: uint32(cfg.Device)}))
			send("status", n.Status(bg, "ready"))
			log.Info("ready", "load_ms", time.Since(start).Milliseconds(), "notify", n.Mode().String())
			if !cfg.NoHeartbeat {
				go n.RunHeartbeat(hbCtx, s.healthFunc, notifyErr("heartbeat"))
			}
			if cfg.LeakMiBPerSec > 0 {
				go leak(bg, cfg.LeakMiBPerSec, nil)
			}
			if cfg.Chatter > 0 {
				go chatter(bg, cfg.Chatter, os.Stdout)
			}
		case <-crash:
			// Abrupt, like a segfaulting worker: no STOPPING=1, no drain.
			log.Error("crashing on purpose (--crash-after)", "after", cfg.CrashAfter)
			return ExitCrash
		case <-hang:
			hang = nil
			log.Warn("wedging on purpose (--hang-after): HTTP and heartbeats stop", "after", cfg.HangAfter)
			s.hang()
			stopHB()
		case sig := <-sigs:
			if sig == syscall.SIGTERM && cfg.IgnoreSIGTERM {
				log.Warn("ignoring SIGTERM (--ignore-sigterm)")
				continue
			}
			return s.shutdown(n, srv, log, fmt.Sprint(sig))
		case <-ctx.Done():
			return s.shutdown(n, srv, log, "context done")
		}
	}
}

func (s *state) shutdown(n *worker.Notifier, srv *http.Server, log *slog.Logger, why string) int {
	log.Info("stopping", "why", why)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := n.Stopping(ctx); err != nil {
		log.Warn("notify failed", "what", "stopping", "err", err)
	}
	if srv != nil {
		select {
		case <-s.hung:
			srv.Close() // wedged handlers never finish; drop their connections
		default:
			if err := srv.Shutdown(ctx); err != nil {
				log.Warn("http shutdown", "err", err)
			}
		}
	}
	return ExitOK
}

func (s *state) healthFunc(context.Context) worker.Health {
	busy := "0"
	if s.active.Load() > 0 {
		busy = "1"
	}
	return worker.Health{Status: worker.Healthy, Figures: map[string]string{
		"RBEE_BUSY":             busy,
		"RBEE_REQUESTS_TOTAL":   itoa(s.requests.Load()),
		"RBEE_TOKENS_OUT_TOTAL": itoa(s.tokensOut.Load()),
		"RBEE_RSS_BYTES":        itoa(rssBytes()),
	}}
}

// timerC fires once after d; nil (never) when d is 0.
func timerC(d time.Duration) <-chan time.Time {
	if d <= 0 {
		return nil
	}
	return time.After(d)
}

func closedTimeC() <-chan time.Time {
	c := make(chan time.Time, 1)
	c <- time.Now()
	return c
}

// chatter writes perSec numbered lines per second to w until ctx ends, in
// 10 ms batches; each write blocks as long as w does (a full pipe), so the
// sequence shows whether the worker was ever held up by its output.
func chatter(ctx context.Context, perSec int, w io.Writer) {
	t := time.NewTicker(10 * time.Millisecond)
	defer t.Stop()
	pad := strings.Repeat("c", 130)
	seq, owed := 0, 0.0
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		owed += float64(perSec) / 100
		for ; owed >= 1; owed-- {
			fmt.Fprintf(w, "chatter seq=%010d %s\n", seq, pad)
			seq++
		}
	}
}
