// Package ggufwrite writes GGUF v3 files (the format of ggml's docs/gguf.md:
// header, metadata key/values, tensor infos, aligned tensor data) and builds
// a tiny llama-architecture model from it, so that tests can run a real
// llama.cpp engine without downloading weights.
package ggufwrite

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math"
	"os"
)

// Value types of GGUF metadata.
const (
	typeUint32  uint32 = 4
	typeInt32   uint32 = 5
	typeFloat32 uint32 = 6
	typeBool    uint32 = 7
	typeString  uint32 = 8
	typeArray   uint32 = 9
)

// tensorF32 is ggml's GGML_TYPE_F32.
const tensorF32 uint32 = 0

// Alignment of the tensor data (general.alignment's default).
const Alignment = 32

// KV is one metadata entry. Value is a uint32, int32, float32, bool, string,
// []string, []float32 or []int32.
type KV struct {
	Key   string
	Value any
}

// Tensor is an F32 tensor. Dims are ggml's ne: Dims[0] is the innermost
// (contiguous) dimension; len(Data) must be their product.
type Tensor struct {
	Name string
	Dims []uint64
	Data []float32
}

// Write writes a GGUF v3 file of kvs and tensors to w.
func Write(w io.Writer, kvs []KV, tensors []Tensor) error {
	bw := bufio.NewWriter(w)
	e := &enc{w: bw}
	e.raw([]byte("GGUF"))
	e.u32(3)
	e.u64(uint64(len(tensors)))
	e.u64(uint64(len(kvs)))
	for _, kv := range kvs {
		e.str(kv.Key)
		if err := e.value(kv.Value); err != nil {
			return fmt.Errorf("ggufwrite: key %s: %w", kv.Key, err)
		}
	}
	var offset uint64
	for _, t := range tensors {
		n := uint64(1)
		for _, d := range t.Dims {
			n *= d
		}
		if n != uint64(len(t.Data)) || len(t.Dims) == 0 {
			return fmt.Errorf("ggufwrite: tensor %s: dims %v hold %d values, data has %d", t.Name, t.Dims, n, len(t.Data))
		}
		e.str(t.Name)
		e.u32(uint32(len(t.Dims)))
		for _, d := range t.Dims {
			e.u64(d)
		}
		e.u32(tensorF32)
		e.u64(offset)
		offset = align(offset + 4*n)
	}
	e.pad()
	for _, t := range tensors {
		for _, v := range t.Data {
			e.u32(math.Float32bits(v))
		}
		e.pad()
	}
	if e.err != nil {
		return fmt.Errorf("ggufwrite: %w", e.err)
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("ggufwrite: %w", err)
	}
	return nil
}

// WriteFile writes the GGUF to path.
func WriteFile(path string, kvs []KV, tensors []Tensor) error {
	f, err := os.Create(path)
	if err != nil {
		return fmt.Errorf("ggufwrite: %w", err)
	}
	if err := Write(f, kvs, tensors); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("ggufwrite: %w", err)
	}
	return nil
}

func align(n uint64) uint64 { return (n + Alignment - 1) / Alignment * Alignment }

// enc writes little-endian values, remembering the first error and the
// number of bytes written (for padding).
type enc struct {
	w   io.Writer
	n   uint64
	err error
}

func (e *enc) raw(b []byte) {
	if e.err != nil {
		return
	}
	n, err := e.w.Write(b)
	e.n += uint64(n)
	e.err = err
}

func (e *enc) u32(v uint32) { e.raw(binary.LittleEndian.AppendUint32(nil, v)) }
func (e *enc) u64(v uint64) { e.raw(binary.LittleEndian.AppendUint64(nil, v)) }

func (e *enc) str(s string) {
	e.u64(uint64(len(s)))
	e.raw([]byte(s))
}

func (e *enc) pad() {
	if p := align(e.n) - e.n; p > 0 {
		e.raw(make([]byte, p))
	}
}

func (e *enc) value(v any) error {
	switch v := v.(type) {
	case uint32:
		e.u32(typeUint32)
		e.u32(v)
	case int32:
		e.u32(typeInt32)
		e.u32(uint32(v))
	case float32:
		e.u32(typeFloat32)
		e.u32(math.Float32bits(v))
	case bool:
		e.u32(typeBool)
		b := byte(0)
		if v {
			b = 1
		}
		e.raw([]byte{b})
	case string:
		e.u32(typeString)
		e.str(v)
	case []string:
		e.u32(typeArray)
		e.u32(typeString)
		e.u64(uint64(len(v)))
		for _, s := range v {
			e.str(s)
		}
	case []float32:
		e.u32(typeArray)
		e.u32(typeFloat32)
		e.u64(uint64(len(v)))
		for _, f := range v {
			e.u32(math.Float32bits(f))
		}
	case []int32:
		e.u32(typeArray)
		e.u32(typeInt32)
		e.u64(uint64(len(v)))
		for _, i := range v {
			e.u32(uint32(i))
		}
	default:
		return errors.New("unsupported value type " + fmt.Sprintf("%T", v))
	}
	return nil
}
