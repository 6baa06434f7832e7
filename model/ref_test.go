package model

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/rbee/rbee-hive/api"
)

func TestParseRef(t *testing.T) {
	good := []struct {
		in   string
		want Ref
		str  string
	}{
		{"hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF", Ref{Provider: "hf", Repo: "Qwen/Qwen2.5-0.5B-Instruct-GGUF", Revision: "main"}, "hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF@main"},
		{"hf:org/repo:model-q4_k_m.gguf", Ref{Provider: "hf", Repo: "org/repo", Revision: "main", File: "model-q4_k_m.gguf"}, "hf:org/repo@main:model-q4_k_m.gguf"},
		{"hf:org/repo@v1.0:sub/dir/x.gguf", Ref{Provider: "hf", Repo: "org/repo", Revision: "v1.0", File: "sub/dir/x.gguf"}, ""},
		{"hf:org/repo@refs/pr/1", Ref{Provider: "hf", Repo: "org/repo", Revision: "refs/pr/1"}, ""},
		{"hf:gpt2", Ref{Provider: "hf", Repo: "gpt2", Revision: "main"}, "hf:gpt2@main"},
		{"file:/srv/models/x.gguf", Ref{Provider: "file", Path: "/srv/models/x.gguf"}, "file:/srv/models/x.gguf"},
	}
	for _, tc := range good {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseRef(tc.in)
			if err != nil {
				t.Fatalf("ParseRef(%q) = %v", tc.in, err)
			}
			if got != tc.want {
				t.Fatalf("ParseRef(%q) = %+v, want %+v", tc.in, got, tc.want)
			}
			if tc.str != "" && got.String() != tc.str {
				t.Fatalf("String() = %q, want %q", got.String(), tc.str)
			}
			// The canonical form parses back to the same Ref.
			again, err := ParseRef(got.String())
			if err != nil || again != got {
				t.Fatalf("round trip %q: %+v, %v", got.String(), again, err)
			}
		})
	}

	bad := []struct {
		name, in, msg string
	}{
		{"empty", "", "string is empty"},
		{"too long", "hf:org/" + strings.Repeat("a", 593), "string too long: 600 chars (max 512)"},
		{"traversal", "hf:../x", "path traversal sequence detected"},
		{"traversal in file", "hf:org/repo:a/../../etc/passwd", "path traversal sequence detected"},
		{"dotdot file", "hf:org/repo:..", "'..' segment"},
		{"dotdot rev", "hf:org/repo@..", "'..' segment"},
		{"semicolon", "hf:a;rm", "shell metacharacter found: ';'"},
		{"pipe", "hf:a|b", "shell metacharacter found: '|'"},
		{"dollar", "hf:$(id)", "shell metacharacter found: '$'"},
		{"backtick", "hf:a`id`", "shell metacharacter found: '`'"},
		{"newline", "hf:a\nb", "shell metacharacter found: '\\n'"},
		{"null", "hf:a\x00b", "null byte found in string"},
		{"space", "hf:org/re po", "invalid characters found: ' '"},
		{"unicode", "hf:org/ré", "invalid characters found: 'é'"},
		{"s3", "s3:x", `unsupported provider "s3"`},
		{"no provider", "org/repo", "has no provider"},
		{"three parts", "hf:a/b/c", "must be <org>/<name>"},
		{"empty repo", "hf:", "must be <org>/<name>"},
		{"empty org", "hf:/x", "empty org or name"},
		{"double dash", "hf:a--b/c", "'--'"},
		{"leading dot", "hf:.a/b", "start or end"},
		{"empty file", "hf:a/b:", "empty file name"},
		{"extra colon", "hf:a/b:c:d", "contains ':'"},
		{"empty rev", "hf:a/b@:x", "empty revision"},
		{"relative file ref", "file:models/x", "not absolute"},
		{"unclean file ref", "file:/a//b", "not clean"},
		{"file dotdot", "file:/a/..", "path traversal"},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseRef(tc.in)
			var ae *api.Error
			if !errors.As(err, &ae) {
				t.Fatalf("ParseRef(%q) = %v, want *api.Error", tc.in, err)
			}
			if ae.Status != http.StatusBadRequest || ae.Code != api.CodeValidation {
				t.Fatalf("got %d %s", ae.Status, ae.Code)
			}
			if !strings.HasPrefix(ae.Message, "Invalid model_ref: ") || !strings.Contains(ae.Message, tc.msg) {
				t.Fatalf("message %q does not contain %q", ae.Message, tc.msg)
			}
		})
	}
}

func TestSelectFiles(t *testing.T) {
	f := func(p string, size uint64) RepoFile { return RepoFile{Path: p, Size: size} }
	st := []RepoFile{
		f("model-00001-of-00002.safetensors", 10), f("model-00002-of-00002.safetensors", 20),
		f("model.safetensors.index.json", 1), f("pytorch_model.bin", 30), f("consolidated.safetensors", 30),
		f("original/consolidated.00.pth", 30), f("config.json", 1), f("tokenizer.json", 2),
		f("tokenizer_config.json", 1), f("README.md", 1), f(".gitattributes", 1), f("tokenizer.model", 3),
	}
	gguf := []RepoFile{f("a-q4.gguf", 5), f("a-q8.gguf", 9), f("big-00001-of-00002.gguf", 7), f("big-00002-of-00002.gguf", 8), f("mmproj-f16.gguf", 2)}
	tests := []struct {
		name  string
		ref   string
		files []RepoFile
		want  []string
		main  string
		total uint64
		code  int
	}{
		{"safetensors skips duplicates", "hf:o/r", st, []string{"config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
			"model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"}, "", 38, 0},
		{"bin only when no safetensors", "hf:o/r", []RepoFile{f("pytorch_model.bin", 30), f("config.json", 1)}, []string{"config.json", "pytorch_model.bin"}, "", 31, 0},
		{"named gguf", "hf:o/r:a-q8.gguf", gguf, []string{"a-q8.gguf"}, "a-q8.gguf", 9, 0},
		{"split gguf brings its shards", "hf:o/r:big-00002-of-00002.gguf", gguf, []string{"big-00001-of-00002.gguf", "big-00002-of-00002.gguf"}, "big-00001-of-00002.gguf", 15, 0},
		{"single gguf repo", "hf:o/r", []RepoFile{f("x.gguf", 4), f("mmproj-x.gguf", 1), f("README.md", 1)}, []string{"x.gguf"}, "x.gguf", 4, 0},
		{"several ggufs must be named", "hf:o/r", gguf, nil, "", 0, http.StatusBadRequest},
		{"missing file", "hf:o/r:nope.gguf", gguf, nil, "", 0, http.StatusNotFound},
		{"no weights", "hf:o/r", []RepoFile{f("README.md", 1)}, nil, "", 0, http.StatusBadRequest},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ref, err := ParseRef(tc.ref)
			if err != nil {
				t.Fatal(err)
			}
			sel, err := selectFiles(ref, tc.files)
			if tc.code != 0 {
				if ae := api.AsError(err); err == nil || ae.Status != tc.code {
					t.Fatalf("selectFiles = %v, want status %d", err, tc.code)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, f := range sel.files {
				got = append(got, f.Path)
			}
			if strings.Join(got, ",") != strings.Join(tc.want, ",") || sel.main != tc.main || sel.total != tc.total {
				t.Fatalf("got %v main %q total %d; want %v main %q total %d", got, sel.main, sel.total, tc.want, tc.main, tc.total)
			}
		})
	}
}

func TestNextLink(t *testing.T) {
	tests := map[string]string{
		`<https://h/api/models/a/b/tree/main?cursor=x>; rel="next"`: "https://h/api/models/a/b/tree/main?cursor=x",
		`<https://h/p1>; rel="prev", <https://h/p3>; rel="next"`:    "https://h/p3",
		`<https://h/p1>; rel="prev"`:                                "",
		``:                                                          "",
		`garbage`:                                                   "",
		`<https://h/p2>; title="x"; rel="next last"`: "https://h/p2",
	}
	for in, want := range tests {
		if got := nextLink(in); got != want {
			t.Errorf("nextLink(%q) = %q, want %q", in, got, want)
		}
	}
}

// The tree listing is remote input: every path that could escape the model
// directory, alias another file, or not fit on disk is refused before
// anything is written.
func TestListingRefusesUnsafePaths(t *testing.T) {
	long := strings.Repeat("x", maxNameBytes+1)
	bad := []string{
		"../escape.gguf", "a/../../escape.gguf", "/etc/passwd", `a\..\b.gguf`,
		".", "a/..", "./m.gguf", "a//m.gguf", "a/./m.gguf", "a/",
		"m\x00.gguf", "m\n.gguf", long + ".gguf", "d/" + long,
		"m.gguf" + incompleteSuffix, strings.Repeat("d/", maxRepoPathBytes/2) + "m.gguf",
	}
	good := []string{"m.gguf", "sub/dir/model-q4_k_m.gguf", ".gitattributes", "weird name (1).gguf", strings.Repeat("y", maxNameBytes)}
	for _, p := range append(bad, good...) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			json.NewEncoder(w).Encode([]map[string]any{{"type": "file", "path": p, "size": 1, "oid": "x"}})
		}))
		h, err := newHub(srv.URL, "", nil)
		if err != nil {
			t.Fatal(err)
		}
		files, err := h.listFiles(t.Context(), Ref{Provider: ProviderHF, Repo: "o/r", Revision: "main"})
		srv.Close()
		wantBad := slices.Contains(bad, p)
		switch {
		case wantBad && err == nil:
			t.Errorf("path %q accepted: %v", p, files)
		case wantBad && api.AsError(err).Status != http.StatusBadGateway:
			t.Errorf("path %q: %v, want a 502", p, err)
		case !wantBad && err != nil:
			t.Errorf("path %q refused: %v", p, err)
		}
	}
}

// A relative Link target (RFC 8288 allows it) resolves against the page it
// came with.
func TestListingFollowsRelativeLink(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("cursor") == "" {
			w.Header().Set("Link", `</api/models/o/r/tree/main?recursive=true&cursor=2>; rel="next"`)
			json.NewEncoder(w).Encode([]map[string]any{{"type": "file", "path": "a.gguf", "size": 1, "oid": "x"}})
			return
		}
		if r.URL.Path != "/api/models/o/r/tree/main" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode([]map[string]any{{"type": "file", "path": "b.gguf", "size": 1, "oid": "x"}})
	}))
	defer srv.Close()
	h, err := newHub(srv.URL, "", nil)
	if err != nil {
		t.Fatal(err)
	}
	files, err := h.listFiles(t.Context(), Ref{Provider: ProviderHF, Repo: "o/r", Revision: "main"})
	if err != nil || len(files) != 2 || files[1].Path != "b.gguf" {
		t.Fatalf("files %v, err %v; want a.gguf and b.gguf", files, err)
	}
}
