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
	if !errors.Is(err, fs.ErrNotExist) {
		return "", "", err
	}
	tok, err = newToken()
	if err != nil {
		return "", "", err
	}
	if err := os.MkdirAll(stateDir, 0o750); err != nil {
		return "", "", fmt.Errorf("token: %w", err)
	}
	// O_EXCL: two hives racing on one state dir must not overwrite each other.
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", "", fmt.Errorf("token: create %s: %w", p, err)
	}
	if _, err := f.WriteString(tok + "\n"); err != nil {
		f.Close()
		return "", "", fmt.Errorf("token: write %s: %w", p, err)
	}
	if err := f.Close(); err != nil {
		return "", "", fmt.Errorf("token: write %s: %w", p, err)
	}
	return tok, tokenSource("generated " + p), nil
}

func readTokenFile(p string) (string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return "", fmt.Errorf("token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("token: %s is empty", p)
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
