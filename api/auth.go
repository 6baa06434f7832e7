package api

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"net/http"
	"strings"
)

// maxAuthHeader bounds the Authorization header we are willing to parse.
const maxAuthHeader = 8192

// Fingerprint is the 6-hex-character SHA-256 prefix of a token: what logs show
// instead of the token.
func Fingerprint(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:3])
}

// BearerToken extracts the token from "Authorization: Bearer <token>", or ""
// when the header is missing or malformed. The scheme is case-insensitive
// (RFC 7235), so "bearer <token>" is accepted too.
func BearerToken(r *http.Request) string {
	h := r.Header.Get("Authorization")
	if h == "" || len(h) > maxAuthHeader {
		return ""
	}
	const prefix = "Bearer "
	if len(h) < len(prefix) || !strings.EqualFold(h[:len(prefix)], prefix) {
		return ""
	}
	tok := strings.TrimSpace(h[len(prefix):])
	for _, c := range tok {
		if c < 0x21 || c == 0x7f {
			return ""
		}
	}
	return tok
}

// TokenEqual compares two tokens in constant time (for equal lengths; the
// length itself is not secret enough to matter, as in crypto/subtle's docs).
func TokenEqual(got, want string) bool {
	if want == "" {
		return false
	}
	return subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

// Authenticator decides whether a request's bearer token is the API token.
type Authenticator struct {
	Token string
}

// Check returns nil when the request carries the API token, else a 401 *Error.
func (a Authenticator) Check(r *http.Request) *Error {
	tok := BearerToken(r)
	if tok == "" {
		return Errorf(http.StatusUnauthorized, CodeMissingAPIKey, "missing API key: send Authorization: Bearer <token>")
	}
	if !TokenEqual(tok, a.Token) {
		return Errorf(http.StatusUnauthorized, CodeInvalidAPIKey, "invalid API key")
	}
	return nil
}
