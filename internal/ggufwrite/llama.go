package ggufwrite

import (
	"fmt"
	"math/rand/v2"
)

// Token types of tokenizer.ggml.token_type (llama.cpp's llama_token_type).
const (
	TokenNormal  int32 = 1
	TokenUnknown int32 = 2
	TokenControl int32 = 3
	TokenByte    int32 = 6
)

// Llama describes a tiny llama-architecture model. Zero fields take the
// defaults of TinyLlama.
type Llama struct {
	Layers    int    // block_count (2)
	Embedding int    // embedding_length (64)
	Heads     int    // attention.head_count (4)
	KVHeads   int    // attention.head_count_kv (2)
	FF        int    // feed_forward_length (128)
	Context   int    // context_length (512)
	Seed      uint64 // weights are random from this seed
}

// Vocab is the tokenizer every model here gets: <unk> <s> </s>, the 256 byte
// tokens <0x00>…<0xFF>, then one normal token per printable ASCII character
// (space spelled "▁", as SentencePiece does).
func Vocab() (tokens []string, scores []float32, types []int32) {
	add := func(tok string, score float32, typ int32) {
		tokens = append(tokens, tok)
		scores = append(scores, score)
		types = append(types, typ)
	}
	add("<unk>", 0, TokenUnknown)
	add("<s>", 0, TokenControl)
	add("</s>", 0, TokenControl)
	for b := 0; b < 256; b++ {
		add(fmt.Sprintf("<0x%02X>", b), 0, TokenByte)
	}
	for c := byte(0x20); c < 0x7f; c++ {
		tok := string(c)
		if c == ' ' {
			tok = "\u2581"
		}
		add(tok, -float32(c-0x20)/100, TokenNormal)
	}
	return tokens, scores, types
}

func (l Llama) withDefaults() Llama {
	def := func(v *int, d int) {
		if *v <= 0 {
			*v = d
		}
	}
	def(&l.Layers, 2)
	def(&l.Embedding, 64)
	def(&l.Heads, 4)
	def(&l.KVHeads, 2)
	def(&l.FF, 128)
	def(&l.Context, 512)
	return l
}

// Model returns the metadata and tensors of l. The weights are random, so
// the text is garbage, but generation never stops early: the last residual
// dimension is a constant 1 in every token embedding that no layer writes
// to, and output.weight maps it to a large negative logit for every token
// that is not a printable character, so </s>, <unk> and byte tokens are
// never sampled.
func (l Llama) Model() ([]KV, []Tensor, error) {
	l = l.withDefaults()
	if l.Embedding%l.Heads != 0 || l.Heads%l.KVHeads != 0 || l.Embedding < 2 {
		return nil, nil, fmt.Errorf("ggufwrite: embedding %d, heads %d, kv heads %d do not divide", l.Embedding, l.Heads, l.KVHeads)
	}
	tokens, scores, types := Vocab()
	nv, ne, nff := uint64(len(tokens)), uint64(l.Embedding), uint64(l.FF)
	headDim := l.Embedding / l.Heads
	nkv := uint64(headDim * l.KVHeads)
	bias := ne - 1 // the constant residual dimension
	rng := rand.New(rand.NewPCG(l.Seed, 0x72626565))

	random := func(n uint64, scale float32) []float32 {
		d := make([]float32, n)
		for i := range d {
			d[i] = (rng.Float32()*2 - 1) * scale
		}
		return d
	}
	ones := func(n uint64) []float32 {
		d := make([]float32, n)
		for i := range d {
			d[i] = 1
		}
		return d
	}
	// zeroRow clears output row `bias` of a matrix with ne[0]=in, ne[1]=out.
	zeroRow := func(d []float32, in uint64) []float32 {
		for i := uint64(0); i < in; i++ {
			d[bias*in+i] = 0
		}
		return d
	}

	embd := random(ne*nv, 0.5)
	out := random(ne*nv, 0.5)
	for t := uint64(0); t < nv; t++ {
		embd[t*ne+bias] = 1
		out[t*ne+bias] = 0
		if types[t] != TokenNormal {
			out[t*ne+bias] = -1000
		}
	}
	tensors := []Tensor{
		{Name: "token_embd.weight", Dims: []uint64{ne, nv}, Data: embd},
		{Name: "output_norm.weight", Dims: []uint64{ne}, Data: ones(ne)},
		{Name: "output.weight", Dims: []uint64{ne, nv}, Data: out},
	}
	for b := 0; b < l.Layers; b++ {
		p := fmt.Sprintf("blk.%d.", b)
		tensors = append(tensors,
			Tensor{Name: p + "attn_norm.weight", Dims: []uint64{ne}, Data: ones(ne)},
			Tensor{Name: p + "attn_q.weight", Dims: []uint64{ne, ne}, Data: random(ne*ne, 0.2)},
			Tensor{Name: p + "attn_k.weight", Dims: []uint64{ne, nkv}, Data: random(ne*nkv, 0.2)},
			Tensor{Name: p + "attn_v.weight", Dims: []uint64{ne, nkv}, Data: random(ne*nkv, 0.2)},
			Tensor{Name: p + "attn_output.weight", Dims: []uint64{ne, ne}, Data: zeroRow(random(ne*ne, 0.1), ne)},
			Tensor{Name: p + "ffn_norm.weight", Dims: []uint64{ne}, Data: ones(ne)},
			Tensor{Name: p + "ffn_gate.weight", Dims: []uint64{ne, nff}, Data: random(ne*nff, 0.2)},
			Tensor{Name: p + "ffn_up.weight", Dims: []uint64{ne, nff}, Data: random(ne*nff, 0.2)},
			Tensor{Name: p + "ffn_down.weight", Dims: []uint64{nff, ne}, Data: zeroRow(random(nff*ne, 0.1), nff)},
		)
	}
	kvs := []KV{
		{"general.architecture", "llama"},
		{"general.name", "rbee tiny llama"},
		{"general.file_type", uint32(0)}, // ALL_F32
		{"llama.context_length", uint32(l.Context)},
		{"llama.embedding_length", uint32(l.Embedding)},
		{"llama.block_count", uint32(l.Layers)},
		{"llama.feed_forward_length", uint32(l.FF)},
		{"llama.attention.head_count", uint32(l.Heads)},
		{"llama.attention.head_count_kv", uint32(l.KVHeads)},
		{"llama.attention.layer_norm_rms_epsilon", float32(1e-5)},
		{"llama.rope.dimension_count", uint32(headDim)},
		{"llama.rope.freq_base", float32(10000)},
		{"llama.vocab_size", uint32(nv)},
		{"tokenizer.ggml.model", "llama"},
		{"tokenizer.ggml.tokens", tokens},
		{"tokenizer.ggml.scores", scores},
		{"tokenizer.ggml.token_type", types},
		{"tokenizer.ggml.unknown_token_id", uint32(0)},
		{"tokenizer.ggml.bos_token_id", uint32(1)},
		{"tokenizer.ggml.eos_token_id", uint32(2)},
		{"tokenizer.ggml.add_bos_token", true},
		{"tokenizer.ggml.add_eos_token", false},
	}
	return kvs, tensors, nil
}

// TinyLlama writes the default tiny model (2 layers, embedding 64, 4 heads /
// 2 KV heads, feed-forward 128, F32, context 512; about 0.5 MB) to path.
func TinyLlama(path string) error { return Llama{}.WriteFile(path) }

// WriteFile writes l's model to path.
func (l Llama) WriteFile(path string) error {
	kvs, tensors, err := l.Model()
	if err != nil {
		return err
	}
	return WriteFile(path, kvs, tensors)
}
