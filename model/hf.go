package model

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"sort"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/api"
)

// DefaultEndpoint is the public Hub.
const DefaultEndpoint = "https://huggingface.co"

// maxTreePages bounds pagination against a server whose Link never ends.
const maxTreePages = 1000

// Failure reasons, the label values of rbee_hive_model_download_failures_total.
const (
	ReasonDisk     = "disk"
	ReasonNetwork  = "network"
	ReasonChecksum = "checksum"
	ReasonNotFound = "not_found"
	ReasonAuth     = "auth"
	ReasonStalled  = "stalled"
	ReasonSelect   = "select"
	ReasonInternal = "internal"
)

var failureReasons = []string{ReasonDisk, ReasonNetwork, ReasonChecksum, ReasonNotFound, ReasonAuth, ReasonStalled, ReasonSelect, ReasonInternal}

// failure is an error with its metrics reason; it wraps the *api.Error the
// HTTP layer shows.
type failure struct {
	reason string
	err    error
}

func (f *failure) Error() string { return f.err.Error() }
func (f *failure) Unwrap() error { return f.err }

func fail(reason string, err error) error { return &failure{reason: reason, err: err} }

// reasonOf is the metrics label for err.
func reasonOf(err error) string {
	var f *failure
	if errors.As(err, &f) {
		return f.reason
	}
	return ReasonInternal
}

// RepoFile is one file of a Hub repo as the tree API lists it.
type RepoFile struct {
	Path   string `json:"path"`
	Size   uint64 `json:"size"`
	SHA256 string `json:"sha256,omitempty"` // LFS files only
	GitOID string `json:"-"`                // git blob sha1, for non-LFS files
}

type treeEntry struct {
	Type string `json:"type"`
	Path string `json:"path"`
	Size uint64 `json:"size"`
	OID  string `json:"oid"`
	LFS  *struct {
		OID  string `json:"oid"`
		Size uint64 `json:"size"`
	} `json:"lfs"`
}

// hub talks to a HuggingFace endpoint. The token only ever goes into an
// Authorization header towards the endpoint's own scheme and host.
type hub struct {
	endpoint *url.URL
	token    string
	client   *http.Client
	// pageTimeout bounds each listing request, body included, since the
	// caller's ctx may have no deadline (a CLI pull waits as long as it
	// takes); 0: none.
	pageTimeout time.Duration
}

func newHub(endpoint, token string, c *http.Client) (*hub, error) {
	u, err := url.Parse(strings.TrimRight(endpoint, "/"))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("model: bad HuggingFace endpoint %q: want http(s)://host", endpoint)
	}
	if c == nil {
		c = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}
	}
	cc := *c // our own copy: CheckRedirect is ours to set
	inner := c.CheckRedirect
	cc.CheckRedirect = func(req *http.Request, via []*http.Request) error {
		// Go already strips Authorization for other domains, but keeps it for
		// subdomains and for https → http on the same host; the CDN never
		// needs our token, so drop it on any change of origin.
		if !sameOrigin(req.URL, via[0].URL) {
			req.Header.Del("Authorization")
		}
		if inner != nil {
			return inner(req, via)
		}
		if len(via) >= 10 {
			return errors.New("stopped after 10 redirects")
		}
		return nil
	}
	return &hub{endpoint: u, token: token, client: &cc}, nil
}

func (h *hub) newRequest(ctx context.Context, u *url.URL) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("model: request %s: %w", u.Redacted(), err)
	}
	req.Header.Set("User-Agent", "rbee-hive")
	if h.token != "" && sameOrigin(u, h.endpoint) {
		req.Header.Set("Authorization", "Bearer "+h.token)
	}
	return req, nil
}

// sameOrigin: the token may go only where it went first, never in clear
// text to a Link or redirect that downgrades to http.
func sameOrigin(a, b *url.URL) bool {
	return strings.EqualFold(a.Scheme, b.Scheme) && strings.EqualFold(a.Host, b.Host)
}

// escapePath escapes each segment of a slash path for a URL.
func escapePath(p string) string {
	segs := strings.Split(p, "/")
	for i, s := range segs {
		segs[i] = url.PathEscape(s)
	}
	return strings.Join(segs, "/")
}

func (h *hub) treeURL(ref Ref) *url.URL {
	u := *h.endpoint
	u.Path = h.endpoint.Path + "/api/models/" + ref.Repo + "/tree/" + ref.Revision
	u.RawPath = h.endpoint.EscapedPath() + "/api/models/" + escapePath(ref.Repo) + "/tree/" + url.PathEscape(ref.Revision)
	u.RawQuery = "recursive=true"
	return &u
}

func (h *hub) resolveURL(ref Ref, file string) *url.URL {
	u := *h.endpoint
	u.Path = h.endpoint.Path + "/" + ref.Repo + "/resolve/" + ref.Revision + "/" + file
	u.RawPath = h.endpoint.EscapedPath() + "/" + escapePath(ref.Repo) + "/resolve/" + url.PathEscape(ref.Revision) + "/" + escapePath(file)
	return &u
}

// statusError maps a Hub error response to a failure. The Hub answers 401
// (not 404) for a missing repo when the caller is anonymous; X-Error-Code
// tells them apart.
func statusError(ref Ref, what string, resp *http.Response) error {
	code := resp.Header.Get("X-Error-Code")
	switch {
	case resp.StatusCode == http.StatusNotFound || code == "RepoNotFound" || code == "RevisionNotFound" || code == "EntryNotFound":
		return fail(ReasonNotFound, api.Errorf(http.StatusNotFound, api.CodeNotFound,
			"%s not found on the HuggingFace endpoint (repo, revision or file; HTTP %d)", what, resp.StatusCode).
			WithDetails(map[string]any{"model_ref": ref.String(), "upstream_status": resp.StatusCode}))
	case resp.StatusCode == http.StatusUnauthorized || resp.StatusCode == http.StatusForbidden || code == "GatedRepo":
		return fail(ReasonAuth, api.Errorf(http.StatusBadGateway, api.CodeUpstream,
			"HuggingFace refused access to %s (HTTP %d): gated or private repo, or a bad token; set models.hf_token_file or HF_TOKEN",
			what, resp.StatusCode).WithDetails(map[string]any{"model_ref": ref.String(), "upstream_status": resp.StatusCode, "reason": ReasonAuth}))
	default:
		return fail(ReasonNetwork, api.Errorf(http.StatusBadGateway, api.CodeUpstream,
			"HuggingFace answered HTTP %d for %s", resp.StatusCode, what).
			WithDetails(map[string]any{"model_ref": ref.String(), "upstream_status": resp.StatusCode, "reason": ReasonNetwork}))
	}
}

func networkError(ref Ref, what string, err error) error {
	err = redactURL(err)
	return fail(ReasonNetwork, &wrapped{api.Errorf(http.StatusBadGateway, api.CodeUpstream,
		"cannot reach the HuggingFace endpoint for %s: %v", what, err).
		WithDetails(map[string]any{"model_ref": ref.String(), "reason": ReasonNetwork}), err})
}

// redactURL drops the query from a *url.Error's URL: CDN redirect targets
// carry signed, credential-like query strings that must not reach logs or
// API clients.
func redactURL(err error) error {
	var ue *url.Error
	if !errors.As(err, &ue) {
		return err
	}
	u, perr := url.Parse(ue.URL)
	if perr != nil {
		return &url.Error{Op: ue.Op, URL: "<unparseable URL>", Err: ue.Err}
	}
	u.RawQuery, u.User = "", nil
	return &url.Error{Op: ue.Op, URL: u.String(), Err: ue.Err}
}

// wrapped keeps both the *api.Error and the cause in the chain.
type wrapped struct {
	ae    *api.Error
	cause error
}

func (w *wrapped) Error() string   { return w.ae.Error() }
func (w *wrapped) Unwrap() []error { return []error{w.ae, w.cause} }

// listFiles returns every file of the repo at the revision, following
// Link rel="next" pages.
func (h *hub) listFiles(ctx context.Context, ref Ref) ([]RepoFile, error) {
	var files []RepoFile
	next := h.treeURL(ref)
	what := "hf:" + ref.Repo + "@" + ref.Revision
	for page := 0; next != nil; page++ {
		if page >= maxTreePages {
			return nil, fail(ReasonNetwork, fmt.Errorf("model: tree listing of %s exceeds %d pages", what, maxTreePages))
		}
		entries, link, err := h.listPage(ctx, ref, what, next)
		if err != nil {
			return nil, err
		}
		for _, e := range entries {
			if e.Type != "file" {
				continue
			}
			// The listing is remote input: a path that could escape the
			// model directory, or not be a file of its own there, is refused,
			// not cleaned.
			if why := unsafeRepoPath(e.Path); why != "" {
				return nil, fail(ReasonNetwork, api.Errorf(http.StatusBadGateway, api.CodeUpstream,
					"the HuggingFace listing of %s has an unsafe file path %q: %s", what, e.Path, why).
					WithDetails(map[string]any{"model_ref": ref.String(), "reason": ReasonNetwork}))
			}
			f := RepoFile{Path: e.Path, Size: e.Size}
			if e.LFS != nil {
				f.Size = e.LFS.Size
				f.SHA256 = strings.ToLower(e.LFS.OID)
			} else {
				f.GitOID = strings.ToLower(e.OID)
			}
			files = append(files, f)
		}
		// A relative target resolves against this page's URL (next was
		// nil here before, and a relative Link dereferenced it).
		cur := next
		next = nil
		if target := nextLink(link); target != "" {
			u, err := cur.Parse(target)
			if err != nil {
				return nil, fail(ReasonNetwork, fmt.Errorf("model: bad Link header %q: %w", link, err))
			}
			next = u
		}
	}
	return files, nil
}

// maxNameBytes keeps a file name's partial (name + incompleteSuffix) within
// Linux's NAME_MAX of 255 bytes.
const maxNameBytes = 255 - len(incompleteSuffix)

// maxRepoPathBytes bounds a listed path; Hub paths are far shorter.
const maxRepoPathBytes = 1024

// unsafeRepoPath says why p, a path from the remote tree listing, cannot
// become a file under the model directory as is, or "" when it can. Git
// itself never produces such paths, so refusing them costs no real repo.
func unsafeRepoPath(p string) string {
	switch {
	case p == "":
		return "empty"
	case len(p) > maxRepoPathBytes:
		return fmt.Sprintf("longer than %d bytes", maxRepoPathBytes)
	case strings.ContainsFunc(p, func(r rune) bool { return r < 0x20 || r == 0x7f || r == '\\' }):
		return "control character or backslash"
	case path.IsAbs(p):
		return "absolute"
	case path.Clean(p) != p || p == ".":
		// Also catches "a/..", "./a", "a//b": two names for one file, or a
		// directory (the revision's own) taken for a file.
		return "not a clean relative path"
	}
	for _, seg := range strings.Split(p, "/") {
		switch {
		case seg == "..":
			return "'..' segment"
		case len(seg) > maxNameBytes:
			return fmt.Sprintf("a name longer than %d bytes", maxNameBytes)
		case strings.HasSuffix(seg, incompleteSuffix):
			// It would share its name with another file's partial download.
			return "ends in " + incompleteSuffix
		}
	}
	return ""
}

// listPage fetches one page of the tree listing.
func (h *hub) listPage(ctx context.Context, ref Ref, what string, u *url.URL) ([]treeEntry, string, error) {
	if h.pageTimeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, h.pageTimeout, errStalled)
		defer cancel()
	}
	stalled := func(err error) error {
		if errors.Is(context.Cause(ctx), errStalled) {
			return fail(ReasonStalled, &wrapped{api.Errorf(http.StatusGatewayTimeout, api.CodeUpstream,
				"listing %s stalled: no answer within %s", what, h.pageTimeout).
				WithDetails(map[string]any{"model_ref": ref.String(), "reason": ReasonStalled}), redactURL(err)})
		}
		return networkError(ref, what, err)
	}
	req, err := h.newRequest(ctx, u)
	if err != nil {
		return nil, "", err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := h.client.Do(req)
	if err != nil {
		return nil, "", stalled(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, "", statusError(ref, what, resp)
	}
	var es []treeEntry
	// 64 MiB is far beyond any real page (the Hub pages at 1000 entries).
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<20)).Decode(&es); err != nil {
		return nil, "", stalled(fmt.Errorf("decode tree listing: %w", err))
	}
	return es, resp.Header.Get("Link"), nil
}

// nextLink extracts the rel="next" target of an RFC 8288 Link header.
func nextLink(h string) string {
	for _, part := range strings.Split(h, ",") {
		segs := strings.Split(part, ";")
		target := strings.TrimSpace(segs[0])
		if !strings.HasPrefix(target, "<") || !strings.HasSuffix(target, ">") {
			continue
		}
		for _, p := range segs[1:] {
			k, v, _ := strings.Cut(strings.TrimSpace(p), "=")
			if strings.EqualFold(k, "rel") {
				for _, r := range strings.Fields(strings.Trim(v, `"`)) {
					if r == "next" {
						return target[1 : len(target)-1]
					}
				}
			}
		}
	}
	return ""
}

// shardRe matches llama.cpp split GGUF names: name-00001-of-00003.gguf.
var shardRe = regexp.MustCompile(`^(.*)-(\d{5})-of-(\d{5})\.gguf$`)

// selection is what a reference downloads: the files, and which local path
// the worker is given (the file for a GGUF, the directory otherwise).
type selection struct {
	files []RepoFile
	main  string // relative path handed to the worker; "" means the directory
	total uint64
}

// selectFiles decides what to fetch for ref from the repo listing.
func selectFiles(ref Ref, all []RepoFile) (selection, error) {
	byPath := make(map[string]RepoFile, len(all))
	for _, f := range all {
		byPath[f.Path] = f
	}
	var sel selection
	if ref.File != "" {
		f, ok := byPath[ref.File]
		if !ok {
			return sel, fail(ReasonNotFound, api.Errorf(http.StatusNotFound, api.CodeNotFound,
				"file %q is not in hf:%s@%s", ref.File, ref.Repo, ref.Revision).
				WithDetails(map[string]any{"model_ref": ref.String()}))
		}
		sel.files = []RepoFile{f}
		sel.main = f.Path
		if m := shardRe.FindStringSubmatch(f.Path); m != nil {
			// A split GGUF is useless without its siblings; llama.cpp opens
			// the first shard and finds the rest beside it.
			sel.files = sel.files[:0]
			for _, g := range all {
				if n := shardRe.FindStringSubmatch(g.Path); n != nil && n[1] == m[1] && n[3] == m[3] {
					sel.files = append(sel.files, g)
				}
			}
			sort.Slice(sel.files, func(i, j int) bool { return sel.files[i].Path < sel.files[j].Path })
			sel.main = sel.files[0].Path
		}
	} else {
		var err error
		if sel, err = selectWhole(ref, all); err != nil {
			return sel, err
		}
	}
	sel.total = 0 // selectWhole may have recursed into selectFiles
	for _, f := range sel.files {
		sel.total += f.Size
	}
	return sel, nil
}

// ggufModels groups a repo's GGUF files into models (a split model counts
// once, by its first shard); mmproj projectors are not models.
func ggufModels(all []RepoFile) []string {
	var out []string
	for _, f := range all {
		base := path.Base(f.Path)
		if !strings.HasSuffix(strings.ToLower(base), ".gguf") || strings.HasPrefix(strings.ToLower(base), "mmproj") {
			continue
		}
		if m := shardRe.FindStringSubmatch(f.Path); m != nil && m[2] != "00001" {
			continue
		}
		out = append(out, f.Path)
	}
	sort.Strings(out)
	return out
}

func selectWhole(ref Ref, all []RepoFile) (selection, error) {
	if ggufs := ggufModels(all); len(ggufs) == 1 {
		return selectFiles(Ref{Provider: ref.Provider, Repo: ref.Repo, Revision: ref.Revision, File: ggufs[0]}, all)
	} else if len(ggufs) > 1 {
		shown := ggufs
		if len(shown) > 20 {
			shown = shown[:20]
		}
		return selection{}, fail(ReasonSelect, api.Errorf(http.StatusBadRequest, api.CodeValidation,
			"Invalid model_ref: hf:%s holds %d GGUF models; name one, e.g. hf:%s:%s", ref.Repo, len(ggufs), ref.Repo, ggufs[0]).
			WithDetails(map[string]any{"field": "model_ref", "gguf_files": shown}))
	}
	// Safetensors (or, failing that, PyTorch .bin) weights in the repo root,
	// plus config and tokenizer files. Sub-folders such as original/ and
	// consolidated.* hold duplicate weights and are skipped.
	var weights, bins, extra []RepoFile
	for _, f := range all {
		if strings.Contains(f.Path, "/") {
			continue
		}
		name := strings.ToLower(f.Path)
		switch {
		case strings.HasPrefix(name, "consolidated."):
		case strings.HasSuffix(name, ".safetensors"):
			weights = append(weights, f)
		case strings.HasSuffix(name, ".bin") && strings.HasPrefix(name, "pytorch_model"):
			bins = append(bins, f)
		case strings.HasSuffix(name, ".json"), name == "tokenizer.model", name == "merges.txt",
			name == "vocab.txt", strings.HasSuffix(name, ".tiktoken"):
			extra = append(extra, f)
		}
	}
	if len(weights) == 0 {
		weights = bins
	}
	if len(weights) == 0 {
		return selection{}, fail(ReasonSelect, api.Errorf(http.StatusBadRequest, api.CodeValidation,
			"Invalid model_ref: hf:%s@%s has no GGUF or safetensors weights in its root", ref.Repo, ref.Revision).
			WithDetails(map[string]any{"field": "model_ref"}))
	}
	files := append(weights, extra...)
	sort.Slice(files, func(i, j int) bool { return files[i].Path < files[j].Path })
	return selection{files: files}, nil
}
