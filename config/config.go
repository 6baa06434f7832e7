// Package config is rbee-hive's configuration: a TOML file whose every key has
// a default, so the daemon also starts with no file at all.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pelletier/go-toml/v2"

	"github.com/rbee/rbee-hive/internal/envpolicy"
	"github.com/rbee/rbee-hive/internal/workeruser"
)

// Config is the whole configuration. Field comments are the reference;
// docs/configuration.md mirrors them (config/readme_test.go checks it).
type Config struct {
	Listen     string    `toml:"listen" comment:"HTTP API address"`
	StateDir   string    `toml:"state_dir" comment:"api-token, worker logs, model catalog"`
	RuntimeDir string    `toml:"runtime_dir" comment:"notify socket"`
	ModelDir   string    `toml:"model_dir" comment:"downloaded models"`
	LogFormat  LogFormat `toml:"log_format" comment:"auto (journal under systemd, else text), text, json, journal"`
	LogLevel   LogLevel  `toml:"log_level" comment:"debug, info, warn, error"`
	TokenFile  string    `toml:"token_file" comment:"API token file; empty: $CREDENTIALS_DIRECTORY/api-token, $LLORCH_API_TOKEN, or <state_dir>/api-token (created)"`
	WorkerHost string    `toml:"worker_host" comment:"host workers bind to and that appears in their URLs"`
	// The optional second listener and TLS for the API listener.
	MetricsListen string `toml:"metrics_listen" comment:"optional second address serving only GET /metrics and /v1/health, without a token (e.g. \":9464\" for a Prometheus on another host while listen stays on loopback); empty: none"`
	TLSCert       string `toml:"tls_cert" comment:"PEM certificate (chain) for the API listener; with tls_key, both or neither; empty: plain HTTP"`
	TLSKey        string `toml:"tls_key" comment:"PEM private key for tls_cert"`

	Heartbeat Heartbeat          `toml:"heartbeat"`
	Workers   Workers            `toml:"workers"`
	Resources Resources          `toml:"resources"`
	Cgroup    Cgroup             `toml:"cgroup"`
	GPU       GPU                `toml:"gpu"`
	Models    Models             `toml:"models"`
	Backends  map[string]Backend `toml:"backends"`
	Served    map[string]Served  `toml:"served"`
}

// Heartbeat configures the notify socket and stale detection.
type Heartbeat struct {
	NotifySocket   string      `toml:"notify_socket" comment:"unixgram socket workers send sd_notify datagrams to; empty: <runtime_dir>/notify.sock"`
	Interval       Duration    `toml:"interval" comment:"health = http: how often a ready worker's health_path is polled (at least 100ms, below stale_threshold); workers are not told it"`
	StaleThreshold Duration    `toml:"stale_threshold" comment:"a ready worker silent this long is stale; workers get it as WATCHDOG_USEC (sd_notify workers ping at half of it)"`
	StaleAction    StaleAction `toml:"stale_action" comment:"restart, kill or mark"`
}

// Workers are the defaults for every worker.
type Workers struct {
	MemoryLimit    Size     `toml:"memory_limit" comment:"memory.max of a worker's cgroup unless the backend or request says otherwise"`
	PidsMax        int64    `toml:"pids_max" comment:"pids.max of a worker's cgroup"`
	GracePeriod    Duration `toml:"grace_period" comment:"SIGTERM to SIGKILL on stop (at least 100ms)"`
	ShutdownBudget Duration `toml:"shutdown_budget" comment:"all workers stopped within this on hive shutdown (at least 1s)"`
	PortMin        int      `toml:"port_min" comment:"first port handed to workers"`
	PortMax        int      `toml:"port_max" comment:"last port handed to workers"`
	LogMaxBytes    Size     `toml:"log_max_bytes" comment:"size of a worker's log file before rotation"`
	LogFiles       int      `toml:"log_files" comment:"rotated log files kept per worker"`
	Adopt          bool     `toml:"adopt" comment:"keep every worker in <state_dir>/workers.db and, at start, adopt those still running (false: kill them, as without a registry)"`
	Restart        Restart  `toml:"restart"`
	// Worker identities (docs/security.md).
	UIDRange   string `toml:"uid_range" comment:"uids handed out one per worker (gid = uid) to backends without user; no account in /etc/passwd, /etc/group, /etc/subuid or /etc/subgid may use them (checked at start)"`
	ModelGroup string `toml:"model_group" comment:"group (name or gid) every worker joins: it may traverse the state dir, read the model dir and use the notify socket; not a gid of uid_range, not 0"`
}

// Restart is the restart policy's timing.
type Restart struct {
	BackoffBase   Duration `toml:"backoff_base" comment:"first restart delay, doubled per consecutive failure (at least 10ms)"`
	BackoffMax    Duration `toml:"backoff_max" comment:"restart delay cap"`
	Jitter        float64  `toml:"jitter" comment:"± fraction of random jitter on each delay"`
	StableAfter   Duration `toml:"stable_after" comment:"running this long resets the failure count (at least 1s)"`
	MaxFailures   int      `toml:"max_failures" comment:"failures within failure_window that mark a worker failed"`
	FailureWindow Duration `toml:"failure_window" comment:"window of the circuit breaker (at least 1s)"`
}

// Resources configures admission control and monitoring.
type Resources struct {
	MemoryReserve   Size            `toml:"memory_reserve" comment:"RAM kept free for the host; spawns that would eat into it get 507"`
	MemoryAdmission MemoryAdmission `toml:"memory_admission" comment:"limits: the memory limits of all live workers plus the new one must fit in MemTotal − memory_reserve (never overcommits); usage: the new limit must fit in MemAvailable − memory_reserve − limits of workers still loading (packs more, a ready worker counts by its use)"`
	DiskReserve     Size            `toml:"disk_reserve" comment:"disk kept free on the model dir's filesystem"`
	VRAMMargin      Size            `toml:"vram_margin" comment:"added to each model's VRAM estimate"`
	SampleInterval  Duration        `toml:"sample_interval" comment:"how often worker RAM, CPU and VRAM are sampled (at least 1s)"`
	VRAMLimitFactor float64         `toml:"vram_limit_factor" comment:"a worker using more than estimate × factor VRAM is over its limit"`
	VRAMLimitAction Action          `toml:"vram_limit_action" comment:"log or kill"`
}

// Cgroup configures the cgroup tree.
type Cgroup struct {
	Root string `toml:"root" comment:"cgroup tree root; empty: the hive's own delegated cgroup (v2) or <own cgroup>/rbee-hive (v1); on v1 a relative path nests under the hive's own cgroup"`
}

// GPU selects the GPU driver.
type GPU struct {
	Driver GPUDriver `toml:"driver" comment:"auto (NVML if present), nvml, fake, none"`
	Fake   []FakeGPU `toml:"fake" comment:"devices of the fake driver (tests and demos)"`
}

// FakeGPU is one device of the fake GPU driver.
type FakeGPU struct {
	Name        string `toml:"name"`
	UUID        string `toml:"uuid"`
	MemoryTotal Size   `toml:"memory_total"`
}

// Models configures model downloads and retention.
type Models struct {
	MaxBytes     Size     `toml:"max_bytes" comment:"0: unlimited; else least-recently-used unused models are deleted to stay under it"`
	HFEndpoint   string   `toml:"hf_endpoint" comment:"HuggingFace endpoint; empty: $HF_ENDPOINT or https://huggingface.co"`
	HFTokenFile  string   `toml:"hf_token_file" comment:"file holding a HuggingFace token; empty: $HF_TOKEN"`
	StallTimeout Duration `toml:"stall_timeout" comment:"a download that receives nothing this long fails (at least 1s)"`
	FileRoots    []string `toml:"file_roots" comment:"absolute directories a file: model reference must lie below (symlinks may not leave them); empty: model_dir only"`
}

// Backend is a kind of worker the hive may start: a command template, never
// an arbitrary command line from a request.
type Backend struct {
	Command     []string          `toml:"command" comment:"argv; the program is an absolute path or {self_dir}/…, never looked up on PATH; placeholders {port} {model_path} {model_ref} {worker_id} {device} {self_dir}"`
	Health      HealthMode        `toml:"health" comment:"notify (READY=1 and heartbeats on the notify socket), http (poll health_path), callback (POST /v1/workers/ready)"`
	HealthPath  string            `toml:"health_path" comment:"for health = http: 200 means ready"`
	LoadTimeout Duration          `toml:"load_timeout" comment:"a worker not ready within this is killed (load_timeout); 0: 10m, else at least 1s"`
	MemoryLimit Size              `toml:"memory_limit" comment:"0: workers.memory_limit"`
	CUDA        bool              `toml:"cuda" comment:"gets CUDA_VISIBLE_DEVICES=<GPU UUID> and VRAM admission"`
	ContextSize int               `toml:"context_size" comment:"context length used for VRAM estimates"`
	Env         map[string]string `toml:"env" comment:"fixed environment for this backend"`
	EnvAllow    []string          `toml:"env_allow" comment:"environment keys a spawn request may set"`
	User        string            `toml:"user" comment:"empty: each worker gets its own uid from workers.uid_range; a system user name: every worker of this backend runs as it; root: runs as uid 0 (still without capabilities; warned at every spawn)"`
	Writable    []string          `toml:"writable" comment:"absolute paths the workers may write besides their own home (created if missing; made root:workers.model_group, mode 0770; under the systemd unit also list them in ReadWritePaths=)"`

	// The engine's protocol and shape (docs/engines.md).
	API              API  `toml:"api" comment:"rbee (POST /v1/inference) or openai (/v1/chat/completions, /v1/completions)"`
	NativeCompletion bool `toml:"native_completion" comment:"api = openai: also proxy llama.cpp's native POST /completion"`
	Parallel         int  `toml:"parallel" comment:"parallel sequences (slots) the engine serves, for memory estimates; 0: 1"`
}

// Served is a model the host's OpenAI endpoint (/openai/v1/) answers for
// under its table name: a request's "model" picks it, and the hive starts
// and stops its workers on demand.
type Served struct {
	Model       string   `toml:"model" comment:"model reference, as a spawn request names it (e.g. hf:org/repo/file.gguf or a path)"`
	Backend     string   `toml:"backend" comment:"one of the backends, with api = openai"`
	MemoryLimit Size     `toml:"memory_limit" comment:"0: the backend's"`
	ContextSize int      `toml:"context_size" comment:"0: the backend's"`
	Autoload    *bool    `toml:"autoload" comment:"start a worker when a request arrives and none is ready; false: only POST /openai/v1/models/NAME/load does"`
	TTL         Duration `toml:"ttl" comment:"an autoloaded worker idle this long is stopped; 0: never (else at least 1s)"`
	Pinned      bool     `toml:"pinned" comment:"its workers are never stopped to make room for another model"`
	MaxWorkers  int      `toml:"max_workers" comment:"workers of this model at most; 0: 1"`
	Queue       int      `toml:"queue" comment:"requests held while a worker loads or all are full; more get 503; 0: 64"`
	LoadTimeout Duration `toml:"load_timeout" comment:"a request waits this long for a worker, then gets 503; 0: the backend's load_timeout (else at least 1s)"`
}

// AutoloadOn reports the effective autoload setting (default true).
func (s Served) AutoloadOn() bool { return s.Autoload == nil || *s.Autoload }

// Placeholders a backend command may use.
var placeholders = []string{"{port}", "{model_path}", "{model_ref}", "{worker_id}", "{device}", "{self_dir}"}

// Default returns the built-in configuration. root selects the system paths
// (/var/lib, /run) over the XDG ones.
func Default(root bool) Config {
	state, runtime := "/var/lib/rbee-hive", "/run/rbee-hive"
	if !root {
		state = filepath.Join(xdg("XDG_STATE_HOME", ".local/state"), "rbee-hive")
		runtime = filepath.Join(xdg("XDG_RUNTIME_DIR", ".cache"), "rbee-hive")
	}
	// Under systemd, StateDirectory=/RuntimeDirectory= say where ours are
	// (per instance for rbee-hive@.service); they win over the guesses above.
	if d := firstDir(os.Getenv("STATE_DIRECTORY")); d != "" {
		state = d
	}
	if d := firstDir(os.Getenv("RUNTIME_DIRECTORY")); d != "" {
		runtime = d
	}
	return Config{
		Listen:     "127.0.0.1:9200",
		StateDir:   state,
		RuntimeDir: runtime,
		LogFormat:  "auto",
		LogLevel:   "info",
		WorkerHost: "127.0.0.1",
		Heartbeat: Heartbeat{
			Interval:       Duration(30 * time.Second),
			StaleThreshold: Duration(60 * time.Second),
			StaleAction:    StaleRestart,
		},
		Workers: Workers{
			MemoryLimit:    8 << 30,
			PidsMax:        4096,
			GracePeriod:    Duration(10 * time.Second),
			ShutdownBudget: Duration(30 * time.Second),
			PortMin:        8081,
			PortMax:        9000,
			LogMaxBytes:    10 << 20,
			LogFiles:       3,
			Adopt:          true,
			UIDRange:       "70000-79999",
			ModelGroup:     "69999",
			Restart: Restart{
				BackoffBase:   Duration(time.Second),
				BackoffMax:    Duration(60 * time.Second),
				Jitter:        0.2,
				StableAfter:   Duration(300 * time.Second),
				MaxFailures:   5,
				FailureWindow: Duration(300 * time.Second),
			},
		},
		Resources: Resources{
			MemoryReserve: 2 << 30,
			// A GPU host runs a few large workers whose RAM grows after
			// READY (KV cache, pinned host buffers, mmap'd weights paged
			// in): judged by use at READY they overcommit the host and the
			// OOM killer, not admission, picks a serving worker to die.
			// Limits turn that into a 507 at spawn time.
			MemoryAdmission: MemoryLimits,
			DiskReserve:     10 << 30,
			VRAMMargin:      512 << 20,
			SampleInterval:  Duration(5 * time.Second),
			VRAMLimitFactor: 1.5,
			VRAMLimitAction: "log",
		},
		GPU:    GPU{Driver: "auto"},
		Models: Models{StallTimeout: Duration(60 * time.Second)},
		Backends: map[string]Backend{
			"sim": {
				Command:     []string{"{self_dir}/rbee-simworker", "--port", "{port}", "--worker-id", "{worker_id}", "--model", "{model_path}"},
				Health:      HealthNotify,
				LoadTimeout: Duration(2 * time.Minute),
				MemoryLimit: 512 << 20,
			},
		},
	}
}

// firstDir returns the first of systemd's colon-separated directory list.
func firstDir(list string) string {
	d, _, _ := strings.Cut(list, ":")
	return d
}

func xdg(env, fallback string) string {
	if v := os.Getenv(env); v != "" {
		return v
	}
	home, err := os.UserHomeDir()
	if err != nil {
		home = os.TempDir()
	}
	return filepath.Join(home, fallback)
}

// Load reads the file at path over the defaults. An empty path means no
// file: the defaults alone. Errors name the file, line and key.
func Load(path string, root bool) (Config, error) {
	cfg := Default(root)
	if path == "" {
		return cfg, cfg.finish()
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("config: %w", err)
	}
	pos, err := scan(data)
	if err == nil {
		err = decode(data, &cfg)
	}
	if err != nil {
		var pe *posError
		if errors.As(err, &pe) {
			if pe.key == "" {
				return Config{}, fmt.Errorf("config %s:%d: %s", path, pe.line, pe.msg)
			}
			return Config{}, fmt.Errorf("config %s:%d: key %s: %s", path, pe.line, pe.key, pe.msg)
		}
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	if err := cfg.finish(); err != nil {
		var fe *fieldError
		if errors.As(err, &fe) {
			// A rule that ties keys together blames the one the file sets.
			for _, k := range append([]string{fe.key}, fe.related...) {
				if _, ok := pos[k]; ok {
					return Config{}, fmt.Errorf("config %s:%d: key %s: %s", path, pos[k].line, fe.key, fe.msg)
				}
			}
			if line := pos.line(fe.key); line > 0 {
				return Config{}, fmt.Errorf("config %s:%d: key %s: %s", path, line, fe.key, fe.msg)
			}
		}
		return Config{}, fmt.Errorf("config %s: %w", path, err)
	}
	return cfg, nil
}

// decode applies TOML over cfg, strictly: unknown keys are errors.
func decode(data []byte, cfg *Config) error {
	// A backend named in the file replaces the default one of that name
	// wholesale, but backend tables must start empty so their own defaults
	// apply; decode them into a fresh map and merge.
	defaults := cfg.Backends
	cfg.Backends = nil
	dec := toml.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(cfg); err != nil {
		var de *toml.DecodeError
		var se *toml.StrictMissingError
		switch {
		case errors.As(err, &se) && len(se.Errors) > 0:
			e := se.Errors[0]
			row, _ := e.Position()
			return &posError{line: row, key: strings.Join(e.Key(), "."), msg: "unknown key"}
		case errors.As(err, &de):
			row, _ := de.Position()
			return &posError{line: row, key: strings.Join(de.Key(), "."), msg: strings.TrimPrefix(de.Error(), "toml: ")}
		}
		return err
	}
	merged := make(map[string]Backend, len(defaults)+len(cfg.Backends))
	for k, v := range defaults {
		merged[k] = v
	}
	for k, v := range cfg.Backends {
		merged[k] = v
	}
	cfg.Backends = merged
	return nil
}

// posError is a decoding failure at a known line.
type posError struct {
	line     int
	key, msg string
}

func (e *posError) Error() string { return fmt.Sprintf("line %d: key %s: %s", e.line, e.key, e.msg) }

// fieldError is a validation failure of one key; related keys take part in
// the same rule and locate it when the file does not set key itself.
type fieldError struct {
	key, msg string
	related  []string
}

func (e *fieldError) Error() string { return "key " + e.key + ": " + e.msg }

func bad(key, format string, args ...any) error {
	return &fieldError{key: key, msg: fmt.Sprintf(format, args...)}
}

// badPair is bad for a rule between two keys.
func badPair(key, related, format string, args ...any) error {
	return &fieldError{key: key, msg: fmt.Sprintf(format, args...), related: []string{related}}
}

var backendName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]{0,63}$`)
var envKey = regexp.MustCompile(`^[A-Z_][A-Z0-9_]*$`)

// finish fills derived defaults and validates.
func (c *Config) finish() error {
	for _, p := range []struct{ key, val string }{{"state_dir", c.StateDir}, {"runtime_dir", c.RuntimeDir}} {
		if !filepath.IsAbs(p.val) {
			return bad(p.key, "%q must be an absolute path", p.val)
		}
	}
	if c.ModelDir == "" {
		c.ModelDir = filepath.Join(c.StateDir, "models")
	}
	if c.Heartbeat.NotifySocket == "" {
		c.Heartbeat.NotifySocket = filepath.Join(c.RuntimeDir, "notify.sock")
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return bad("listen", "%q is not host:port", c.Listen)
	}
	for _, p := range []struct{ key, val string }{{"model_dir", c.ModelDir}, {"heartbeat.notify_socket", c.Heartbeat.NotifySocket}} {
		if !filepath.IsAbs(p.val) {
			return bad(p.key, "%q must be an absolute path", p.val)
		}
	}
	if c.MetricsListen != "" {
		if _, _, err := net.SplitHostPort(c.MetricsListen); err != nil {
			return bad("metrics_listen", "%q is not host:port", c.MetricsListen)
		}
	}
	if (c.TLSCert == "") != (c.TLSKey == "") {
		if c.TLSCert == "" {
			return badPair("tls_cert", "tls_key", "must be set with tls_key (both or neither)")
		}
		return badPair("tls_key", "tls_cert", "must be set with tls_cert (both or neither)")
	}
	for _, p := range []struct{ key, val string }{{"tls_cert", c.TLSCert}, {"tls_key", c.TLSKey}} {
		if p.val != "" && !filepath.IsAbs(p.val) {
			return bad(p.key, "%q must be an absolute path", p.val)
		}
	}
	if len(c.Models.FileRoots) == 0 {
		c.Models.FileRoots = []string{filepath.Clean(c.ModelDir)}
	}
	for i, r := range c.Models.FileRoots {
		if !filepath.IsAbs(r) || filepath.Clean(r) != r {
			return bad("models.file_roots", "entry %d %q must be a clean absolute path", i+1, r)
		}
	}
	// go-toml decodes string-kinded types without calling UnmarshalText, so
	// the enums are checked here as well.
	for _, e := range []struct {
		key, val string
		dst      interface{ UnmarshalText([]byte) error }
	}{
		{"log_format", string(c.LogFormat), new(LogFormat)},
		{"log_level", string(c.LogLevel), new(LogLevel)},
		{"heartbeat.stale_action", string(c.Heartbeat.StaleAction), new(StaleAction)},
		{"resources.vram_limit_action", string(c.Resources.VRAMLimitAction), new(Action)},
		{"gpu.driver", string(c.GPU.Driver), new(GPUDriver)},
	} {
		if err := e.dst.UnmarshalText([]byte(e.val)); err != nil {
			return bad(e.key, "%v", err)
		}
	}
	if len(c.Heartbeat.NotifySocket) > 107 {
		return bad("heartbeat.notify_socket", "path longer than a unix socket allows (107 bytes)")
	}
	if err := c.checkBounds(); err != nil {
		return err
	}
	if c.Heartbeat.StaleThreshold <= c.Heartbeat.Interval {
		return badPair("heartbeat.stale_threshold", "heartbeat.interval", "%s must be longer than heartbeat.interval %s", c.Heartbeat.StaleThreshold.D(), c.Heartbeat.Interval.D())
	}
	w := c.Workers
	if w.PidsMax < 0 {
		return bad("workers.pids_max", "must not be negative")
	}
	if w.PortMin < 1024 || w.PortMin > 65535 {
		return bad("workers.port_min", "%d must lie within 1024-65535", w.PortMin)
	}
	if w.PortMax < 1024 || w.PortMax > 65535 {
		return bad("workers.port_max", "%d must lie within 1024-65535", w.PortMax)
	}
	if w.PortMin > w.PortMax {
		return badPair("workers.port_max", "workers.port_min", "%d is below workers.port_min %d", w.PortMax, w.PortMin)
	}
	if w.LogMaxBytes < 4096 {
		return bad("workers.log_max_bytes", "must be at least 4KiB")
	}
	if w.LogFiles < 1 {
		return bad("workers.log_files", "must be at least 1")
	}
	first, last, err := ParseUIDRange(w.UIDRange)
	if err != nil {
		return bad("workers.uid_range", "%v", err)
	}
	if err := checkGroup(w.ModelGroup, first, last); err != nil {
		return bad("workers.model_group", "%v", err)
	}
	r := w.Restart
	if r.BackoffMax < r.BackoffBase {
		return badPair("workers.restart.backoff_max", "workers.restart.backoff_base", "must not be below backoff_base")
	}
	if r.Jitter < 0 || r.Jitter >= 1 {
		return bad("workers.restart.jitter", "must be in [0, 1)")
	}
	if r.MaxFailures < 1 {
		return bad("workers.restart.max_failures", "must be at least 1")
	}
	if c.Resources.VRAMLimitFactor < 1 {
		return bad("resources.vram_limit_factor", "must be at least 1")
	}
	if err := new(MemoryAdmission).UnmarshalText([]byte(c.Resources.MemoryAdmission)); err != nil {
		return bad("resources.memory_admission", "%v", err)
	}
	if r := c.Cgroup.Root; r != "" && (filepath.Clean(r) != r || strings.Contains(r, "..")) {
		return bad("cgroup.root", "%q must be a clean path without '..'", r)
	}
	for i, g := range c.GPU.Fake {
		if g.MemoryTotal <= 0 {
			return bad(fmt.Sprintf("gpu.fake[%d].memory_total", i), "must be positive")
		}
	}
	if len(c.Backends) == 0 {
		return bad("backends", "at least one backend is needed")
	}
	for _, name := range c.BackendNames() {
		if err := c.finishBackend(name); err != nil {
			return err
		}
	}
	for _, name := range c.ServedNames() {
		if err := c.finishServed(name); err != nil {
			return err
		}
	}
	return nil
}

// Bounds of a served model's settings: the queue and workers are held in
// memory per model, so a typo of a few zeros is refused, not allocated.
const (
	maxServedWorkers = 64
	maxServedQueue   = 1 << 16
	minServedTTL     = time.Second
)

func (c *Config) finishServed(name string) error {
	s := c.Served[name]
	key := "served." + name
	// The name is a URL path segment and a metric label value.
	if !backendName.MatchString(name) {
		return bad(key, "served model names are lowercase letters, digits, '-' and '_'")
	}
	if strings.TrimSpace(s.Model) == "" {
		return bad(key+".model", "must name a model reference")
	}
	b, ok := c.Backends[s.Backend]
	if !ok {
		return bad(key+".backend", "%q is not a backend (known: %s)", s.Backend, strings.Join(c.BackendNames(), ", "))
	}
	// Requests are forwarded to the worker's OpenAI routes as they are.
	if b.API != APIOpenAI {
		return bad(key+".backend", "backend %q has api = %q; a served model needs one with api = \"openai\"", s.Backend, b.API)
	}
	if s.MemoryLimit < 0 {
		return bad(key+".memory_limit", "must not be negative")
	}
	if s.ContextSize < 0 {
		return bad(key+".context_size", "must not be negative")
	}
	if s.ContextSize == 0 {
		s.ContextSize = b.ContextSize
	}
	if s.Autoload == nil {
		on := true
		s.Autoload = &on
	}
	if s.TTL < 0 || (s.TTL > 0 && s.TTL.D() < minServedTTL) {
		return bad(key+".ttl", "%s: want 0 (never) or at least %s", s.TTL.D(), minServedTTL)
	}
	if s.MaxWorkers < 0 || s.MaxWorkers > maxServedWorkers {
		return bad(key+".max_workers", "%d must lie within 0-%d", s.MaxWorkers, maxServedWorkers)
	}
	if s.MaxWorkers == 0 {
		s.MaxWorkers = 1
	}
	if s.Queue < 0 || s.Queue > maxServedQueue {
		return bad(key+".queue", "%d must lie within 0-%d", s.Queue, maxServedQueue)
	}
	if s.Queue == 0 {
		s.Queue = 64
	}
	if s.LoadTimeout < 0 || (s.LoadTimeout > 0 && s.LoadTimeout.D() < minLoadTimeout) {
		return bad(key+".load_timeout", "%s is below the minimum %s", s.LoadTimeout.D(), minLoadTimeout)
	}
	if s.LoadTimeout == 0 {
		s.LoadTimeout = b.LoadTimeout
	}
	c.Served[name] = s
	return nil
}

// ServedNames returns the served model names, sorted.
func (c *Config) ServedNames() []string { return slices.Sorted(maps.Keys(c.Served)) }

// ServedMemoryLimit is the memory limit of a served model's workers.
func (c *Config) ServedMemoryLimit(name string) Size {
	if s, ok := c.Served[name]; ok && s.MemoryLimit > 0 {
		return s.MemoryLimit
	}
	return c.MemoryLimit(c.Served[name].Backend)
}

// Lower bounds of the durations. Zero or tiny values do not mean "off":
// they spin loops (sample_interval, heartbeat.interval), kill every worker
// at once (grace_period, shutdown_budget, load_timeout) or fail every
// download (stall_timeout). The minimums are documented in the field comments.
const (
	minHeartbeatInterval = 100 * time.Millisecond
	minSampleInterval    = time.Second
	minGracePeriod       = 100 * time.Millisecond
	minShutdownBudget    = time.Second
	minBackoffBase       = 10 * time.Millisecond
	minWindow            = time.Second // stable_after, failure_window
	minStallTimeout      = time.Second
	minLoadTimeout       = time.Second
)

// checkBounds rejects durations below their minimum and sizes that cannot
// be (negative; zero where a limit of nothing would break every worker).
func (c *Config) checkBounds() error {
	for _, d := range []struct {
		key string
		val Duration
		min time.Duration
	}{
		{"heartbeat.interval", c.Heartbeat.Interval, minHeartbeatInterval},
		{"resources.sample_interval", c.Resources.SampleInterval, minSampleInterval},
		{"workers.grace_period", c.Workers.GracePeriod, minGracePeriod},
		{"workers.shutdown_budget", c.Workers.ShutdownBudget, minShutdownBudget},
		{"workers.restart.backoff_base", c.Workers.Restart.BackoffBase, minBackoffBase},
		{"workers.restart.stable_after", c.Workers.Restart.StableAfter, minWindow},
		{"workers.restart.failure_window", c.Workers.Restart.FailureWindow, minWindow},
		{"models.stall_timeout", c.Models.StallTimeout, minStallTimeout},
	} {
		if d.val.D() < d.min {
			return bad(d.key, "%s is below the minimum %s", d.val.D(), d.min)
		}
	}
	for _, s := range []struct {
		key      string
		val      Size
		positive bool
	}{
		{"workers.memory_limit", c.Workers.MemoryLimit, true},
		{"workers.log_max_bytes", c.Workers.LogMaxBytes, true},
		{"resources.memory_reserve", c.Resources.MemoryReserve, false},
		{"resources.disk_reserve", c.Resources.DiskReserve, false},
		{"resources.vram_margin", c.Resources.VRAMMargin, false},
		{"models.max_bytes", c.Models.MaxBytes, false},
	} {
		switch {
		case s.val < 0:
			return bad(s.key, "must not be negative")
		case s.positive && s.val == 0:
			return bad(s.key, "must be positive")
		}
	}
	return nil
}

func (c *Config) finishBackend(name string) error {
	b := c.Backends[name]
	key := "backends." + name
	if !backendName.MatchString(name) {
		return bad(key, "backend names are lowercase letters, digits, '-' and '_'")
	}
	if len(b.Command) == 0 || b.Command[0] == "" {
		return bad(key+".command", "must name a program")
	}
	// Resolved on the hive's own PATH the program would depend on the
	// daemon's environment; CheckCommands verifies it at start.
	if prog := b.Command[0]; !filepath.IsAbs(prog) && !strings.HasPrefix(prog, "{self_dir}/") {
		return bad(key+".command", "%q must be an absolute path or start with {self_dir}/", prog)
	}
	for _, arg := range b.Command {
		for i := 0; i < len(arg); i++ {
			if arg[i] != '{' {
				continue
			}
			end := strings.IndexByte(arg[i:], '}')
			if end < 0 {
				return bad(key+".command", "unclosed placeholder in %q", arg)
			}
			ph := arg[i : i+end+1]
			if !slices.Contains(placeholders, ph) {
				return bad(key+".command", "unknown placeholder %s (known: %s)", ph, strings.Join(placeholders, " "))
			}
		}
	}
	if b.Health == "" {
		b.Health = HealthNotify
	}
	if err := new(HealthMode).UnmarshalText([]byte(b.Health)); err != nil {
		return bad(key+".health", "%v", err)
	}
	if b.Health == "http" && b.HealthPath == "" {
		b.HealthPath = "/health"
	}
	if b.HealthPath != "" && !strings.HasPrefix(b.HealthPath, "/") {
		return bad(key+".health_path", "must start with /")
	}
	if b.LoadTimeout == 0 {
		b.LoadTimeout = Duration(10 * time.Minute)
	}
	if b.LoadTimeout.D() < minLoadTimeout {
		return bad(key+".load_timeout", "%s is below the minimum %s", b.LoadTimeout.D(), minLoadTimeout)
	}
	if b.MemoryLimit < 0 {
		return bad(key+".memory_limit", "must not be negative")
	}
	if b.ContextSize == 0 {
		b.ContextSize = 4096
	}
	if b.ContextSize < 0 {
		return bad(key+".context_size", "must not be negative")
	}
	if b.API == "" {
		b.API = APIRbee
	}
	if err := new(API).UnmarshalText([]byte(b.API)); err != nil {
		return bad(key+".api", "%v", err)
	}
	if b.Parallel < 0 {
		return bad(key+".parallel", "must not be negative")
	}
	if b.NativeCompletion && b.API != APIOpenAI {
		return bad(key+".native_completion", "needs api = \"openai\"")
	}
	for k := range b.Env {
		if !envKey.MatchString(k) {
			return bad(key+".env", "%q is not an environment variable name", k)
		}
		if denied, why := envpolicy.DeniedEnv(k); denied {
			return bad(key+".env", "%q is never passed to a worker: %s", k, why)
		}
	}
	for _, k := range b.EnvAllow {
		if !envKey.MatchString(k) {
			return bad(key+".env_allow", "%q is not an environment variable name", k)
		}
		if denied, why := envpolicy.DeniedEnv(k); denied {
			return bad(key+".env_allow", "%q is never passed to a worker: %s", k, why)
		}
		if reservedEnv(k) {
			return bad(key+".env_allow", "%q is set by the hive and cannot be allowed", k)
		}
	}
	if b.User != "" && b.User != "root" && !userName.MatchString(b.User) {
		return bad(key+".user", "%q is not a user name (empty: a uid per worker; root; or a system user)", b.User)
	}
	for i, p := range b.Writable {
		if !filepath.IsAbs(p) || filepath.Clean(p) != p || p == "/" {
			return bad(key+".writable", "%q must be a clean absolute path other than /", p)
		}
		if under(p, c.StateDir) || under(c.StateDir, p) || under(p, c.ModelDir) || under(c.ModelDir, p) {
			return bad(key+".writable", "%q overlaps the state dir or the model dir, which workers must not write", b.Writable[i])
		}
	}
	c.Backends[name] = b
	return nil
}

// userName is what useradd accepts for a system user.
var userName = regexp.MustCompile(`^[a-z_][a-z0-9_-]{0,31}$`)

// under reports whether p is dir or below it.
func under(p, dir string) bool {
	return p == dir || strings.HasPrefix(p, strings.TrimSuffix(dir, "/")+"/")
}

// ParseUIDRange parses workers.uid_range ("70000-79999") and checks it
// with workeruser.ValidateRange.
func ParseUIDRange(s string) (first, last uint32, err error) {
	a, b, ok := strings.Cut(s, "-")
	if !ok {
		return 0, 0, fmt.Errorf("%q: want FIRST-LAST, e.g. 70000-79999", s)
	}
	f, err1 := strconv.ParseUint(strings.TrimSpace(a), 10, 32)
	l, err2 := strconv.ParseUint(strings.TrimSpace(b), 10, 32)
	if err1 != nil || err2 != nil {
		return 0, 0, fmt.Errorf("%q: want FIRST-LAST, e.g. 70000-79999", s)
	}
	if err := workeruser.ValidateRange(uint32(f), uint32(l)); err != nil {
		return 0, 0, err
	}
	return uint32(f), uint32(l), nil
}

// checkGroup checks what can be checked without the group database: a
// number must be neither root nor a worker's own gid; a name is looked up
// at start.
func checkGroup(g string, first, last uint32) error {
	if g == "" {
		return errors.New("must name a group (a name or a gid)")
	}
	n, err := strconv.ParseUint(g, 10, 32)
	if err != nil {
		if !userName.MatchString(g) {
			return fmt.Errorf("%q is neither a gid nor a group name", g)
		}
		return nil
	}
	if n == 0 {
		return errors.New("0 (root) must not be the workers' group")
	}
	if uint32(n) >= first && uint32(n) <= last {
		return fmt.Errorf("gid %d lies inside workers.uid_range, whose gids are the workers' own", n)
	}
	return nil
}

// reservedEnv reports keys the hive sets itself; requests may never override them.
func reservedEnv(k string) bool {
	switch k {
	case "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "RBEE_WORKER_ID", "RBEE_HIVE_URL",
		"RBEE_WORKER_TOKEN", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PATH", "LD_PRELOAD", "LD_LIBRARY_PATH":
		return true
	}
	return false
}

// ReservedEnv is exported for the supervisor's request validation.
func ReservedEnv(k string) bool { return reservedEnv(k) }

// BackendNames returns the backend names, sorted.
func (c *Config) BackendNames() []string { return slices.Sorted(maps.Keys(c.Backends)) }

// MemoryLimit is the memory limit for a backend's workers.
func (c *Config) MemoryLimit(backend string) Size {
	if b, ok := c.Backends[backend]; ok && b.MemoryLimit > 0 {
		return b.MemoryLimit
	}
	return c.Workers.MemoryLimit
}

// TOML renders the effective configuration, comments included.
func (c *Config) TOML() ([]byte, error) {
	var buf bytes.Buffer
	enc := toml.NewEncoder(&buf)
	enc.SetIndentTables(true)
	if err := enc.Encode(c); err != nil {
		return nil, fmt.Errorf("config: encode: %w", err)
	}
	return buf.Bytes(), nil
}

// CheckCommands verifies that every backend's program exists and is
// executable (CheckCommand).
func (c *Config) CheckCommands(selfDir string) error {
	for _, name := range c.BackendNames() {
		if err := c.CheckCommand(name, selfDir); err != nil {
			return err
		}
	}
	return nil
}

// CheckCommand verifies that the backend's program exists and is
// executable, with {self_dir} replaced by selfDir, so that a typo fails the
// hive's start rather than each spawn.
func (c *Config) CheckCommand(name, selfDir string) error {
	b, ok := c.Backends[name]
	if !ok || len(b.Command) == 0 {
		return fmt.Errorf("config: backend %s: no command", name)
	}
	prog := strings.ReplaceAll(b.Command[0], "{self_dir}", selfDir)
	fi, err := os.Stat(prog)
	switch {
	case err != nil:
		return fmt.Errorf("config: backend %s: command %s: %w", name, prog, err)
	case !fi.Mode().IsRegular():
		return fmt.Errorf("config: backend %s: command %s is not a regular file", name, prog)
	case fi.Mode().Perm()&0o111 == 0:
		return fmt.Errorf("config: backend %s: command %s is not executable", name, prog)
	}
	return nil
}

// BuiltinBackend reports whether the backend is a built-in one (the demo
// "sim") with its default command: a hive installed without that program
// still starts.
func (c *Config) BuiltinBackend(name string) bool {
	def, ok := Default(true).Backends[name]
	return ok && slices.Equal(def.Command, c.Backends[name].Command)
}
