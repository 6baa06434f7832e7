package main

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
)

// tokenSource says where the API token came from, for the log line.
type tokenSource string

// loadToken finds the API token: an explicit file, then a systemd credential,
// then $LLORCH_API_TOKEN, then <stateDir>/api-token, created (0600) if absent.
//
// An empty or unreadable file the operator provides is an error naming it.
// An empty <stateDir>/api-token is regenerated instead: the hive owns that
// file, and an empty one can only be a generation cut short by a crash (no
// client can have used it), which must not block every later start.
func loadToken(explicitFile, stateDir string, getenv func(string) string) (string, tokenSource, error) {
	if explicitFile != "" {
		tok, err := readTokenFile(explicitFile)
		return tok, tokenSource("file " + explicitFile), err
	}
	if dir := getenv("CREDENTIALS_DIRECTORY"); dir != "" {
		p := filepath.Join(dir, "api-token")
		if _, err := os.Stat(p); err == nil {
			tok, err := readTokenFile(p)
			return tok, "systemd credential api-token", err
		}
	}
	if tok := strings.TrimSpace(getenv("LLORCH_API_TOKEN")); tok != "" {
		return tok, "environment LLORCH_API_TOKEN", nil
	}
	p := filepath.Join(stateDir, "api-token")
	tok, err := readTokenFile(p)
	if err == nil {
		return tok, tokenSource("file " + p), nil
	}
	replace := errors.Is(err, errEmptyToken)
	if !replace && !errors.Is(err, fs.ErrNotExist) {
		return "", "", err
	}
	tok, err = newToken()
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(stateDir, 0o750); err != nil {
		return "", "", fmt.Errorf("token: %w", err)
	}
	won, err := writeTokenFile(p, tok, replace)
	if err != nil {
		return "", "", err
	}
	if !won {
		// Another hive on this state dir created it first: use theirs.
		tok, err := readTokenFile(p)
		return tok, tokenSource("file " + p), err
	}
	if replace {
		return tok, tokenSource("regenerated " + p + " (it was empty)"), nil
	}
	return tok, tokenSource("generated " + p), nil
}

// writeTokenFile writes tok to p atomically: a crash leaves either no file
// (or the old one) or the whole token, never an empty file. Without replace
// an existing p is kept (two hives racing on one state dir must not
// overwrite each other) and won is false.
func writeTokenFile(p, tok string, replace bool) (won bool, err error) {
	dir := filepath.Dir(p)
	f, err := os.CreateTemp(dir, ".api-token-*") // mode 0600
	if err != nil {
		return false, fmt.Errorf("token: create %s: %w", p, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // after Link or Rename: no-op or the spare link
	_, err = f.WriteString(tok + "\n")
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return false, fmt.Errorf("token: write %s: %w", p, err)
	}
	if replace {
		err = os.Rename(tmp, p)
	} else {
		err = os.Link(tmp, p)
		if errors.Is(err, fs.ErrExist) {
			return false, nil
		}
	}
	if err != nil {
		return false, fmt.Errorf("token: create %s: %w", p, err)
	}
	if err := syncDir(dir); err != nil {
		return false, fmt.Errorf("token: create %s: %w", p, err)
	}
	return true, nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

var errEmptyToken = errors.New("is empty")

func readTokenFile(p string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("token: read %s: %w", p, err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("token: %s %w", p, errEmptyToken)
	}
	if strings.ContainsAny(tok, " \t\r\n") {
		return "", fmt.Errorf("token: %s holds more than one line or whitespace", p)
	}
	return tok, nil
}

func newToken() (string, error) {
	b := make([]byte, 32)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	return hex.EncodeToString(b), nil
}
