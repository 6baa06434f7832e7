package model

import (
	"bytes"
	"errors"
	"net/http"
	"net/http/httptest"
	"path"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/api"
)

var refSeeds = []string{
	"hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf",
	"hf:a/b", "hf:a/b@main", "hf:a/b@v1.0:dir/f.gguf", "hf:b", "hf:a/b:", "hf:a/b@", "hf:../x", "hf:a/b:../c",
	"file:/models/x.gguf", "file:/", "file:rel", "file:/a/../b", "file:/a:b", "gguf:x", "", ":", "hf:", "hf:a\x00b",
}

// FuzzParseRef: ParseRef either gives a 400 envelope or a reference whose
// canonical form parses back to the same reference and is safe to use as a
// path under the store (no "..", absolute clean file paths).
func FuzzParseRef(f *testing.F) {
	for _, s := range refSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		r, err := ParseRef(s)
		if err != nil {
			var ae *api.Error
			if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
				t.Fatalf("ParseRef(%q) = %v, want a 400 envelope", s, err)
			}
			return
		}
		c := r.String()
		r2, err := ParseRef(c)
		if err != nil || r2 != r {
			t.Fatalf("ParseRef(%q) = %+v; its canonical %q parses as %+v, %v", s, r, c, r2, err)
		}
		switch r.Provider {
		case ProviderFile:
			if !path.IsAbs(r.Path) || path.Clean(r.Path) != r.Path {
				t.Fatalf("ParseRef(%q): file path %q", s, r.Path)
			}
		case ProviderHF:
			if r.Repo == "" || r.Revision == "" {
				t.Fatalf("ParseRef(%q) = %+v: empty repo or revision", s, r)
			}
			for _, part := range []string{r.Repo, r.Revision, r.File} {
				for _, el := range strings.Split(part, "/") {
					if el == ".." || el == "." {
						t.Fatalf("ParseRef(%q) = %+v: %q escapes", s, r, part)
					}
				}
				if strings.ContainsRune(part, 0) {
					t.Fatalf("ParseRef(%q) = %+v: NUL", s, r)
				}
			}
		default:
			t.Fatalf("ParseRef(%q): provider %q", s, r.Provider)
		}
	})
}

// FuzzDownloadBody decodes a POST /v1/models/download body and parses its
// reference, the validation before any download starts: bad input is
// always a 4xx envelope.
func FuzzDownloadBody(f *testing.F) {
	for _, s := range refSeeds {
		f.Add([]byte(`{"model_ref":"` + s + `"}`))
	}
	for _, s := range []string{`{}`, `{"model_ref":null}`, `{"model_ref":1}`, `[]`, ``, `{"model_ref":"hf:a/b"} {}`, `{"model_ref":"\u0000"}`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, body []byte) {
		r := httptest.NewRequest(http.MethodPost, "/v1/models/download", bytes.NewReader(body))
		var req DownloadRequest
		err := api.DecodeJSON(httptest.NewRecorder(), r, &req)
		if err == nil {
			_, err = ParseRef(req.ModelRef)
		}
		if err == nil {
			return
		}
		var ae *api.Error
		if !errors.As(err, &ae) || ae.Status < 400 || ae.Status > 499 {
			t.Fatalf("body %q: %v, want a 4xx envelope", body, err)
		}
	})
}
