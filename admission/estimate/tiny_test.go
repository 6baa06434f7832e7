package estimate

import (
	"path/filepath"
	"testing"

	"github.com/rbee/rbee-hive/internal/ggufwrite"
)

// The project's own tiny llama GGUF estimates like any llama.cpp model:
// the KV cache follows the context and not the slot count (llama.cpp
// shares -c between -np slots), and a CPU run puts the weights in RAM.
func TestTinyLlamaEstimate(t *testing.T) {
	p := filepath.Join(t.TempDir(), "tiny.gguf")
	if err := ggufwrite.TinyLlama(p); err != nil {
		t.Fatal(err)
	}
	// KV per token: 2 layers × (K+V) × 2 KV heads × 16 dims × 2 bytes (f16).
	const kvPerToken = 2 * 2 * 2 * 16 * 2
	tests := []struct {
		name string
		o    Options
		kv   uint64
	}{
		{"gpu ctx 512", Options{ContextSize: 512}, 512 * kvPerToken},
		{"gpu ctx 2048 x2", Options{ContextSize: 2048, Parallel: 2}, 2048 * kvPerToken},
		{"cpu ctx 512 x2", Options{ContextSize: 512, Parallel: 2, CPU: true}, 512 * kvPerToken},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e, err := EstimateWith(p, tc.o)
			if err != nil {
				t.Fatal(err)
			}
			if e.Architecture != "llama" || e.ContextSize != tc.o.ContextSize || e.KVCacheBytes != tc.kv {
				t.Errorf("estimate %+v, want llama, context %d, KV %d", e, tc.o.ContextSize, tc.kv)
			}
			if tc.o.CPU {
				if e.VRAMBytes != 0 || e.RAMBytes < e.WeightsBytes+e.KVCacheBytes+e.ComputeBytes {
					t.Errorf("cpu estimate %+v: RAM must hold weights, KV and compute", e)
				}
			} else if e.VRAMBytes < e.WeightsBytes+e.KVCacheBytes {
				t.Errorf("gpu estimate %+v", e)
			}
		})
	}
}
