package estimate

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"
)

// ggufWriter writes the GGUF v3 binary format: header, metadata KVs and
// tensor infos. Tensor data is left as a sparse hole (Truncate), so the test
// files are a few KiB on disk whatever the model size.
type ggufWriter struct{ bytes.Buffer }

const (
	ggufTypeUint32  = 4
	ggufTypeFloat32 = 6
	ggufTypeString  = 8
	ggmlTypeF32     = 0
	ggmlTypeF16     = 1
)

func (w *ggufWriter) u32(v uint32) { _ = binary.Write(w, binary.LittleEndian, v) }
func (w *ggufWriter) u64(v uint64) { _ = binary.Write(w, binary.LittleEndian, v) }
func (w *ggufWriter) str(s string) { w.u64(uint64(len(s))); w.WriteString(s) }

type kv struct {
	key string
	val any // uint32, float32 or string
}

type tensor struct {
	name  string
	dims  []uint64
	ggml  uint32
	bytes uint64
}

// llamaModel builds the metadata and tensors of a tiny llama.
func llamaModel(layers, embd, heads, kvHeads, ctxTrain, vocab uint32) ([]kv, []tensor) {
	kvs := []kv{
		{"general.architecture", "llama"},
		{"general.name", "tiny-test-llama"},
		{"general.file_type", uint32(1)}, // MOSTLY_F16
		{"llama.block_count", layers},
		{"llama.context_length", ctxTrain},
		{"llama.embedding_length", embd},
		{"llama.feed_forward_length", 4 * embd},
		{"llama.attention.head_count", heads},
		{"llama.attention.head_count_kv", kvHeads},
		{"llama.attention.layer_norm_rms_epsilon", float32(1e-5)},
		{"llama.rope.dimension_count", embd / heads},
		{"llama.vocab_size", vocab},
		{"tokenizer.ggml.model", "llama"},
	}
	e, f, kvDim := uint64(embd), uint64(4*embd), uint64(embd/heads*kvHeads)
	f16 := func(name string, dims ...uint64) tensor {
		n := uint64(2)
		for _, d := range dims {
			n *= d
		}
		return tensor{name, dims, ggmlTypeF16, n}
	}
	f32 := func(name string, d uint64) tensor { return tensor{name, []uint64{d}, ggmlTypeF32, 4 * d} }
	ts := []tensor{f16("token_embd.weight", e, uint64(vocab))}
	for i := range layers {
		p := "blk." + itoa(int(i)) + "."
		ts = append(ts,
			f32(p+"attn_norm.weight", e),
			f16(p+"attn_q.weight", e, e), f16(p+"attn_k.weight", e, kvDim), f16(p+"attn_v.weight", e, kvDim),
			f16(p+"attn_output.weight", e, e),
			f32(p+"ffn_norm.weight", e),
			f16(p+"ffn_gate.weight", e, f), f16(p+"ffn_up.weight", e, f), f16(p+"ffn_down.weight", f, e),
		)
	}
	ts = append(ts, f32("output_norm.weight", e), f16("output.weight", e, uint64(vocab)))
	return kvs, ts
}

func itoa(i int) string { return string(appendInt(nil, i)) }
func appendInt(b []byte, i int) []byte {
	if i >= 10 {
		b = appendInt(b, i/10)
	}
	return append(b, byte('0'+i%10))
}

func writeGGUF(t testing.TB, path string, kvs []kv, ts []tensor) {
	t.Helper()
	var w ggufWriter
	w.u32(0x46554747) // "GGUF"
	w.u32(3)
	w.u64(uint64(len(ts)))
	w.u64(uint64(len(kvs)))
	for _, k := range kvs {
		w.str(k.key)
		switch v := k.val.(type) {
		case uint32:
			w.u32(ggufTypeUint32)
			w.u32(v)
		case float32:
			w.u32(ggufTypeFloat32)
			_ = binary.Write(&w, binary.LittleEndian, v)
		case string:
			w.u32(ggufTypeString)
			w.str(v)
		default:
			t.Fatalf("kv %s: unsupported %T", k.key, v)
		}
	}
	const align = 32
	var off uint64
	for _, tn := range ts {
		w.str(tn.name)
		w.u32(uint32(len(tn.dims)))
		for _, d := range tn.dims {
			w.u64(d)
		}
		w.u32(tn.ggml)
		w.u64(off)
		off += (tn.bytes + align - 1) / align * align
	}
	for w.Len()%align != 0 {
		w.WriteByte(0)
	}
	hdr := int64(w.Len())
	if err := os.WriteFile(path, w.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, hdr+int64(off)); err != nil { // sparse tensor data
		t.Fatal(err)
	}
}

const kib = 1 << 10

func TestGGUFEstimate(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "tiny.gguf")
	// 4 layers, E=256, 8 heads (head_dim 32), 2 KV heads, training ctx 4096.
	kvs, ts := llamaModel(4, 256, 8, 2, 4096, 1000)
	writeGGUF(t, path, kvs, ts)
	var wantWeights uint64
	for _, tn := range ts {
		wantWeights += tn.bytes
	}

	tests := []struct {
		ctx, wantCtx int
	}{
		{2048, 2048},
		{512, 512},
		{0, 4096}, // training context
	}
	var prev Estimate
	for _, tc := range tests {
		e, err := EstimateVRAM(path, tc.ctx)
		if err != nil {
			t.Fatalf("ctx %d: %v", tc.ctx, err)
		}
		t.Logf("ctx %d: %+v", tc.ctx, e)
		// KV = 2 (K,V) × layers × kv_heads × head_dim × ctx × 2 B (f16)
		wantKV := uint64(2 * 4 * 2 * 32 * tc.wantCtx * 2)
		if e.Source != SourceGGUF || e.Architecture != "llama" || e.ContextSize != tc.wantCtx {
			t.Fatalf("ctx %d: %+v", tc.ctx, e)
		}
		if e.KVCacheBytes != wantKV {
			t.Errorf("ctx %d: kv %d, want %d", tc.ctx, e.KVCacheBytes, wantKV)
		}
		// Weights on the GPU: all but (part of) the input embedding, which
		// llama.cpp keeps on the host.
		if e.WeightsBytes == 0 || e.WeightsBytes > wantWeights {
			t.Errorf("ctx %d: weights %d, file tensors %d", tc.ctx, e.WeightsBytes, wantWeights)
		}
		if sum := e.WeightsBytes + e.KVCacheBytes + e.ComputeBytes + e.OverheadBytes; sum != e.VRAMBytes {
			t.Errorf("ctx %d: parts sum %d != vram %d", tc.ctx, sum, e.VRAMBytes)
		}
		if e.VRAMBytes < GPUOverheadBytes || e.Parameters == 0 {
			t.Errorf("ctx %d: %+v", tc.ctx, e)
		}
		if prev.VRAMBytes != 0 && (e.ContextSize > prev.ContextSize) != (e.VRAMBytes > prev.VRAMBytes) {
			t.Errorf("VRAM does not grow with context: %d@%d vs %d@%d", e.VRAMBytes, e.ContextSize, prev.VRAMBytes, prev.ContextSize)
		}
		prev = e
	}
}

func TestGGUFGarbage(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string][]byte{
		"empty.gguf":     nil,
		"truncated.gguf": {0x47, 0x47, 0x55, 0x46, 3, 0, 0, 0, 0xff},
		"huge-kv.gguf":   append([]byte{0x47, 0x47, 0x55, 0x46, 3, 0, 0, 0}, bytes.Repeat([]byte{0xff}, 16)...),
	} {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, body, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := EstimateVRAM(p, 2048); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	if _, err := EstimateVRAM(filepath.Join(dir, "missing.gguf"), 1); !os.IsNotExist(unwrapAll(err)) {
		t.Errorf("missing: %v", err)
	}
}

func unwrapAll(err error) error {
	for {
		u, ok := err.(interface{ Unwrap() error })
		if !ok {
			return err
		}
		err = u.Unwrap()
	}
}

func writeSafetensors(t testing.TB, path string, tensors map[string]tensorInfo) {
	t.Helper()
	hdr, err := json.Marshal(map[string]any{"__metadata__": map[string]string{"format": "pt"}})
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]any{}
	_ = json.Unmarshal(hdr, &m)
	var end uint64
	for n, ti := range tensors {
		m[n] = ti
		end = max(end, ti.DataOffsets[1])
	}
	hdr, _ = json.Marshal(m)
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, uint64(len(hdr)))
	b.Write(hdr)
	if err := os.WriteFile(path, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, int64(b.Len())+int64(end)); err != nil {
		t.Fatal(err)
	}
}

func TestSafetensorsEstimate(t *testing.T) {
	dir := t.TempDir()
	// Two shards of a bf16 model plus an index, and a duplicate
	// consolidated file that must not be counted.
	writeSafetensors(t, filepath.Join(dir, "model-00001-of-00002.safetensors"), map[string]tensorInfo{
		"embed.weight": {"BF16", []uint64{1000, 512}, []uint64{0, 1024000}},
		"l0.q.weight":  {"BF16", []uint64{512, 512}, []uint64{1024000, 1548288}},
	})
	writeSafetensors(t, filepath.Join(dir, "model-00002-of-00002.safetensors"), map[string]tensorInfo{
		"l1.q.weight": {"F8_E4M3", []uint64{512, 512}, []uint64{0, 262144}}, // 1 byte/param, no dtype table needed
	})
	writeSafetensors(t, filepath.Join(dir, "consolidated.safetensors"), map[string]tensorInfo{
		"x": {"BF16", []uint64{1 << 20}, []uint64{0, 2 << 20}},
	})
	const weights = 1548288 + 262144
	const params = 1000*512 + 2*512*512

	// Without an index the directory glob applies (consolidated skipped).
	e, err := EstimateVRAM(dir, 4096)
	if err != nil {
		t.Fatal(err)
	}
	if e.WeightsBytes != weights || e.Parameters != params || e.KVCacheBytes != 0 {
		t.Fatalf("no config: %+v", e)
	}

	cfg := `{"architectures":["LlamaForCausalLM"],"num_hidden_layers":2,"num_attention_heads":8,
	         "num_key_value_heads":2,"hidden_size":512,"max_position_embeddings":8192,"torch_dtype":"bfloat16"}`
	if err := os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	idx := `{"metadata":{"total_size":1810432},"weight_map":{"embed.weight":"model-00001-of-00002.safetensors",
	         "l0.q.weight":"model-00001-of-00002.safetensors","l1.q.weight":"model-00002-of-00002.safetensors"}}`
	if err := os.WriteFile(filepath.Join(dir, "model.safetensors.index.json"), []byte(idx), 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path    string
		ctx     int
		wantCtx int
	}{
		{dir, 4096, 4096},
		{filepath.Join(dir, "model.safetensors.index.json"), 1024, 1024},
		{dir, 0, 8192}, // max_position_embeddings
	}
	for _, tc := range tests {
		e, err := EstimateVRAM(tc.path, tc.ctx)
		if err != nil {
			t.Fatal(err)
		}
		// head_dim = 512/8 = 64; KV = 2 × 2 layers × 2 kv heads × 64 × ctx × 2 B
		wantKV := uint64(2 * 2 * 2 * 64 * tc.wantCtx * 2)
		if e.Source != SourceSafetensors || e.WeightsBytes != weights || e.KVCacheBytes != wantKV ||
			e.ContextSize != tc.wantCtx || e.Architecture != "LlamaForCausalLM" {
			t.Fatalf("%s ctx %d: %+v (kv want %d)", tc.path, tc.ctx, e, wantKV)
		}
		if e.VRAMBytes != e.WeightsBytes+e.KVCacheBytes+e.ComputeBytes+e.OverheadBytes {
			t.Fatalf("parts do not sum: %+v", e)
		}
	}

	// A single file works too.
	e, err = EstimateVRAM(filepath.Join(dir, "model-00002-of-00002.safetensors"), 16)
	if err != nil || e.WeightsBytes != 262144 {
		t.Fatalf("single file: %+v %v", e, err)
	}
	if got := Explicit(5 * kib); got.VRAMBytes != 5*kib || got.Source != SourceExplicit {
		t.Fatalf("explicit: %+v", got)
	}
}

func TestSafetensorsBadHeaders(t *testing.T) {
	dir := t.TempDir()
	cases := map[string][]byte{
		"zero.safetensors":  make([]byte, 8),
		"huge.safetensors":  {0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f},
		"short.safetensors": {1, 2, 3},
		"json.safetensors":  append([]byte{5, 0, 0, 0, 0, 0, 0, 0}, []byte("{nope")...),
	}
	for name, body := range cases {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, body, 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := EstimateVRAM(p, 1); err == nil {
			t.Errorf("%s: no error", name)
		}
	}
	escape := filepath.Join(dir, "escape.index.json")
	if err := os.WriteFile(escape, []byte(`{"weight_map":{"a":"../../etc/passwd"}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := EstimateVRAM(escape, 1); err == nil {
		t.Error("index escaping the model dir accepted")
	}
}

// Figures from a corrupt or hostile header or config.json must not wrap
// around to a small estimate that admission would let through.
func TestSafetensorsOverflowSaturates(t *testing.T) {
	dir := t.TempDir()
	// Two tensors of 2^63 bytes each: their sum wraps to 0 in uint64. The
	// header is written by hand, without the 8 EiB of data behind it.
	hdr := []byte(`{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,9223372036854775808]},` +
		`"b":{"dtype":"U8","shape":[1],"data_offsets":[0,9223372036854775808]}}`)
	var b bytes.Buffer
	_ = binary.Write(&b, binary.LittleEndian, uint64(len(hdr)))
	b.Write(hdr)
	p := filepath.Join(dir, "model.safetensors")
	if err := os.WriteFile(p, b.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err := EstimateVRAM(p, 16)
	if err == nil && e.VRAMBytes < 1<<63 {
		t.Errorf("weights of 2 × 2^63 bytes: VRAMBytes = %d (wrapped), want an error or ≥ 2^63", e.VRAMBytes)
	}

	// KV cache: 2 × 2^40 layers × 2^20 heads × 2^10 × 2 B wraps to 0.
	dir2 := t.TempDir()
	writeSafetensors(t, filepath.Join(dir2, "model.safetensors"), map[string]tensorInfo{
		"w": {"BF16", []uint64{4}, []uint64{0, 8}},
	})
	cfg := `{"num_hidden_layers":1099511627776,"num_attention_heads":1048576,"head_dim":1024,"torch_dtype":"bfloat16"}`
	if err := os.WriteFile(filepath.Join(dir2, "config.json"), []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	e, err = EstimateVRAM(dir2, 4096)
	if err == nil && e.VRAMBytes < 1<<63 {
		t.Errorf("KV cache of 2^74 bytes/token: VRAMBytes = %d (wrapped), want an error or ≥ 2^63", e.VRAMBytes)
	}
	// A negative context is no context.
	if e, err := Safetensors(dir2, Options{ContextSize: -1}); err == nil {
		t.Errorf("context -1 accepted: %+v", e)
	}
}
