package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/rbee/rbee-hive/config"
)

// client talks to a running hive for the CLI.
type client struct {
	base  string
	token string
	http  *http.Client
	json  bool
}

// clientFlags registers the flags every client command shares.
type clientFlags struct {
	url, tokenFile, configPath string
	json                       bool
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.url, "url", "", "hive URL (default $RBEE_HIVE_URL or http(s)://<listen>)")
	fs.StringVar(&c.tokenFile, "token-file", "", "API token file (default $LLORCH_API_TOKEN or <state_dir>/api-token)")
	fs.StringVar(&c.configPath, "config", "", "the hive's config file, to find its address and state dir")
	fs.BoolVar(&c.json, "json", false, "print JSON")
}

// parseClient adds the shared client flags to fs (which holds the command's
// own), parses args and builds the client.
func parseClient(fs *flag.FlagSet, args []string) (*client, error) {
	var cf clientFlags
	cf.register(fs)
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	return cf.client()
}

func (c *clientFlags) client() (*client, error) {
	cfg, err := config.Load(c.configPath, os.Geteuid() == 0)
	if err != nil {
		return nil, err
	}
	base := c.url
	if base == "" {
		base = os.Getenv("RBEE_HIVE_URL")
	}
	if base == "" {
		base = "http://" + cfg.Listen
		if cfg.TLSCert != "" {
			base = "https://" + cfg.Listen
		}
	}
	token := ""
	switch {
	case c.tokenFile != "":
		token, err = readTokenFile(c.tokenFile)
	case os.Getenv("LLORCH_API_TOKEN") != "":
		token = strings.TrimSpace(os.Getenv("LLORCH_API_TOKEN"))
	default:
		// A missing file is not fatal: public routes work without a token.
		token, _ = readTokenFile(filepath.Join(cfg.StateDir, "api-token"))
	}
	if err != nil {
		return nil, err
	}
	hc, err := httpClientFor(cfg)
	if err != nil {
		return nil, err
	}
	return &client{base: strings.TrimRight(base, "/"), token: token, http: hc, json: c.json}, nil
}

// httpClientFor trusts, besides the system's roots, the hive's own
// tls_cert when the CLI can read it: a self-signed certificate on the
// local hive then needs no further setup.
func httpClientFor(cfg config.Config) (*http.Client, error) {
	if cfg.TLSCert == "" {
		return &http.Client{}, nil
	}
	pem, err := os.ReadFile(cfg.TLSCert)
	if err != nil {
		return &http.Client{}, nil // not ours to read: the system roots must do
	}
	pool, err := x509.SystemCertPool()
	if err != nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("tls_cert %s: no PEM certificate in it", cfg.TLSCert)
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
	return &http.Client{Transport: tr}, nil
}

// apiError is the hive's error envelope as the CLI sees it.
type apiError struct {
	Status int
	Code   string `json:"code"`
	Msg    string `json:"message"`
}

func (e *apiError) Error() string {
	return fmt.Sprintf("hive answered %d %s: %s", e.Status, e.Code, e.Msg)
}

// do sends a request and decodes a JSON answer into out (if non-nil).
func (c *client) do(ctx context.Context, method, path string, in, out any) error {
	resp, err := c.send(ctx, method, path, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode answer: %w", method, path, err)
	}
	return nil
}

// send performs the request and turns non-2xx answers into errors. The
// whole exchange, body included, is bounded by 30 s.
func (c *client) send(ctx context.Context, method, path string, in any) (*http.Response, error) {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, err
		}
		body = bytes.NewReader(b)
	}
	ctx, cancel := context.WithTimeoutCause(ctx, 30*time.Second, fmt.Errorf("no answer from %s in 30s", c.base))
	resp, err := c.exchange(ctx, method, path, body)
	if err != nil {
		cancel()
		return nil, err
	}
	resp.Body = &cancelBody{ReadCloser: resp.Body, cancel: cancel}
	return resp, nil
}

// stream is send without a deadline, for SSE.
func (c *client) stream(ctx context.Context, method, path string) (*http.Response, error) {
	return c.exchange(ctx, method, path, nil)
}

// exchange sends one request with the token and maps an error envelope to
// *apiError.
func (c *client) exchange(ctx context.Context, method, path string, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequestWithContext(ctx, method, c.base+path, body)
	if err != nil {
		return nil, err
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	if c.token != "" {
		req.Header.Set("Authorization", "Bearer "+c.token)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("is the hive running? %w", err)
	}
	if resp.StatusCode >= 300 {
		defer resp.Body.Close()
		var env struct {
			Error apiError `json:"error"`
		}
		_ = json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&env)
		env.Error.Status = resp.StatusCode
		return nil, &env.Error
	}
	return resp, nil
}

type cancelBody struct {
	io.ReadCloser
	cancel context.CancelFunc
}

func (b *cancelBody) Close() error {
	err := b.ReadCloser.Close()
	b.cancel()
	return err
}

func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
