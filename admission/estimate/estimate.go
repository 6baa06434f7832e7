// Package estimate predicts how much GPU memory a model needs before a worker
// loads it: from a GGUF header (gguf-parser-go's model of llama.cpp), from
// safetensors headers plus config.json, or from an explicit figure.
//
// It lives under admission, not in gpu, because it is pure Go and needs no
// hardware: the model catalog and the spawn path can both import it without
// pulling in go-nvml's cgo, and its only consumer decision is admission's.
package estimate

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
)

const mib = 1 << 20

// Fixed per-GPU footprints. GPUStack passes 150 MiB RAM / 500 MiB VRAM to
// gguf-parser for the CUDA context and allocator slack; Ollama reserves
// 457 MiB per CUDA device. Admission adds its own safety margin on top.
const (
	GPUOverheadBytes  = 500 * mib
	HostOverheadBytes = 150 * mib
)

// Sources.
const (
	SourceGGUF        = "gguf"
	SourceSafetensors = "safetensors"
	SourceExplicit    = "explicit"
)

// Estimate is a model's predicted memory use on one GPU with full offload.
type Estimate struct {
	Source       string `json:"source"`
	Architecture string `json:"architecture,omitempty"`
	// ContextSize is the context the figures assume (tokens, all slots).
	ContextSize int    `json:"context_size"`
	Parameters  uint64 `json:"parameters,omitempty"`

	WeightsBytes  uint64 `json:"weights_bytes"`
	KVCacheBytes  uint64 `json:"kv_cache_bytes"`
	ComputeBytes  uint64 `json:"compute_bytes"`
	OverheadBytes uint64 `json:"overhead_bytes"`
	// VRAMBytes is the GPU memory need: weights + KV + compute + overhead.
	VRAMBytes uint64 `json:"vram_bytes"`
	// RAMBytes is the host memory the worker needs besides the GPU (0 when
	// unknown). For GGUF, mmap'd weights are not counted: they are page
	// cache.
	RAMBytes uint64 `json:"ram_bytes,omitempty"`
	// EmbeddingOnly models are often hugely over-estimated
	// (gguf-parser-go#2); prefer measured usage once known.
	EmbeddingOnly bool `json:"embedding_only,omitempty"`
}

// Options tune an estimate.
type Options struct {
	// ContextSize is the context the worker will be given (llama.cpp -c).
	// 0 means the model's training context, which is often 128k and
	// grossly over-states the KV cache: always pass the real one.
	ContextSize int
	// Parallel is the number of slots (llama.cpp -np); 0 means 1.
	Parallel int
	// FlashAttention shrinks llama.cpp's compute buffer.
	FlashAttention bool
	// CPU estimates a run with no layer offloaded (a CPU-only engine such
	// as llama-server without -ngl): the figures are host memory, weights
	// included, in RAMBytes; VRAMBytes is 0. GGUF only.
	CPU bool
}

// Explicit wraps a figure given by the operator or the caller.
func Explicit(vramBytes uint64) Estimate {
	return Estimate{Source: SourceExplicit, VRAMBytes: vramBytes}
}

// EstimateVRAM estimates path at context size ctx. path is a .gguf file
// (the first shard of a split model is enough), a .safetensors file, a
// model.safetensors.index.json, or a directory holding safetensors shards and
// config.json.
func EstimateVRAM(path string, ctx int) (Estimate, error) {
	return EstimateWith(path, Options{ContextSize: ctx})
}

// EstimateWith is EstimateVRAM with every option: the backend's context
// size and parallel slots (the KV cache holds ContextSize tokens shared by
// the slots, as llama.cpp's -c and -np do).
func EstimateWith(path string, o Options) (Estimate, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return Estimate{}, fmt.Errorf("estimate: %w", err)
	}
	if fi.IsDir() {
		return Safetensors(path, o)
	}
	switch strings.ToLower(filepath.Ext(path)) {
	case ".gguf":
		return GGUF(path, o)
	case ".safetensors", ".json":
		return Safetensors(path, o)
	}
	isGGUF, err := hasGGUFMagic(path)
	if err != nil {
		return Estimate{}, fmt.Errorf("estimate: %w", err)
	}
	if isGGUF {
		return GGUF(path, o)
	}
	return Safetensors(path, o)
}

// ErrUnknownFormat means the file is neither GGUF nor safetensors.
var ErrUnknownFormat = errors.New("estimate: unknown model format")

func hasGGUFMagic(path string) (bool, error) {
	f, err := os.Open(path)
	if err != nil {
		return false, err
	}
	defer f.Close()
	var m [4]byte
	if _, err := io.ReadFull(f, m[:]); err != nil {
		if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
			return false, nil
		}
		return false, err
	}
	return binary.LittleEndian.Uint32(m[:]) == 0x46554747, nil // "GGUF"
}
