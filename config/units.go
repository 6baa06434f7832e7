package config

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Size is a byte count. In TOML it is an integer (bytes) or a string with a
// unit: "512MiB", "8GiB", "10GB", "4096".
type Size int64

var sizeUnits = []struct {
	suffix string
	mult   int64
}{
	{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"TiB", 1 << 40},
	{"KB", 1e3}, {"MB", 1e6}, {"GB", 1e9}, {"TB", 1e12},
	{"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}, {"T", 1 << 40},
	{"B", 1},
}

// ParseSize parses a size such as "8GiB" or "1048576".
func ParseSize(s string) (Size, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return 0, fmt.Errorf("empty size")
	}
	mult := int64(1)
	num := s
	for _, u := range sizeUnits {
		if strings.HasSuffix(s, u.suffix) {
			mult, num = u.mult, strings.TrimSpace(strings.TrimSuffix(s, u.suffix))
			break
		}
	}
	f, err := strconv.ParseFloat(num, 64)
	// NaN compares false to everything and Inf overflows the conversion.
	if err != nil || f < 0 || math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, fmt.Errorf("invalid size %q: want bytes or a number with KiB, MiB, GiB, TiB, KB, MB, GB, TB", s)
	}
	v := f * float64(mult)
	if v > float64(1<<62) {
		return 0, fmt.Errorf("size %q is too large", s)
	}
	return Size(v), nil
}

// UnmarshalText implements encoding.TextUnmarshaler.
func (s *Size) UnmarshalText(b []byte) error {
	v, err := ParseSize(string(b))
	if err != nil {
		return err
	}
	*s = v
	return nil
}

// MarshalText prints the size in the largest binary unit that divides it.
func (s Size) MarshalText() ([]byte, error) { return []byte(s.String()), nil }

func (s Size) String() string {
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}} {
		if s != 0 && int64(s)%u.mult == 0 {
			return strconv.FormatInt(int64(s)/u.mult, 10) + u.suffix
		}
	}
	return strconv.FormatInt(int64(s), 10)
}

// Duration is a time.Duration written as "30s", "5m", "1h30m" in TOML.
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q: want e.g. \"30s\", \"5m\"", b)
	}
	if v < 0 {
		return fmt.Errorf("invalid duration %q: negative", b)
	}
	*d = Duration(v)
	return nil
}

// MarshalText implements encoding.TextMarshaler.
func (d Duration) MarshalText() ([]byte, error) { return []byte(time.Duration(d).String()), nil }

// D returns the time.Duration.
func (d Duration) D() time.Duration { return time.Duration(d) }

// oneOf is a string restricted to a set, checked while decoding so that the
// error carries the file position.
func oneOf(field string, v string, allowed ...string) error {
	for _, a := range allowed {
		if v == a {
			return nil
		}
	}
	return fmt.Errorf("%s: %q is not one of %s", field, v, strings.Join(allowed, ", "))
}

// StaleAction is what happens to a worker that stopped heartbeating.
type StaleAction string

// The stale actions.
const (
	StaleRestart StaleAction = "restart" // stop the worker and restart it by policy
	StaleKill    StaleAction = "kill"    // stop it for good
	StaleMark    StaleAction = "mark"    // only mark it stale
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (a *StaleAction) UnmarshalText(b []byte) error {
	if err := oneOf("stale_action", string(b), string(StaleRestart), string(StaleKill), string(StaleMark)); err != nil {
		return err
	}
	*a = StaleAction(b)
	return nil
}

// HealthMode is how the hive learns that a worker is ready and alive.
type HealthMode string

// The health modes.
const (
	HealthNotify   HealthMode = "notify"   // READY=1 and WATCHDOG=1 datagrams
	HealthHTTP     HealthMode = "http"     // GET health_path until 200, then polled
	HealthCallback HealthMode = "callback" // POST /v1/workers/ready and /v1/heartbeat
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (h *HealthMode) UnmarshalText(b []byte) error {
	if err := oneOf("health", string(b), string(HealthNotify), string(HealthHTTP), string(HealthCallback)); err != nil {
		return err
	}
	*h = HealthMode(b)
	return nil
}

// API is the inference protocol a backend's workers speak.
type API string

// The inference protocols.
const (
	APIRbee   API = "rbee"   // POST /v1/inference, rbee's SSE events
	APIOpenAI API = "openai" // POST /v1/chat/completions and /v1/completions
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (a *API) UnmarshalText(b []byte) error {
	if err := oneOf("api", string(b), string(APIRbee), string(APIOpenAI)); err != nil {
		return err
	}
	*a = API(b)
	return nil
}

// LogFormat selects the log handler.
type LogFormat string

// UnmarshalText implements encoding.TextUnmarshaler.
func (f *LogFormat) UnmarshalText(b []byte) error {
	if err := oneOf("log_format", string(b), "auto", "text", "json", "journal"); err != nil {
		return err
	}
	*f = LogFormat(b)
	return nil
}

// LogLevel is debug, info, warn or error.
type LogLevel string

// UnmarshalText implements encoding.TextUnmarshaler.
func (l *LogLevel) UnmarshalText(b []byte) error {
	if err := oneOf("log_level", string(b), "debug", "info", "warn", "error"); err != nil {
		return err
	}
	*l = LogLevel(b)
	return nil
}

// Action is what to do when a limit is exceeded: log it, or kill the worker.
type Action string

// The limit actions.
const (
	ActionLog  Action = "log"
	ActionKill Action = "kill"
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (a *Action) UnmarshalText(b []byte) error {
	if err := oneOf("action", string(b), string(ActionLog), string(ActionKill)); err != nil {
		return err
	}
	*a = Action(b)
	return nil
}

// GPUDriver picks the GPU implementation.
type GPUDriver string

// The GPU drivers.
const (
	GPUAuto GPUDriver = "auto" // NVML when it initialises, else none
	GPUNVML GPUDriver = "nvml"
	GPUFake GPUDriver = "fake"
	GPUNone GPUDriver = "none"
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (g *GPUDriver) UnmarshalText(b []byte) error {
	if err := oneOf("driver", string(b), string(GPUAuto), string(GPUNVML), string(GPUFake), string(GPUNone)); err != nil {
		return err
	}
	*g = GPUDriver(b)
	return nil
}

// MemoryAdmission is how RAM admission counts running workers.
type MemoryAdmission string

// The RAM admission modes.
const (
	// MemoryLimits admits a worker only if its memory limit plus the limits
	// of every live worker fit in MemTotal − memory_reserve (and its limit
	// fits in what is available now): workers can all grow to their limits
	// without overcommitting the host.
	MemoryLimits MemoryAdmission = "limits"
	// MemoryUsage admits against MemAvailable − memory_reserve − the limits
	// of workers still loading: a ready worker counts by what it uses, so
	// the host packs more workers and can be overcommitted as they grow.
	MemoryUsage MemoryAdmission = "usage"
)

// UnmarshalText implements encoding.TextUnmarshaler.
func (m *MemoryAdmission) UnmarshalText(b []byte) error {
	if err := oneOf("memory_admission", string(b), string(MemoryLimits), string(MemoryUsage)); err != nil {
		return err
	}
	*m = MemoryAdmission(b)
	return nil
}
