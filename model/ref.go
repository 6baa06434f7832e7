// Package model resolves model references, downloads HuggingFace models with
// resume and verification, keeps them in a SQLite catalog, evicts the least
// recently used ones under a byte budget, and serves the /v1/models routes
// (download + SSE progress, list, delete; docs/api.md).
package model

import (
	"fmt"
	"net/http"
	"path"
	"strings"

	"github.com/rbee/rbee-hive/api"
)

// MaxRefLen is the reference length limit clients already validate against
// (docs/compat.md).
const MaxRefLen = 512

// Providers.
const (
	ProviderHF   = "hf"
	ProviderFile = "file"
)

// DefaultRevision is used when an hf: reference names none.
const DefaultRevision = "main"

// Ref is a parsed model reference. The accepted syntax is
//
//	hf:<org>/<repo>[@<revision>][:<file>]   e.g. hf:Qwen/Qwen2.5-0.5B-Instruct-GGUF:qwen2.5-0.5b-instruct-q4_k_m.gguf
//	file:/absolute/path                     a local file or directory, never downloaded
//
// Without a file an hf: reference means the repo's only GGUF file, or for a
// safetensors repo its weights plus config/tokenizer files. The revision
// defaults to "main" and may be a branch, tag or commit sha.
type Ref struct {
	Provider string // ProviderHF or ProviderFile
	Repo     string // hf: "org/name" (or "name")
	Revision string // hf: never empty after ParseRef
	File     string // hf: a path inside the repo, or "" for the whole model
	Path     string // file: the absolute, clean path
}

// String is the canonical form, used as the catalog key: the revision is
// always spelled out, so hf:a/b and hf:a/b@main are the same model.
func (r Ref) String() string {
	switch r.Provider {
	case ProviderFile:
		return "file:" + r.Path
	case ProviderHF:
		s := "hf:" + r.Repo + "@" + r.Revision
		if r.File != "" {
			s += ":" + r.File
		}
		return s
	}
	return ""
}

// refError is the 400 every bad reference gets; the "Invalid model_ref:
// <reason>" wording is the one clients know (docs/compat.md).
func refError(format string, args ...any) *api.Error {
	return &api.Error{
		Status:  http.StatusBadRequest,
		Code:    api.CodeValidation,
		Message: "Invalid model_ref: " + fmt.Sprintf(format, args...),
		Details: map[string]any{"field": "model_ref"},
	}
}

// validateChars applies the reference input-validation rules in the order
// clients know (docs/compat.md).
// '@' is allowed in addition to [A-Za-z0-9-_/:.] for the revision.
func validateChars(s string) error {
	if s == "" {
		return refError("string is empty")
	}
	if n := len([]rune(s)); n > MaxRefLen {
		return refError("string too long: %d chars (max %d)", n, MaxRefLen)
	}
	if strings.IndexByte(s, 0) >= 0 {
		return refError("null byte found in string")
	}
	for _, c := range s {
		switch c {
		case ';', '|', '&', '$', '`', '\n', '\r':
			return refError("shell metacharacter found: %q", c)
		}
	}
	if strings.Contains(s, "../") || strings.Contains(s, `..\`) || strings.HasSuffix(s, "/..") {
		return refError("path traversal sequence detected")
	}
	for _, c := range s {
		ok := c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
			c == '-' || c == '_' || c == '/' || c == ':' || c == '.' || c == '@'
		if !ok {
			return refError("invalid characters found: %q", c)
		}
	}
	return nil
}

// ParseRef validates and parses a model reference. Every failure is a 400
// *api.Error naming the problem; nothing is defaulted silently: a typo must
// not download some other model.
func ParseRef(s string) (Ref, error) {
	if err := validateChars(s); err != nil {
		return Ref{}, err
	}
	provider, rest, ok := strings.Cut(s, ":")
	if !ok {
		return Ref{}, refError("%q has no provider: use hf:<org>/<repo>[@<revision>][:<file>] or file:/absolute/path", s)
	}
	switch provider {
	case ProviderHF:
		return parseHF(rest)
	case ProviderFile:
		return parseFile(rest)
	default:
		return Ref{}, refError("unsupported provider %q: use hf:<org>/<repo>[@<revision>][:<file>] or file:/absolute/path", provider)
	}
}

func parseFile(p string) (Ref, error) {
	if !strings.HasPrefix(p, "/") {
		return Ref{}, refError("file: path %q is not absolute", p)
	}
	if strings.Contains(p, ":") || strings.Contains(p, "@") {
		return Ref{}, refError("file: path %q contains ':' or '@'", p)
	}
	if c := path.Clean(p); c != p {
		return Ref{}, refError("file: path %q is not clean (want %q)", p, c)
	}
	return Ref{Provider: ProviderFile, Path: p}, nil
}

func parseHF(rest string) (Ref, error) {
	repoRev, file, hasFile := strings.Cut(rest, ":")
	if hasFile {
		if file == "" {
			return Ref{}, refError("empty file name after ':'")
		}
		if strings.ContainsAny(file, ":@") {
			return Ref{}, refError("file %q contains ':' or '@'", file)
		}
		if err := checkRelPath("file", file); err != nil {
			return Ref{}, err
		}
	}
	repo, rev, hasRev := strings.Cut(repoRev, "@")
	if hasRev {
		if rev == "" {
			return Ref{}, refError("empty revision after '@'")
		}
		if strings.Contains(rev, "@") {
			return Ref{}, refError("revision %q contains '@'", rev)
		}
		if err := checkRelPath("revision", rev); err != nil {
			return Ref{}, err
		}
	} else {
		rev = DefaultRevision
	}
	parts := strings.Split(repo, "/")
	if len(parts) > 2 || repo == "" {
		return Ref{}, refError("repo %q must be <org>/<name> or <name>", repo)
	}
	for _, p := range parts {
		if err := checkRepoPart(p); err != nil {
			return Ref{}, err
		}
	}
	return Ref{Provider: ProviderHF, Repo: repo, Revision: rev, File: file}, nil
}

// checkRepoPart follows the Hub's naming rules: letters, digits, '-', '_',
// '.', not starting or ending with '-' or '.', no "--" or "..", at most 96.
func checkRepoPart(p string) error {
	switch {
	case p == "":
		return refError("repo has an empty org or name")
	case len(p) > 96:
		return refError("repo part %q is longer than 96 characters", p)
	case strings.ContainsAny(p, ":@"):
		return refError("repo part %q contains ':' or '@'", p)
	case strings.HasPrefix(p, "-") || strings.HasPrefix(p, ".") || strings.HasSuffix(p, "-") || strings.HasSuffix(p, "."):
		return refError("repo part %q may not start or end with '-' or '.'", p)
	case strings.Contains(p, "--") || strings.Contains(p, ".."):
		return refError("repo part %q may not contain '--' or '..'", p)
	}
	return nil
}

// checkRelPath accepts a slash-separated relative path with no empty, "." or
// ".." segments: it becomes part of a local path and of a URL.
func checkRelPath(what, p string) error {
	if strings.HasPrefix(p, "/") || strings.HasSuffix(p, "/") {
		return refError("%s %q may not start or end with '/'", what, p)
	}
	for _, seg := range strings.Split(p, "/") {
		if seg == "" || seg == "." || seg == ".." {
			return refError("%s %q has an empty, '.' or '..' segment", what, p)
		}
	}
	return nil
}
