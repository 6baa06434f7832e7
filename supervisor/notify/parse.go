package notify

import (
	"bytes"
	"errors"
	"fmt"
	"unicode/utf8"
)

// MaxKeyLen bounds one key; sd_notify keys are short words like WATCHDOG.
const MaxKeyLen = 64

// ErrMalformed is wrapped by every Parse error.
var ErrMalformed = errors.New("notify: malformed message")

// Fields is a parsed sd_notify message: the assignments in the order sent,
// as spans over the bytes they were parsed from. Parsing into the same
// Fields again reuses its storage, so the receive loop parses without
// allocating. Repeated keys are kept: Lookup returns the last value, as a
// map built from the message would. A Fields handed to a Handler views the
// receive buffer and is valid only during that call; Clone or Map keep it.
type Fields struct {
	b     []byte
	spans []span
}

// span is one KEY=VALUE: b[k0:k1] is the key, b[k1+1:v1] the value.
type span struct{ k0, k1, v1 int32 }

// Parse reads an sd_notify message into f: newline-separated KEY=VALUE
// assignments. Empty lines are skipped (a trailing newline is common).
// Unknown keys are kept: the caller decides what it understands. A message
// is malformed when it is empty, is not UTF-8, holds a NUL byte, or has a
// line without '=' or with a key that is not 1..64 of [A-Za-z0-9_]. f then
// holds no fields. f refers to b until the next Parse.
func (f *Fields) Parse(b []byte) error {
	f.b, f.spans = nil, f.spans[:0]
	if len(b) == 0 {
		return fmt.Errorf("%w: empty", ErrMalformed)
	}
	if !utf8.Valid(b) {
		return fmt.Errorf("%w: not UTF-8", ErrMalformed)
	}
	if bytes.IndexByte(b, 0) >= 0 {
		return fmt.Errorf("%w: NUL byte", ErrMalformed)
	}
	for start := 0; start < len(b); {
		end := bytes.IndexByte(b[start:], '\n')
		if end < 0 {
			end = len(b)
		} else {
			end += start
		}
		line := b[start:end]
		if len(line) > 0 {
			eq := bytes.IndexByte(line, '=')
			if eq < 0 {
				f.spans = f.spans[:0]
				return fmt.Errorf("%w: line without '='", ErrMalformed)
			}
			if !validKey(line[:eq]) {
				f.spans = f.spans[:0]
				return fmt.Errorf("%w: bad key %q", ErrMalformed, truncate(string(line[:eq]), MaxKeyLen))
			}
			f.spans = append(f.spans, span{k0: int32(start), k1: int32(start + eq), v1: int32(end)})
		}
		start = end + 1
	}
	if len(f.spans) == 0 {
		return fmt.Errorf("%w: no assignments", ErrMalformed)
	}
	f.b = b
	return nil
}

// Len is the number of assignments, repeated keys counted each time.
func (f *Fields) Len() int { return len(f.spans) }

// Key is the i-th assignment's key (0 <= i < Len). The slice views the
// parsed bytes: do not modify or keep it.
func (f *Fields) Key(i int) []byte { s := f.spans[i]; return f.b[s.k0:s.k1] }

// Value is the i-th assignment's value, like Key.
func (f *Fields) Value(i int) []byte { s := f.spans[i]; return f.b[s.k1+1 : s.v1] }

// Lookup returns the last value assigned to key, like Key.
func (f *Fields) Lookup(key string) ([]byte, bool) {
	for i := len(f.spans) - 1; i >= 0; i-- {
		if string(f.Key(i)) == key {
			return f.Value(i), true
		}
	}
	return nil, false
}

// Is reports whether key's last value is value.
func (f *Fields) Is(key, value string) bool {
	v, ok := f.Lookup(key)
	return ok && string(v) == value
}

// Map copies the fields into a map (the last value of a repeated key).
func (f *Fields) Map() map[string]string {
	m := make(map[string]string, len(f.spans))
	for i := range f.spans {
		m[string(f.Key(i))] = string(f.Value(i))
	}
	return m
}

// Clone returns a copy that owns its bytes.
func (f *Fields) Clone() Fields {
	return Fields{b: bytes.Clone(f.b), spans: append([]span(nil), f.spans...)}
}

// Parse reads an sd_notify message into a map: Fields.Parse's rules, the
// last value of a repeated key winning. It allocates; the receive loop uses
// Fields.
func Parse(b []byte) (map[string]string, error) {
	var f Fields
	if err := f.Parse(b); err != nil {
		return nil, err
	}
	return f.Map(), nil
}

func validKey(k []byte) bool {
	if len(k) == 0 || len(k) > MaxKeyLen {
		return false
	}
	for _, c := range k {
		if !(c >= 'A' && c <= 'Z' || c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}
