package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/coreos/go-systemd/v22/journal"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/admission"
	"github.com/rbee/rbee-hive/cgroup"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/gpu"
	"github.com/rbee/rbee-hive/model"
	"github.com/rbee/rbee-hive/procfs"
	"github.com/rbee/rbee-hive/proxy"
	"github.com/rbee/rbee-hive/router"
	"github.com/rbee/rbee-hive/supervisor"
	"github.com/rbee/rbee-hive/supervisor/notify"
	"github.com/rbee/rbee-hive/systemd"
)

// hive wires the supervisor's parts together and owns their lifetimes.
type hive struct {
	cfg      *config.Config
	log      *slog.Logger
	notifier *systemd.Notifier
	cgroups  cgroup.Manager
	gpus     gpu.GPUs
	ledger   *admission.Ledger
	models   *model.Store
	listener *notify.Listener
	journal  *systemd.WorkerJournal // nil without journald
	sup      *supervisor.Supervisor
	px       *proxy.Proxy
	// openai is the host's OpenAI endpoint (/openai/v1/), openaiHandler
	// its HTTP side.
	openai        *router.Router
	openaiHandler http.Handler

	ctx       context.Context // background loops; cancelled after the workers are stopped
	cancel    context.CancelFunc
	wg        sync.WaitGroup
	closeOnce sync.Once
}

// newHive builds every part; on error it releases what it built.
//
// notifyFile is the notify socket an in-place upgrade handed over (nil: none).
func newHive(ctx context.Context, cfg *config.Config, log *slog.Logger, reg *prometheus.Registry, hiveURL string, notifyFile *os.File) (h *hive, err error) {
	h = &hive{cfg: cfg, log: log}
	h.ctx, h.cancel = context.WithCancel(context.WithoutCancel(ctx))
	// built, not h: a failing `return nil, err` sets h to nil before this
	// runs, and a nil h would panic here and hide err.
	built := h
	defer func() {
		if err != nil {
			built.close()
		}
	}()
	if h.notifier, err = systemd.NewNotifier(log); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.StateDir, 0o750); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	h.cgroups, err = cgroup.New(cgroup.Options{Root: cfg.Cgroup.Root, MoveSelf: cfg.Cgroup.Root == ""})
	if err != nil {
		return nil, fmt.Errorf("cgroups (the hive needs root or a delegated cgroup): %w", err)
	}
	log.Info("cgroups ready", "mode", h.cgroups.Mode(), "root", h.cgroups.Root())

	if h.gpus, err = gpu.Open(string(cfg.GPU.Driver), fakeDevices(cfg)); err != nil {
		return nil, fmt.Errorf("gpu: %w", err)
	}
	mem, err := procfs.New("")
	if err != nil {
		return nil, err
	}
	h.ledger, err = admission.NewLedger(admission.Config{
		Memory:             mem,
		GPUs:               h.gpus,
		MemoryReserveBytes: uint64(cfg.Resources.MemoryReserve),
		MemoryMode:         memoryMode(cfg.Resources.MemoryAdmission),
		VRAMMarginBytes:    uint64(cfg.Resources.VRAMMargin),
		DiskPaths:          []string{cfg.ModelDir},
	})
	if err != nil {
		return nil, err
	}
	reg.MustRegister(h.ledger.Collector())

	h.models, err = model.New(model.Options{
		Dir:       cfg.ModelDir,
		FileRoots: cfg.Models.FileRoots,
		// The catalog names the paths the hive deletes: it lives in the state
		// dir, not in the model dir that a model-reading group can see.
		CatalogPath:  filepath.Join(cfg.StateDir, "catalog.db"),
		Endpoint:     cfg.Models.HFEndpoint,
		TokenFile:    cfg.Models.HFTokenFile,
		DiskReserve:  uint64(cfg.Resources.DiskReserve),
		MaxBytes:     uint64(cfg.Models.MaxBytes),
		StallTimeout: cfg.Models.StallTimeout.D(),
		Logger:       log.With("component", "models"),
		Registry:     reg,
		DiskChecker:  h.ledger.CheckDisk,
	})
	if err != nil {
		return nil, err
	}
	px, err := proxy.New(reg, proxy.Options{Logger: log.With("component", "proxy")})
	if err != nil {
		return nil, err
	}
	h.px = px

	// A socket handed over by rbee-hive-notify.socket keeps datagrams queued
	// while the hive restarts; otherwise the hive binds its own.
	if notifyFile != nil {
		h.listener, err = notify.FromFile(notifyFile) // a dup: the file is ours to close
		notifyFile.Close()
	} else {
		h.listener, err = notify.FromActivation()
	}
	switch {
	case errors.Is(err, notify.ErrNotActivated):
		h.listener, err = notify.Listen(cfg.Heartbeat.NotifySocket)
	case err == nil && h.listener.Addr() != cfg.Heartbeat.NotifySocket:
		// Workers must be told the socket the hive really reads; a .socket
		// unit's ListenDatagram= wins over a config that disagrees.
		log.Warn("notify socket from systemd differs from heartbeat.notify_socket; using systemd's",
			"socket", h.listener.Addr(), "configured", cfg.Heartbeat.NotifySocket)
		cfg.Heartbeat.NotifySocket = h.listener.Addr()
	}
	if err != nil {
		return nil, fmt.Errorf("notify socket: %w", err)
	}
	log.Info("notify socket ready", "addr", h.listener.Addr())

	deps := supervisor.Deps{
		Logger:   log,
		Cgroups:  h.cgroups,
		Registry: reg,
		SelfDir:  workerSelfDir(cfg, log),
		HiveURL:  hiveURL,
		Admitter: admitter{ledger: h.ledger, log: log},
		Models:   modelStore{store: h.models},
		Proxy:    proxyAdapter{px: px},
		NotifyDrops: func() map[string]uint64 {
			return h.listener.Stats().Dropped()
		},
	}
	if h.gpus.Backend() != gpu.DriverNone {
		deps.GPUs = gpuList{h.gpus}
	}
	if journal.Enabled() {
		h.journal = systemd.NewWorkerJournal(systemd.WorkerJournalOptions{})
		deps.LineSink = h.journal
	}
	reg.MustRegister(newHiveCollector(h.listener, h.journal))
	if h.sup, err = supervisor.New(cfg, deps); err != nil {
		return nil, err
	}
	// Workers an earlier hive left running are taken over first; what
	// matches no persisted worker is then killed as a leftover.
	if _, err := h.sup.Adopt(ctx); err != nil {
		log.Warn("adopting workers from the registry failed; they are killed as leftovers", "err", err)
	}
	n, err := h.sup.CleanLeftovers(ctx)
	if err != nil {
		return nil, fmt.Errorf("cleaning leftover workers: %w", err)
	}
	if n > 0 {
		log.Warn("cleaned leftover workers of a previous hive", "count", n)
	}
	if h.openai, err = h.newOpenAIRouter(router.Options{Registry: reg, Logger: log.With("component", "openai")}); err != nil {
		return nil, err
	}
	h.openaiHandler = h.openai.Handler()
	h.start()
	return h, nil
}

// start runs the background loops: supervision, the notify socket and the
// systemd watchdog.
func (h *hive) start() {
	h.goLoop("supervisor", h.sup.Run)
	h.goLoop("notify socket", func(ctx context.Context) error { return h.listener.Serve(ctx, h.sup.HandleNotify) })
	h.goLoop("watchdog", func(ctx context.Context) error { return h.notifier.RunWatchdog(ctx, h.sup.Alive) })
	h.goLoop("openai ttl", func(ctx context.Context) error { h.openai.Run(ctx, 0); return nil })
}

func (h *hive) goLoop(name string, fn func(context.Context) error) {
	h.wg.Add(1)
	go func() {
		defer h.wg.Done()
		if err := fn(h.ctx); err != nil && h.ctx.Err() == nil {
			h.log.Error("background loop stopped", "loop", name, "err", err)
		}
	}()
}

// ready tells systemd the hive serves: the socket is bound, the cgroup tree
// exists and leftovers are gone.
func (h *hive) ready() {
	if err := h.notifier.Ready(); err != nil {
		h.log.Warn("sd_notify READY failed", "err", err)
	}
	// STATUS= follows READY=1, and then only when the summary changes.
	if h.notifier.Enabled() {
		h.goLoop("status", func(ctx context.Context) error {
			t := time.NewTicker(time.Second)
			defer t.Stop()
			for {
				_ = h.notifier.Status(h.sup.Summary()) // sent only when it changes
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
			}
		})
	}
}

// shutdown stops every worker within the budget, then the loops.
func (h *hive) shutdown() {
	_ = h.notifier.Stopping()
	// Loads in flight are abandoned first, so none starts a worker the
	// drain below would miss.
	h.openai.Close()
	budget := h.cfg.Workers.ShutdownBudget.D() + h.cfg.Workers.GracePeriod.D()
	extend, stopExtending := context.WithCancel(h.ctx)
	go h.notifier.KeepExtending(extend, budget)
	ctx, cancel := context.WithTimeout(context.Background(), budget)
	h.sup.Shutdown(ctx) // logs its own summary line
	cancel()
	stopExtending()
}

// close releases everything; safe on a partly built hive.
func (h *hive) close() { h.closeOnce.Do(h.release) }

func (h *hive) release() {
	if h.openai != nil {
		h.openai.Close()
	}
	h.cancel()
	h.wg.Wait()
	if h.listener != nil {
		_ = h.listener.Close()
	}
	if h.models != nil {
		_ = h.models.Close()
	}
	if h.gpus != nil {
		_ = h.gpus.Close()
	}
	if h.journal != nil {
		h.journal.Close()
	}
}

// spawnDemo starts one worker of the sim backend, for `make run`. The
// simworker loads nothing; its model is a placeholder file in the model dir
// (the default models.file_roots; the store created the dir).
func (h *hive) spawnDemo(ctx context.Context) error {
	path := filepath.Join(h.cfg.ModelDir, "demo-model.gguf")
	if err := os.WriteFile(path, []byte("rbee-simworker demo placeholder\n"), 0o640); err != nil {
		return fmt.Errorf("demo model: %w", err)
	}
	dev := int64(0)
	res, err := h.sup.Spawn(ctx, supervisor.SpawnRequest{ModelRef: "file:" + path, Backend: "sim", Device: &dev})
	if err != nil {
		return err
	}
	h.log.Info("demo worker spawned", "worker_id", res.WorkerID, "url", res.URL)
	return nil
}

// workerSelfDir is {self_dir} for workers: selfDir, or, when workers (which
// run under uids of their own) cannot reach rbee-simworker there (a
// checkout under /root for `make run`), a copy in <state_dir>/bin.
func workerSelfDir(cfg *config.Config, log *slog.Logger) string {
	dir := selfDir()
	src := filepath.Join(dir, "rbee-simworker")
	if _, err := os.Stat(src); err != nil || supervisor.WorkersCanExec(cfg, src) == nil {
		return dir
	}
	bin := filepath.Join(cfg.StateDir, "bin")
	dst := filepath.Join(bin, "rbee-simworker")
	err := os.MkdirAll(bin, 0o755)
	if err == nil {
		err = copyExecutable(src, dst)
	}
	if err != nil {
		log.Warn("workers cannot reach rbee-simworker, and copying it failed", "path", src, "err", err)
		return dir
	}
	log.Info("workers cannot reach rbee-simworker where it is; using a copy", "path", src, "copy", dst)
	return bin
}

func copyExecutable(src, dst string) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// selfDir is where the rbee-hive binary lives: {self_dir} in backend commands.
func selfDir() string {
	exe, err := os.Executable()
	if err != nil {
		return "."
	}
	if p, err := filepath.EvalSymlinks(exe); err == nil {
		exe = p
	}
	return filepath.Dir(exe)
}

func memoryMode(m config.MemoryAdmission) admission.MemoryMode {
	if m == config.MemoryLimits {
		return admission.MemoryLimits
	}
	return admission.MemoryUsage
}
