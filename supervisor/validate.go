package supervisor

import (
	"context"
	"fmt"
	"net/http"
	"sort"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
	"github.com/rbee/rbee-hive/config"
	"github.com/rbee/rbee-hive/internal/envpolicy"
)

// SpawnRequest is the body of POST /v1/workers/spawn: model_ref, backend,
// device and model_path, plus optional ones.
type SpawnRequest struct {
	ModelRef string `json:"model_ref"`
	Backend  string `json:"backend"`
	Device   *int64 `json:"device"`
	// ModelPath is accepted for compatibility and ignored: the path comes
	// from the model store (or a file: reference).
	ModelPath        string            `json:"model_path"`
	MemoryLimitBytes *int64            `json:"memory_limit_bytes,omitempty"`
	Restart          RestartPolicy     `json:"restart,omitempty"`
	Env              map[string]string `json:"env,omitempty"`
	VRAMBytes        *int64            `json:"vram_bytes,omitempty"`

	// Served tags the worker with the served model it was started for
	// (the hive's OpenAI endpoint); ContextSize, when set, replaces the
	// backend's for the memory estimate. Not settable through the API.
	Served      string `json:"-"`
	ContextSize int    `json:"-"`
}

// maxModelRef bounds a model reference, in bytes.
const maxModelRef = 512

// badField is a 400 naming the field; clients match on the message text.
func badField(field, format string, args ...any) *api.Error {
	return api.Errorf(http.StatusBadRequest, api.CodeValidation, "Invalid %s: %s", field, fmt.Sprintf(format, args...)).
		WithDetails(map[string]any{"field": field})
}

// checkString is the checks every field validator starts with: not empty,
// at most max bytes, no NUL.
func checkString(s string, max int) string {
	switch {
	case s == "":
		return "string is empty"
	case len(s) > max:
		return fmt.Sprintf("string too long: %d chars (max %d)", len(s), max)
	case strings.IndexByte(s, 0) >= 0:
		return "null byte found in string"
	}
	return ""
}

// checkModelRef validates a model reference (provider:name).
func checkModelRef(s string) string {
	if msg := checkString(s, maxModelRef); msg != "" {
		return msg
	}
	for _, c := range s {
		if strings.ContainsRune(";|&$`\n\r", c) {
			return fmt.Sprintf("shell metacharacter found: %q", c)
		}
	}
	if strings.Contains(s, "../") || strings.Contains(s, `..\`) {
		return "path traversal sequence detected"
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.ContainsRune("-_/:.", c)) {
			return fmt.Sprintf("invalid characters found: %q", c)
		}
	}
	return ""
}

// checkIdentifier accepts [A-Za-z0-9_-].
func checkIdentifier(s string, max int) string {
	if msg := checkString(s, max); msg != "" {
		return msg
	}
	for _, c := range s {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '-') {
			return fmt.Sprintf("invalid characters found: %q", c)
		}
	}
	return ""
}

// spawnPlan is a validated spawn request.
type spawnPlan struct {
	modelRef, provider, reference string
	backend                       string
	backendCfg                    config.Backend
	device                        int
	gpuUUID                       string
	memoryLimit                   int64  // bytes
	vramRequested                 uint64 // 0: let the admitter estimate
	policy                        RestartPolicy
	env                           map[string]string
	served                        string
	contextSize                   int
}

// validateSpawn checks a request field by field (the first bad field
// answers), then the hive's own rules. Nothing is changed by a failed validation.
func (s *Supervisor) validateSpawn(ctx context.Context, req *SpawnRequest) (*spawnPlan, error) {
	if msg := checkModelRef(req.ModelRef); msg != "" {
		return nil, badField("model_ref", "%s", msg)
	}
	if msg := checkIdentifier(req.Backend, 64); msg != "" {
		return nil, badField("backend", "%s", msg)
	}
	provider, reference, ok := strings.Cut(req.ModelRef, ":")
	if !ok || provider == "" || reference == "" {
		return nil, badField("model_ref", "Invalid model_ref format: expected 'provider:reference', got '%s'", req.ModelRef)
	}
	be, ok := s.cfg.Backends[req.Backend]
	if !ok {
		return nil, badField("backend", "unknown backend %q (configured: %s)", req.Backend, strings.Join(s.cfg.BackendNames(), ", "))
	}
	if req.Device == nil {
		return nil, api.Errorf(http.StatusUnprocessableEntity, api.CodeValidation, "missing field `device`").
			WithDetails(map[string]any{"field": "device"})
	}
	p := &spawnPlan{modelRef: req.ModelRef, provider: provider, reference: reference, backend: req.Backend, backendCfg: be,
		memoryLimit: int64(s.cfg.MemoryLimit(req.Backend)), policy: RestartOnFailure, served: req.Served, contextSize: be.ContextSize}
	if req.ContextSize > 0 {
		p.contextSize = req.ContextSize
	}
	dev := *req.Device
	if dev < 0 {
		return nil, badField("device", "must not be negative, got %d", dev)
	}
	if !be.CUDA {
		if dev != 0 {
			return nil, badField("device", "backend %q runs on the CPU: only device 0 exists, got %d", req.Backend, dev)
		}
	} else {
		uuid, err := s.gpuUUID(ctx, int(dev))
		if err != nil {
			return nil, err
		}
		p.gpuUUID = uuid
	}
	p.device = int(dev)
	if req.MemoryLimitBytes != nil {
		if *req.MemoryLimitBytes < 1<<20 {
			return nil, badField("memory_limit_bytes", "must be at least 1MiB, got %d", *req.MemoryLimitBytes)
		}
		p.memoryLimit = *req.MemoryLimitBytes
	}
	if req.VRAMBytes != nil {
		if *req.VRAMBytes < 0 {
			return nil, badField("vram_bytes", "must not be negative, got %d", *req.VRAMBytes)
		}
		p.vramRequested = uint64(*req.VRAMBytes)
	}
	switch req.Restart {
	case "":
	case RestartNever, RestartOnFailure, RestartAlways:
		p.policy = req.Restart
	default:
		return nil, badField("restart", "%q is not one of never, on-failure, always", req.Restart)
	}
	for _, k := range sortedKeys(be.Env) {
		if denied, why := envpolicy.DeniedEnv(k); denied {
			return nil, badField("env", "backend %q sets %s, which is never passed to a worker: %s", req.Backend, k, why)
		}
	}
	if len(req.Env) > 0 {
		p.env = make(map[string]string, len(req.Env))
		for _, k := range sortedKeys(req.Env) {
			v := req.Env[k]
			// Even when env_allow lists it: the deny-list is not configurable.
			if denied, why := envpolicy.DeniedEnv(k); denied {
				return nil, badField("env", "%s is never passed to a worker: %s", k, why)
			}
			if config.ReservedEnv(k) || !contains(be.EnvAllow, k) {
				return nil, badField("env", "key %q is not allowed for backend %q (allowed: %s)", k, req.Backend, strings.Join(be.EnvAllow, ", "))
			}
			if strings.IndexByte(v, 0) >= 0 || len(v) > 4096 {
				return nil, badField("env", "value of %q has a null byte or exceeds 4096 bytes", k)
			}
			p.env[k] = v
		}
	}
	return p, nil
}

// sortedKeys makes the first offending key of a map deterministic.
func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// gpuUUID maps a cuda device index to its UUID via the GPU driver.
func (s *Supervisor) gpuUUID(ctx context.Context, index int) (string, error) {
	if s.deps.GPUs == nil {
		return "", badField("device", "device %d not available: no GPUs on this host", index)
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	devs, err := s.deps.GPUs.GPUDevices(ctx)
	if err != nil {
		return "", api.Errorf(http.StatusServiceUnavailable, api.CodeUnavailable, "listing GPUs failed: %v", err)
	}
	var avail []string
	for _, d := range devs {
		if d.Index == index {
			return d.UUID, nil
		}
		avail = append(avail, fmt.Sprint(d.Index))
	}
	return "", badField("device", "device %d not available (available: [%s])", index, strings.Join(avail, ", "))
}

func contains(list []string, v string) bool {
	for _, x := range list {
		if x == v {
			return true
		}
	}
	return false
}
