package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
)

// daemonFlags are the daemon's command-line flags; they override the file.
type daemonFlags struct {
	configPath string
	listen     string
	tokenFile  string
	logFormat  string
	logLevel   string
	demo       bool
}

func parseDaemonFlags(args []string) (daemonFlags, error) {
	var f daemonFlags
	fs := flag.NewFlagSet("daemon", flag.ContinueOnError)
	fs.StringVar(&f.configPath, "config", "", "TOML config file (default: built-in defaults)")
	fs.StringVar(&f.listen, "listen", "", "HTTP listen address (default 127.0.0.1:9200)")
	fs.StringVar(&f.tokenFile, "token-file", "", "file holding the API token")
	fs.StringVar(&f.logFormat, "log-format", "", "auto, text, json or journal")
	fs.StringVar(&f.logLevel, "log-level", "", "debug, info, warn or error")
	fs.BoolVar(&f.demo, "demo", false, "spawn one demo worker (backend sim) at start")
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, fmt.Errorf("%w: daemon takes no arguments, got %q", errUsage, fs.Args())
	}
	return f, nil
}

// loadDaemonConfig applies the flags over the file over the defaults.
func loadDaemonConfig(f daemonFlags) (config.Config, error) {
	cfg, err := config.Load(f.configPath, os.Geteuid() == 0)
	if err != nil {
		return cfg, err
	}
	if f.listen != "" {
		cfg.Listen = f.listen
	}
	if f.tokenFile != "" {
		cfg.TokenFile = f.tokenFile
	}
	for _, o := range []struct {
		val string
		dst interface{ UnmarshalText([]byte) error }
	}{{f.logFormat, &cfg.LogFormat}, {f.logLevel, &cfg.LogLevel}} {
		if o.val != "" {
			if err := o.dst.UnmarshalText([]byte(o.val)); err != nil {
				return cfg, fmt.Errorf("flag: %w", err)
			}
		}
	}
	return cfg, nil
}

func runDaemon(ctx context.Context, args []string, stderr io.Writer) error {
	// SIGHUP's default action ends the process: catch it before anything
	// else, so that a HUP sent while the hive starts does not kill it either.
	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	f, err := parseDaemonFlags(args)
	if err != nil {
		return err
	}
	cfg, err := loadDaemonConfig(f)
	if err != nil {
		return err
	}
	log, closeLog, err := newLogger(cfg, stderr)
	if err != nil {
		return err
	}
	defer closeLog()
	go ignoreHUP(ctx, hup, log)
	err = serveDaemon(ctx, &cfg, log, f.demo)
	if err != nil {
		log.Error("hive stopped with an error", "err", err)
	}
	return err
}

// serveDaemon runs the hive until ctx ends, then drains and stops.
func serveDaemon(ctx context.Context, cfg *config.Config, log *slog.Logger, demo bool) error {
	token, source, err := loadToken(cfg.TokenFile, cfg.StateDir, os.Getenv)
	if err != nil {
		return err
	}
	log.Info("api token loaded", "source", string(source), "fingerprint", api.Fingerprint(token))
	// A backend whose program is missing would fail every spawn; fail here.
	// The built-in demo backend only warns: a hive installed without
	// rbee-simworker must still start.
	for _, name := range cfg.BackendNames() {
		if err := cfg.CheckCommand(name, selfDir()); err != nil {
			if !cfg.BuiltinBackend(name) {
				return err
			}
			log.Warn("built-in backend unavailable: its spawns will fail", "backend", name, "err", err)
		}
	}

	reg := prometheus.NewRegistry()
	reg.MustRegister(
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		buildInfo(),
	)
	rt := api.NewRouter(log)
	if err := rt.CountErrors(reg); err != nil {
		return err
	}
	auth := api.Authenticator{Token: token}
	apiAuth := func(r *http.Request) *api.Error { return auth.Check(r) }

	// A certificate that cannot be read stops the hive here, before it
	// binds or starts anything.
	tlsCfg, err := loadTLS(cfg)
	if err != nil {
		return err
	}
	// Bind first: a hive that cannot serve its API must not start workers.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return fmt.Errorf("listen %s: %w", cfg.Listen, err)
	}
	defer ln.Close()
	var mln net.Listener
	if cfg.MetricsListen != "" {
		if mln, err = net.Listen("tcp", cfg.MetricsListen); err != nil {
			return fmt.Errorf("metrics_listen %s: %w", cfg.MetricsListen, err)
		}
		defer mln.Close()
	}
	scheme := "http://"
	if tlsCfg != nil {
		scheme = "https://"
	}
	h, err := newHive(ctx, cfg, log, reg, scheme+advertised(cfg.Listen, ln.Addr()))
	if err != nil {
		return err
	}
	defer h.close()

	routes := h.routeTable(reg, log, apiAuth)
	if err := rt.Register(apiAuth, routes...); err != nil {
		return err
	}

	srv := &http.Server{
		Handler:           rt,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		// No WriteTimeout: SSE streams (inference, download progress) are long-lived.
		IdleTimeout:    120 * time.Second,
		MaxHeaderBytes: 64 << 10,
		ErrorLog:       slog.NewLogLogger(log.Handler(), slog.LevelWarn),
		// Requests must not inherit the signal context: SIGTERM would cancel
		// every in-flight stream instead of letting Shutdown drain it.
		BaseContext: func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
		TLSConfig:   tlsCfg,
	}
	if mln != nil {
		msrv, err := metricsServer(log, apiAuth, routes)
		if err != nil {
			return err
		}
		go func() {
			if err := msrv.Serve(mln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics listener failed; the API goes on", "addr", mln.Addr().String(), "err", err)
			}
		}()
		defer msrv.Close()
		log.Info("metrics listening", "addr", mln.Addr().String(), "paths", "GET /metrics, GET /v1/health")
	}
	serveErr := make(chan error, 1)
	if tlsCfg != nil {
		go func() { serveErr <- srv.ServeTLS(ln, "", "") }()
	} else {
		go func() { serveErr <- srv.Serve(ln) }()
	}
	log.Info("hive listening", "addr", ln.Addr().String(), "tls", tlsCfg != nil, "version", version, "state_dir", cfg.StateDir)
	h.ready()
	if demo {
		if err := h.spawnDemo(ctx); err != nil {
			log.Error("demo worker not started", "err", err)
		}
	}

	return serveUntil(ctx, log, srv, serveErr, h.shutdown, h.px.Drain)
}

// loadTLS reads tls_cert and tls_key (nil, nil when neither is set). The
// certificate is read once: a renewed one takes a restart.
func loadTLS(cfg *config.Config) (*tls.Config, error) {
	if cfg.TLSCert == "" && cfg.TLSKey == "" {
		return nil, nil
	}
	cert, err := tls.LoadX509KeyPair(cfg.TLSCert, cfg.TLSKey)
	if err != nil {
		return nil, fmt.Errorf("tls_cert %s / tls_key %s: %w", cfg.TLSCert, cfg.TLSKey, err)
	}
	return &tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12}, nil
}

// metricsOnly are the routes the metrics listener serves: no token, and
// nothing that changes or reveals more than /metrics already does.
var metricsOnly = map[string]bool{"GET /metrics": true, "GET /v1/health": true}

// metricsServer serves the public routes of the route table on the
// separate metrics listener; every other path there is a 404.
func metricsServer(log *slog.Logger, apiAuth api.AuthFunc, routes []api.Route) (*http.Server, error) {
	mrt := api.NewRouter(log)
	var keep []api.Route
	for _, r := range routes {
		if metricsOnly[r.Pattern] {
			if r.Auth != api.AuthPublic {
				return nil, fmt.Errorf("metrics listener: route %s is not public", r.Pattern)
			}
			keep = append(keep, r)
		}
	}
	if len(keep) != len(metricsOnly) {
		return nil, fmt.Errorf("metrics listener: found %d of its %d routes in the route table", len(keep), len(metricsOnly))
	}
	if err := mrt.Register(apiAuth, keep...); err != nil {
		return nil, err
	}
	return &http.Server{
		Handler:           mrt,
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    16 << 10,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelWarn),
	}, nil
}

// httpDrainTimeout bounds how long in-flight API requests may run after a
// stop signal before the server closes their connections.
const httpDrainTimeout = 10 * time.Second

// serveUntil waits until ctx ends or the HTTP server fails. Either way the
// workers are stopped (stopWorkers: the ordered drain) before it returns:
// a hive whose API died must not leave its workers running unsupervised.
// On ctx's end the server first stops taking requests, so in-flight API
// calls finish against a live supervisor.
//
// drainStreams, when set, runs a second before the HTTP drain deadline:
// inference streams still open then end with an error event and [DONE], not
// a cut connection.
func serveUntil(ctx context.Context, log *slog.Logger, srv *http.Server, serveErr <-chan error, stopWorkers, drainStreams func()) error {
	var failed error
	select {
	case <-ctx.Done():
		log.Info("shutting down")
		drain, cancel := context.WithTimeout(context.Background(), httpDrainTimeout)
		defer cancel()
		if drainStreams != nil {
			defer time.AfterFunc(httpDrainTimeout-time.Second, drainStreams).Stop()
		}
		if err := srv.Shutdown(drain); err != nil {
			log.Warn("http drain incomplete", "err", err)
			_ = srv.Close()
		}
	case err := <-serveErr:
		failed = fmt.Errorf("http server: %w", err)
		log.Error("http server failed; stopping the workers", "err", err)
		if drainStreams != nil {
			drainStreams()
		}
		_ = srv.Close()
	}
	stopWorkers()
	if failed != nil {
		return failed
	}
	if err := <-serveErr; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("http server: %w", err)
	}
	log.Info("hive stopped")
	return nil
}

// ignoreHUP logs each SIGHUP until ctx ends. Reloading the configuration is
// not supported yet: a restart applies a new one.
func ignoreHUP(ctx context.Context, hup <-chan os.Signal, log *slog.Logger) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			log.Warn("SIGHUP received: configuration reload is not supported yet, ignoring it; restart the hive to apply a new configuration")
		}
	}
}

func buildInfo() prometheus.Collector {
	g := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "rbee_hive_build_info",
		Help: "Build information of the running hive; always 1.",
	}, []string{"version", "goversion"})
	g.WithLabelValues(version, runtime.Version()).Set(1)
	return g
}

// advertised is the hive address workers call back to: the bound address,
// with a wildcard host replaced by loopback.
func advertised(listen string, bound net.Addr) string {
	host, _, err := net.SplitHostPort(listen)
	_, port, perr := net.SplitHostPort(bound.String())
	if perr != nil {
		return listen
	}
	if err != nil || host == "" || host == "0.0.0.0" || host == "::" {
		host = "127.0.0.1"
	}
	return net.JoinHostPort(host, port)
}
