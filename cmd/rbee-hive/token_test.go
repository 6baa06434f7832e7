package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestTokenFileEdges: a crash during generation used to leave an empty
// <state_dir>/api-token that failed every later start; the hive owns that
// file and regenerates it. A file the operator provides that is empty or
// unreadable stays an error naming it.
func TestTokenFileEdges(t *testing.T) {
	noEnv := func(string) string { return "" }

	state := t.TempDir()
	p := filepath.Join(state, "api-token")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	tok, src, err := loadToken("", state, noEnv)
	if err != nil || len(tok) != 64 || !strings.Contains(string(src), "regenerated") {
		t.Fatalf("empty hive-owned token file: %q %q %v", tok, src, err)
	}
	if b, _ := os.ReadFile(p); strings.TrimSpace(string(b)) != tok {
		t.Fatalf("file holds %q, want the regenerated token", b)
	}
	if again, _, err := loadToken("", state, noEnv); err != nil || again != tok {
		t.Fatalf("reload: %q %v", again, err)
	}
	if st, err := os.Stat(p); err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("api-token: %v %v", st, err)
	}
	if ents, _ := os.ReadDir(state); len(ents) != 1 {
		t.Fatalf("state dir holds %d entries, want only api-token (no temp files)", len(ents))
	}

	// An existing token is never replaced by a concurrent generation.
	fresh := t.TempDir()
	won, err := writeTokenFile(filepath.Join(fresh, "api-token"), "first", false)
	if err != nil || !won {
		t.Fatal(won, err)
	}
	if won, err := writeTokenFile(filepath.Join(fresh, "api-token"), "second", false); err != nil || won {
		t.Fatalf("second writer: won=%v %v", won, err)
	}
	if b, _ := os.ReadFile(filepath.Join(fresh, "api-token")); string(b) != "first\n" {
		t.Fatalf("token overwritten: %q", b)
	}

	empty := filepath.Join(t.TempDir(), "tok")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	unreadable := t.TempDir() // a directory: reading it fails, also as root
	for _, f := range []string{empty, unreadable} {
		if _, _, err := loadToken(f, state, noEnv); err == nil || !strings.Contains(err.Error(), f) {
			t.Errorf("token file %s: got %v, want an error naming it", f, err)
		}
	}
	// The hive-owned path unreadable (not empty) is an error too, not a
	// silent new token.
	odd := t.TempDir()
	if err := os.Mkdir(filepath.Join(odd, "api-token"), 0o700); err != nil {
		t.Fatal(err)
	}
	if _, _, err := loadToken("", odd, noEnv); err == nil || !strings.Contains(err.Error(), filepath.Join(odd, "api-token")) {
		t.Errorf("unreadable hive-owned token: got %v", err)
	}
}
