package main

import (
	"strings"
	"testing"
)

func TestSummary(t *testing.T) {
	in := strings.Join([]string{
		`{"Action":"run","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestA","Output":"=== RUN   TestA\n"}`,
		`{"Action":"pass","Package":"p","Test":"TestA"}`,
		`{"Action":"output","Package":"p","Test":"TestB","Output":"--- SKIP: TestB (0.00s)\n"}`,
		`{"Action":"output","Package":"p","Test":"TestB","Output":"    b_test.go:9: promtool not installed\n"}`,
		`{"Action":"skip","Package":"p","Test":"TestB"}`,
		`{"Action":"output","Package":"p","Test":"TestC","Output":"    c_test.go:3: got 1, want 2\n"}`,
		`{"Action":"fail","Package":"p","Test":"TestC"}`,
		`{"Action":"fail","Package":"p","Elapsed":1.5}`,
		`{"Action":"pass","Package":"q","Elapsed":0.2}`,
		`# r`,
		`r/x.go:1:1: syntax error`,
	}, "\n")
	tests := []struct {
		name  string
		input string
		ok    bool
		wants []string
	}{
		{"mixed", in, false, []string{
			"=== FAIL p TestC\n    c_test.go:3: got 1, want 2\n",
			"FAIL p 1.5s",
			"ok   q 0.2s",
			"r/x.go:1:1: syntax error",
			"SKIP p TestB: b_test.go:9: promtool not installed",
			"tests: 1 passed, 1 failed, 1 skipped",
		}},
		{"all pass", `{"Action":"pass","Package":"p","Test":"TestA"}` + "\n" + `{"Action":"pass","Package":"p"}`, true,
			[]string{"tests: 1 passed, 0 failed, 0 skipped"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out strings.Builder
			s := &summary{out: &out, output: map[key]*strings.Builder{}}
			if err := s.read(strings.NewReader(tt.input)); err != nil {
				t.Fatal(err)
			}
			if ok := s.report(); ok != tt.ok {
				t.Errorf("report() = %v, want %v", ok, tt.ok)
			}
			for _, w := range tt.wants {
				if !strings.Contains(out.String(), w) {
					t.Errorf("output lacks %q:\n%s", w, out.String())
				}
			}
		})
	}
}
