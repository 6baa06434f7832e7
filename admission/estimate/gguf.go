package estimate

import (
	"fmt"
	"math"

	gguf "github.com/gpustack/gguf-parser-go"
)

// GGUF estimates a llama.cpp worker loading path with every layer on one
// GPU. Only the header and tensor infos are read.
func GGUF(path string, o Options) (e Estimate, err error) {
	// gguf-parser-go panics on some malformed inputs and option mixes; a
	// bad model file must fail the request, not the daemon.
	defer func() {
		if r := recover(); r != nil {
			e, err = Estimate{}, fmt.Errorf("estimate: gguf %s: parser panic: %v", path, r)
		}
	}()
	if o.ContextSize < 0 || o.ContextSize > math.MaxInt32 || o.Parallel < 0 || o.Parallel > math.MaxInt32 {
		return Estimate{}, fmt.Errorf("estimate: context %d / parallel %d out of range", o.ContextSize, o.Parallel)
	}
	gf, err := gguf.ParseGGUFFile(path, gguf.SkipLargeMetadata())
	if err != nil {
		return Estimate{}, fmt.Errorf("estimate: parse gguf %s: %w", path, err)
	}
	var opts []gguf.GGUFRunEstimateOption
	if o.ContextSize > 0 {
		opts = append(opts, gguf.WithLLaMACppContextSize(int32(o.ContextSize)))
	}
	if o.Parallel > 0 {
		opts = append(opts, gguf.WithParallelSize(int32(o.Parallel)))
	}
	if o.FlashAttention {
		opts = append(opts, gguf.WithFlashAttention())
	}
	if o.CPU {
		return ggufCPU(gf, append(opts, gguf.WithLLaMACppOffloadLayers(0)))
	}
	run := gf.EstimateLLaMACppRun(opts...)
	if len(run.Devices) < 2 {
		return Estimate{}, fmt.Errorf("estimate: gguf %s: no GPU device in estimate", path)
	}
	// mmap on (llama.cpp's default): host weights are page cache, not RAM.
	sum := run.Summarize(true, HostOverheadBytes, GPUOverheadBytes)
	if len(sum.Items) == 0 || len(sum.Items[0].VRAMs) == 0 {
		return Estimate{}, fmt.Errorf("estimate: gguf %s: empty summary", path)
	}
	gpu := run.Devices[1]
	e = Estimate{
		Source:        SourceGGUF,
		Architecture:  run.Architecture,
		ContextSize:   int(run.ContextSize),
		Parameters:    uint64(gf.ModelParameters),
		WeightsBytes:  uint64(gpu.Weight.Sum()),
		KVCacheBytes:  uint64(gpu.KVCache.Sum()),
		ComputeBytes:  uint64(gpu.Computation.Sum()),
		OverheadBytes: GPUOverheadBytes + uint64(gpu.Footprint),
		VRAMBytes:     uint64(sum.Items[0].VRAMs[0].NonUMA),
		RAMBytes:      uint64(sum.Items[0].RAM.NonUMA),
		EmbeddingOnly: run.EmbeddingOnly || run.Reranking,
	}
	return e, nil
}

// ggufCPU is the host-memory estimate of a run with every layer on the CPU.
// Weights count in full: llama.cpp maps them, and the pages it reads are the
// process's resident memory like any other.
func ggufCPU(gf *gguf.GGUFFile, opts []gguf.GGUFRunEstimateOption) (Estimate, error) {
	run := gf.EstimateLLaMACppRun(opts...)
	if len(run.Devices) == 0 {
		return Estimate{}, fmt.Errorf("estimate: gguf: no host device in estimate")
	}
	sum := run.Summarize(false, 0, 0)
	if len(sum.Items) == 0 {
		return Estimate{}, fmt.Errorf("estimate: gguf: empty summary")
	}
	host := run.Devices[0]
	return Estimate{
		Source:        SourceGGUF,
		Architecture:  run.Architecture,
		ContextSize:   int(run.ContextSize),
		Parameters:    uint64(gf.ModelParameters),
		WeightsBytes:  uint64(host.Weight.Sum()),
		KVCacheBytes:  uint64(host.KVCache.Sum()),
		ComputeBytes:  uint64(host.Computation.Sum()),
		OverheadBytes: uint64(host.Footprint),
		RAMBytes:      uint64(sum.Items[0].RAM.NonUMA),
		EmbeddingOnly: run.EmbeddingOnly || run.Reranking,
	}, nil
}
