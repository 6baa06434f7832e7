package config

import (
	"fmt"
	"reflect"
	"strings"

	"github.com/pelletier/go-toml/v2/unstable"
)

// keyPos is where a key (or table header) is written and the TOML kind of
// its value.
type keyPos struct {
	line int
	kind unstable.Kind
	raw  string // the value as written, for scalars
}

// positions maps full dotted keys ("workers.restart.jitter",
// "gpu.fake[1].name", "backends.llama") to where the file sets them.
type positions map[string]keyPos

// line returns the line of key, else of the nearest enclosing table that
// the file writes, else 0.
func (p positions) line(key string) int {
	for k := key; k != ""; {
		if kp, ok := p[k]; ok {
			return kp.line
		}
		i := strings.LastIndexAny(k, ".[")
		if i < 0 {
			break
		}
		k = k[:i]
	}
	return 0
}

// scan indexes every key of a TOML document with its line, and rejects
// what the decoder would accept silently or report without a position: a
// key set twice, a table defined twice, an integer or float where a
// duration is expected, a negative or fractional byte count. A syntax error
// returns nil positions and no error: the decoder reports it with its line.
func scan(data []byte) (positions, error) {
	pos := positions{}
	var p unstable.Parser
	p.Reset(data)
	tables := map[string]bool{} // explicitly defined [tables]
	arrays := map[string]int{}  // [[array tables]] seen so far
	prefix := ""
	for p.NextExpression() {
		e := p.Expression()
		switch e.Kind {
		case unstable.Table, unstable.ArrayTable:
			name, line := joinKey(&p, e.Key())
			if e.Kind == unstable.ArrayTable {
				n := arrays[name]
				arrays[name] = n + 1
				prefix = fmt.Sprintf("%s[%d]", name, n)
			} else {
				if tables[name] {
					return nil, &posError{line: line, key: name, msg: fmt.Sprintf("table defined twice (first on line %d)", pos[name].line)}
				}
				tables[name] = true
				prefix = name
			}
			if _, ok := pos[prefix]; !ok {
				pos[prefix] = keyPos{line: line, kind: e.Kind}
			}
		case unstable.KeyValue:
			if err := scanKeyValue(&p, e, prefix, pos); err != nil {
				return nil, err
			}
		}
	}
	if p.Error() != nil {
		return nil, nil
	}
	return pos, nil
}

func scanKeyValue(p *unstable.Parser, e *unstable.Node, prefix string, pos positions) error {
	name, line := joinKey(p, e.Key())
	full := name
	if prefix != "" {
		full = prefix + "." + name
	}
	if prev, ok := pos[full]; ok {
		return &posError{line: line, key: full, msg: fmt.Sprintf("key set twice (first on line %d)", prev.line)}
	}
	v := e.Value()
	kp := keyPos{line: line, kind: v.Kind}
	if v.Kind != unstable.Array && v.Kind != unstable.InlineTable {
		kp.raw = string(v.Data)
	}
	pos[full] = kp
	if err := checkKind(full, kp); err != nil {
		return err
	}
	switch v.Kind {
	case unstable.InlineTable:
		for it := v.Children(); it.Next(); {
			if err := scanKeyValue(p, it.Node(), full, pos); err != nil {
				return err
			}
		}
	case unstable.Array:
		i := 0
		for it := v.Children(); it.Next(); i++ {
			if c := it.Node(); c.Kind == unstable.InlineTable {
				elem := fmt.Sprintf("%s[%d]", full, i)
				pos[elem] = keyPos{line: line, kind: c.Kind}
				for kv := c.Children(); kv.Next(); {
					if err := scanKeyValue(p, kv.Node(), elem, pos); err != nil {
						return err
					}
				}
			}
		}
	}
	return nil
}

// joinKey returns a (possibly dotted) key and the line it starts on.
func joinKey(p *unstable.Parser, it unstable.Iterator) (string, int) {
	var parts []string
	line := 0
	for it.Next() {
		n := it.Node()
		if line == 0 {
			line = p.Shape(n.Raw).Start.Line
		}
		parts = append(parts, string(n.Data))
	}
	return strings.Join(parts, "."), line
}

var (
	durationType = reflect.TypeOf(Duration(0))
	sizeType     = reflect.TypeOf(Size(0))
)

// checkKind rejects a value whose TOML kind the decoder would misread for
// the Go type at key: an integer duration is nanoseconds to go-toml.
func checkKind(key string, kp keyPos) error {
	switch fieldType(reflect.TypeOf(Config{}), key) {
	case durationType:
		if kp.kind == unstable.Integer || kp.kind == unstable.Float {
			return &posError{line: kp.line, key: key, msg: fmt.Sprintf("a duration needs a unit: write \"%ss\" (or \"ms\", \"m\", \"h\"), not %s", kp.raw, kp.raw)}
		}
	case sizeType:
		switch {
		case kp.kind == unstable.Float:
			return &posError{line: kp.line, key: key, msg: fmt.Sprintf("a size is a whole number of bytes or a string with a unit (e.g. \"512MiB\"), not %s", kp.raw)}
		case kp.kind == unstable.Integer && strings.HasPrefix(kp.raw, "-"):
			return &posError{line: kp.line, key: key, msg: fmt.Sprintf("a size must not be negative: %s", kp.raw)}
		}
	}
	return nil
}

// fieldType returns the Go type the decoder fills for a full dotted key,
// or nil if no field has that key.
func fieldType(t reflect.Type, key string) reflect.Type {
	segs := strings.Split(key, ".")
	for i := 0; i < len(segs); i++ {
		name, _, indexed := strings.Cut(segs[i], "[")
		if t.Kind() != reflect.Struct {
			return nil
		}
		f, ok := fieldByTag(t, name)
		if !ok {
			return nil
		}
		t = f
		if indexed && t.Kind() == reflect.Slice {
			t = t.Elem()
		}
		if t.Kind() == reflect.Map && i+1 < len(segs) {
			i++ // this segment names the entry
			t = t.Elem()
		}
	}
	return t
}

func fieldByTag(t reflect.Type, name string) (reflect.Type, bool) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		if tag, _, _ := strings.Cut(f.Tag.Get("toml"), ","); tag == name {
			return f.Type, true
		}
	}
	return nil, false
}
