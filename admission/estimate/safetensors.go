package estimate

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/bits"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

// maxHeader is huggingface_hub's SAFETENSORS_MAX_HEADER_LENGTH.
const maxHeader = 25_000_000

// Safetensors estimates a safetensors model: weight bytes from the headers
// (data_offsets, so no dtype table is needed, FP8 included), KV cache from
// config.json next to the weights when present, plus a compute allowance.
//
// path is a .safetensors file, a model.safetensors.index.json, or a
// directory. In a directory the index wins; otherwise every root-level
// *.safetensors counts, except consolidated*.safetensors when other shards
// exist (Mistral repos ship both copies).
func Safetensors(path string, o Options) (Estimate, error) {
	files, dir, err := safetensorsFiles(path)
	if err != nil {
		return Estimate{}, err
	}
	e := Estimate{Source: SourceSafetensors}
	for _, f := range files {
		w, p, err := readSafetensorsHeader(f)
		if err != nil {
			return Estimate{}, err
		}
		e.WeightsBytes = satAdd(e.WeightsBytes, w)
		e.Parameters = satAdd(e.Parameters, p)
	}
	cfg, err := readConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return Estimate{}, err
	}
	if cfg != nil {
		e.Architecture = cfg.arch
		ctx := o.ContextSize
		if ctx == 0 {
			ctx = cfg.maxPositions
		}
		if ctx < 0 || o.Parallel < 0 {
			return Estimate{}, fmt.Errorf("estimate: context %d / parallel %d out of range", ctx, o.Parallel)
		}
		par := max(o.Parallel, 1)
		e.ContextSize = ctx
		e.KVCacheBytes = satMul(satMul(cfg.kvBytesPerToken(), uint64(ctx)), uint64(par))
	} else {
		e.ContextSize = o.ContextSize
	}
	// Activations and allocator slack. Candle/PyTorch engines differ; 10 %
	// of the weights (at least 256 MiB) is a stand-in until the worker's
	// measured usage replaces the claim.
	e.ComputeBytes = max(e.WeightsBytes/10, 256*mib)
	e.OverheadBytes = GPUOverheadBytes
	e.VRAMBytes = satAdd(satAdd(e.WeightsBytes, e.KVCacheBytes), satAdd(e.ComputeBytes, e.OverheadBytes))
	return e, nil
}

func safetensorsFiles(path string) (files []string, dir string, err error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, "", fmt.Errorf("estimate: %w", err)
	}
	if !fi.IsDir() {
		dir = filepath.Dir(path)
		if strings.HasSuffix(path, ".json") {
			files, err = indexShards(path)
			return files, dir, err
		}
		return []string{path}, dir, nil
	}
	dir = path
	idx := filepath.Join(dir, "model.safetensors.index.json")
	if _, err := os.Stat(idx); err == nil {
		files, err = indexShards(idx)
		return files, dir, err
	}
	all, err := filepath.Glob(filepath.Join(dir, "*.safetensors"))
	if err != nil {
		return nil, "", fmt.Errorf("estimate: %w", err)
	}
	for _, f := range all {
		if !strings.HasPrefix(filepath.Base(f), "consolidated") {
			files = append(files, f)
		}
	}
	if len(files) == 0 {
		files = all
	}
	if len(files) == 0 {
		return nil, "", fmt.Errorf("estimate: %s: no .safetensors files: %w", dir, ErrUnknownFormat)
	}
	return files, dir, nil
}

func indexShards(index string) ([]string, error) {
	b, err := os.ReadFile(index)
	if err != nil {
		return nil, fmt.Errorf("estimate: %w", err)
	}
	var idx struct {
		WeightMap map[string]string `json:"weight_map"`
	}
	if err := json.Unmarshal(b, &idx); err != nil {
		return nil, fmt.Errorf("estimate: %s: %w", index, err)
	}
	seen := map[string]bool{}
	var files []string
	for _, shard := range idx.WeightMap {
		if shard != filepath.Base(shard) { // no path escapes from the model dir
			return nil, fmt.Errorf("estimate: %s: bad shard name %q", index, shard)
		}
		if !seen[shard] {
			seen[shard] = true
			files = append(files, filepath.Join(filepath.Dir(index), shard))
		}
	}
	if len(files) == 0 {
		return nil, fmt.Errorf("estimate: %s: empty weight_map", index)
	}
	sort.Strings(files)
	return files, nil
}

type tensorInfo struct {
	DType       string   `json:"dtype"`
	Shape       []uint64 `json:"shape"`
	DataOffsets []uint64 `json:"data_offsets"`
}

// readSafetensorsHeader returns the tensor bytes and parameter count of one
// file, reading only its header: u64le length N, then N bytes of JSON.
func readSafetensorsHeader(path string) (weights, params uint64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, 0, fmt.Errorf("estimate: %w", err)
	}
	defer f.Close()
	var lenBuf [8]byte
	if _, err := io.ReadFull(f, lenBuf[:]); err != nil {
		return 0, 0, fmt.Errorf("estimate: %s: header length: %w", path, err)
	}
	n := binary.LittleEndian.Uint64(lenBuf[:])
	if n == 0 || n > maxHeader {
		return 0, 0, fmt.Errorf("estimate: %s: header length %d: %w", path, n, ErrUnknownFormat)
	}
	buf := make([]byte, n)
	if _, err := io.ReadFull(f, buf); err != nil {
		return 0, 0, fmt.Errorf("estimate: %s: header: %w", path, err)
	}
	var hdr map[string]json.RawMessage
	if err := json.Unmarshal(buf, &hdr); err != nil {
		return 0, 0, fmt.Errorf("estimate: %s: header json: %w", path, errors.Join(ErrUnknownFormat, err))
	}
	for name, raw := range hdr {
		if name == "__metadata__" {
			continue
		}
		var ti tensorInfo
		if err := json.Unmarshal(raw, &ti); err != nil {
			return 0, 0, fmt.Errorf("estimate: %s: tensor %q: %w", path, name, err)
		}
		if len(ti.DataOffsets) != 2 || ti.DataOffsets[1] < ti.DataOffsets[0] {
			return 0, 0, fmt.Errorf("estimate: %s: tensor %q: bad data_offsets", path, name)
		}
		weights = satAdd(weights, ti.DataOffsets[1]-ti.DataOffsets[0])
		p := uint64(1)
		for _, d := range ti.Shape {
			if d != 0 && p > math.MaxUint64/d {
				return 0, 0, fmt.Errorf("estimate: %s: tensor %q: shape overflows", path, name)
			}
			p *= d
		}
		params = satAdd(params, p)
	}
	return weights, params, nil
}

// hfConfig is the subset of a transformers config.json the KV cache needs.
type hfConfig struct {
	arch         string
	layers       uint64
	kvHeads      uint64
	headDim      uint64
	maxPositions int
	dtypeBytes   uint64
}

func (c *hfConfig) kvBytesPerToken() uint64 {
	return satMul(satMul(satMul(2*c.dtypeBytes, c.layers), c.kvHeads), c.headDim) // K and V
}

type rawConfig struct {
	Architectures     []string   `json:"architectures"`
	ModelType         string     `json:"model_type"`
	NumHiddenLayers   uint64     `json:"num_hidden_layers"`
	NumAttentionHeads uint64     `json:"num_attention_heads"`
	NumKeyValueHeads  uint64     `json:"num_key_value_heads"`
	HeadDim           uint64     `json:"head_dim"`
	HiddenSize        uint64     `json:"hidden_size"`
	MaxPositions      int        `json:"max_position_embeddings"`
	TorchDType        string     `json:"torch_dtype"`
	DType             string     `json:"dtype"`
	TextConfig        *rawConfig `json:"text_config"`
}

// readConfig returns nil, nil when there is no config.json.
func readConfig(path string) (*hfConfig, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("estimate: %w", err)
	}
	var rc rawConfig
	if err := json.Unmarshal(b, &rc); err != nil {
		return nil, fmt.Errorf("estimate: %s: %w", path, err)
	}
	arch := rc.ModelType
	if len(rc.Architectures) > 0 {
		arch = rc.Architectures[0]
	}
	// Multimodal configs nest the language model's figures.
	if rc.NumHiddenLayers == 0 && rc.TextConfig != nil {
		tc := *rc.TextConfig
		if tc.TorchDType == "" {
			tc.TorchDType = rc.TorchDType
		}
		rc = tc
	}
	c := &hfConfig{arch: arch, layers: rc.NumHiddenLayers, maxPositions: rc.MaxPositions, kvHeads: rc.NumKeyValueHeads}
	if c.kvHeads == 0 {
		c.kvHeads = rc.NumAttentionHeads // no GQA
	}
	c.headDim = rc.HeadDim
	if c.headDim == 0 && rc.NumAttentionHeads > 0 {
		c.headDim = rc.HiddenSize / rc.NumAttentionHeads
	}
	dt := rc.TorchDType
	if dt == "" {
		dt = rc.DType
	}
	switch strings.ToLower(dt) {
	case "float32":
		c.dtypeBytes = 4
	default: // float16, bfloat16, and the engines' default cache type
		c.dtypeBytes = 2
	}
	if c.layers == 0 || c.kvHeads == 0 || c.headDim == 0 {
		return nil, fmt.Errorf("estimate: %s: lacks num_hidden_layers/num_attention_heads/head_dim", path)
	}
	return c, nil
}

// satAdd and satMul saturate at MaxUint64: header and config figures come
// from downloaded files, and a sum or product that wrapped would turn an
// absurd model into a tiny estimate that admission lets through. A
// saturated estimate fits no GPU.
func satAdd(a, b uint64) uint64 {
	s, carry := bits.Add64(a, b, 0)
	if carry != 0 {
		return math.MaxUint64
	}
	return s
}

func satMul(a, b uint64) uint64 {
	hi, lo := bits.Mul64(a, b)
	if hi != 0 {
		return math.MaxUint64
	}
	return lo
}
