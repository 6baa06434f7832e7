package notify

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"
)

// MaxKeyLen bounds one key; sd_notify keys are short words like WATCHDOG.
const MaxKeyLen = 64

// ErrMalformed is wrapped by every Parse error.
var ErrMalformed = errors.New("notify: malformed message")

// Parse reads an sd_notify message: newline-separated KEY=VALUE
// assignments. Empty lines are skipped (a trailing newline is common);
// when a key repeats the last value wins. Unknown keys are kept: the
// caller decides what it understands. A message is malformed when it is
// empty, is not UTF-8, holds a NUL byte, or has a line without '=' or with
// a key that is not 1..64 of [A-Za-z0-9_].
func Parse(b []byte) (map[string]string, error) {
	if len(b) == 0 {
		return nil, fmt.Errorf("%w: empty", ErrMalformed)
	}
	if !utf8.Valid(b) {
		return nil, fmt.Errorf("%w: not UTF-8", ErrMalformed)
	}
	// One string for the whole datagram; keys and values are substrings of
	// it, so parsing costs one allocation plus the map.
	s := string(b)
	if strings.IndexByte(s, 0) >= 0 {
		return nil, fmt.Errorf("%w: NUL byte", ErrMalformed)
	}
	m := make(map[string]string, strings.Count(s, "\n")+1)
	for line := range strings.SplitSeq(s, "\n") {
		if line == "" {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%w: line without '='", ErrMalformed)
		}
		if !validKey(k) {
			return nil, fmt.Errorf("%w: bad key %q", ErrMalformed, truncate(k, MaxKeyLen))
		}
		m[k] = v
	}
	if len(m) == 0 {
		return nil, fmt.Errorf("%w: no assignments", ErrMalformed)
	}
	return m, nil
}

func validKey(k string) bool {
	if len(k) == 0 || len(k) > MaxKeyLen {
		return false
	}
	for i := 0; i < len(k); i++ {
		c := k[i]
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
