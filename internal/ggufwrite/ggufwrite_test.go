package ggufwrite

import (
	"bytes"
	"encoding/binary"
	"math"
	"os"
	"path/filepath"
	"testing"

	gguf "github.com/gpustack/gguf-parser-go"
)

// TestTinyLlamaReadsBack parses the written model with gguf-parser-go (the
// parser the hive's admission uses) and checks what llama.cpp needs.
func TestTinyLlamaReadsBack(t *testing.T) {
	path := filepath.Join(t.TempDir(), "tiny.gguf")
	if err := TinyLlama(path); err != nil {
		t.Fatal(err)
	}
	gf, err := gguf.ParseGGUFFile(path)
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	if gf.Header.Version != 3 {
		t.Errorf("version %d, want 3", gf.Header.Version)
	}
	a := gf.Architecture()
	for _, c := range []struct {
		name      string
		got, want uint64
	}{
		{"block count", a.BlockCount, 2},
		{"embedding", a.EmbeddingLength, 64},
		{"heads", a.AttentionHeadCount, 4},
		{"kv heads", a.AttentionHeadCountKV, 2},
		{"feed forward", a.FeedForwardLength[0], 128},
		{"context", a.MaximumContextLength, 512},
		{"vocabulary", a.VocabularyLength, 3 + 256 + 95},
		{"tensors", gf.Header.TensorCount, 3 + 2*9},
	} {
		if c.got != c.want {
			t.Errorf("%s = %d, want %d", c.name, c.got, c.want)
		}
	}
	if a.Architecture != "llama" {
		t.Errorf("architecture %q", a.Architecture)
	}
	tk := gf.Tokenizer()
	if tk.Model != "llama" || tk.TokensLength != 354 || tk.BOSTokenID != 1 || tk.EOSTokenID != 2 || tk.UnknownTokenID != 0 {
		t.Errorf("tokenizer %+v", tk)
	}
	kv, ok := gf.Header.MetadataKV.Get("tokenizer.ggml.tokens")
	if !ok {
		t.Fatal("no tokens")
	}
	toks := kv.ValueArray().ValuesString()
	if toks[3] != "<0x00>" || toks[258] != "<0xFF>" || toks[259] != "\u2581" || toks[260] != "!" || toks[353] != "~" {
		t.Errorf("tokens %q %q %q %q %q", toks[3], toks[258], toks[259], toks[260], toks[353])
	}

	// The data of output.weight sits where its tensor info says: the bias
	// column is -1000 for </s> and 0 for a printable character.
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, ti := range gf.TensorInfos {
		if ti.Name != "output.weight" {
			continue
		}
		at := func(i uint64) float32 {
			off := uint64(gf.TensorDataStartOffset) + ti.Offset + 4*i
			return math.Float32frombits(binary.LittleEndian.Uint32(raw[off:]))
		}
		if v := at(2*64 + 63); v != -1000 {
			t.Errorf("output bias of </s> = %v", v)
		}
		if v := at(260*64 + 63); v != 0 {
			t.Errorf("output bias of '!' = %v", v)
		}
		if ti.Offset%Alignment != 0 {
			t.Errorf("offset %d not aligned", ti.Offset)
		}
	}
	if st, _ := os.Stat(path); st.Size() > 1<<20 {
		t.Errorf("model is %d bytes, want about 0.5 MB", st.Size())
	}
}

func TestWriteErrors(t *testing.T) {
	tests := []struct {
		name    string
		kvs     []KV
		tensors []Tensor
	}{
		{"dims do not match data", nil, []Tensor{{Name: "x", Dims: []uint64{2, 2}, Data: []float32{1}}}},
		{"no dims", nil, []Tensor{{Name: "x", Data: nil}}},
		{"unsupported value", []KV{{"k", 1.5}}, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if err := Write(&bytes.Buffer{}, tc.kvs, tc.tensors); err == nil {
				t.Fatal("no error")
			}
		})
	}
	if _, _, err := (Llama{Embedding: 10, Heads: 4}).Model(); err == nil {
		t.Error("embedding 10 / 4 heads accepted")
	}
}
