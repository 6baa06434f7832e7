// Command testsum reads `go test -json` on stdin and prints what a person
// reading CI output needs: one line per package, the full output of every
// failed test, each skipped test with its reason, and a closing count of
// passed, failed and skipped tests. It exits 1 if anything failed (a test,
// a package, a build) so a pipeline with pipefail or without it fails.
//
//	go test -json ./... | go run ./internal/testsum
package main

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
)

// event is one line of `go test -json` (cmd/test2json).
type event struct {
	Action  string
	Package string
	Test    string
	Elapsed float64
	Output  string
}

type key struct{ pkg, test string }

type summary struct {
	out      io.Writer
	output   map[key]*strings.Builder // per test (and per package, test ""), until it ends
	passed   int
	failed   []string
	skipped  []string
	pkgFails int
}

func main() {
	s := &summary{out: os.Stdout, output: map[key]*strings.Builder{}}
	if err := s.read(os.Stdin); err != nil {
		fmt.Fprintln(os.Stderr, "testsum:", err)
		os.Exit(1)
	}
	if !s.report() {
		os.Exit(1)
	}
}

func (s *summary) read(r io.Reader) error {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		line := sc.Bytes()
		var e event
		if len(line) == 0 || line[0] != '{' || json.Unmarshal(line, &e) != nil {
			// Not test2json (a build error printed by the go command).
			fmt.Fprintln(s.out, string(line))
			continue
		}
		s.handle(e)
	}
	return sc.Err()
}

func (s *summary) buf(k key) *strings.Builder {
	b := s.output[k]
	if b == nil {
		b = &strings.Builder{}
		s.output[k] = b
	}
	return b
}

func (s *summary) handle(e event) {
	k := key{e.Package, e.Test}
	switch e.Action {
	case "output", "build-output":
		s.buf(k).WriteString(e.Output)
	case "pass":
		if e.Test != "" {
			s.passed++
		} else {
			fmt.Fprintf(s.out, "ok   %s %.1fs\n", e.Package, e.Elapsed)
		}
		delete(s.output, k)
	case "skip":
		if e.Test != "" {
			s.skipped = append(s.skipped, e.Package+" "+e.Test+": "+skipReason(s.buf(k).String()))
		} else {
			fmt.Fprintf(s.out, "ok   %s (no tests)\n", e.Package)
		}
		delete(s.output, k)
	case "fail", "build-fail":
		if e.Test != "" {
			s.failed = append(s.failed, e.Package+" "+e.Test)
			fmt.Fprintf(s.out, "=== FAIL %s %s\n%s", e.Package, e.Test, s.buf(k).String())
		} else {
			s.pkgFails++
			// The package's own output: a panic, a timeout, or the
			// build error; test lines were printed with their tests.
			fmt.Fprintf(s.out, "FAIL %s %.1fs\n%s", e.Package, e.Elapsed, s.buf(k).String())
		}
		delete(s.output, k)
	}
}

// skipReason is the message of a skipped test: the lines after its
// "--- SKIP" header (the t.Skip text), joined.
func skipReason(out string) string {
	var lines []string
	after := false
	for _, l := range strings.Split(out, "\n") {
		if strings.Contains(l, "--- SKIP") {
			after = true
			continue
		}
		if after && strings.TrimSpace(l) != "" {
			lines = append(lines, strings.TrimSpace(l))
		}
	}
	return strings.Join(lines, " ")
}

// report prints the skips and the count and says whether all passed.
func (s *summary) report() bool {
	sort.Strings(s.skipped)
	for _, sk := range s.skipped {
		fmt.Fprintln(s.out, "SKIP", sk)
	}
	for _, f := range s.failed {
		fmt.Fprintln(s.out, "FAILED", f)
	}
	fmt.Fprintf(s.out, "tests: %d passed, %d failed, %d skipped\n", s.passed, len(s.failed), len(s.skipped))
	return len(s.failed) == 0 && s.pkgFails == 0
}
