package main

import "testing"

func TestCanonicalRef(t *testing.T) {
	tests := []struct{ in, want string }{
		{"hf:acme/tiny-GGUF", "hf:acme/tiny-GGUF@main"},
		{"hf:acme/tiny-GGUF@main", "hf:acme/tiny-GGUF@main"},
		{"file:/models/x.gguf", "file:/models/x.gguf"},
		{"not a ref", "not a ref"},
	}
	for _, tc := range tests {
		if got := canonicalRef(tc.in); got != tc.want {
			t.Errorf("canonicalRef(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
