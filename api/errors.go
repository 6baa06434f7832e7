// Package api holds the HTTP plumbing every rbee-hive route shares: the JSON
// error envelope, JSON bodies with a size cap, and Bearer authentication.
package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
)

// Error codes used across the API. Clients match on these, so they never change.
const (
	CodeBadRequest         = "BAD_REQUEST"
	CodeInvalidJSON        = "INVALID_JSON"
	CodeValidation         = "VALIDATION_ERROR"
	CodeMissingAPIKey      = "MISSING_API_KEY"
	CodeInvalidAPIKey      = "INVALID_API_KEY"
	CodeNotFound           = "NOT_FOUND"
	CodeMethodNotAllowed   = "METHOD_NOT_ALLOWED"
	CodeConflict           = "CONFLICT"
	CodePayloadTooLarge    = "PAYLOAD_TOO_LARGE"
	CodeRequestTimeout     = "REQUEST_TIMEOUT" // 408: the request body did not arrive in time
	CodeUnsupportedMedia   = "UNSUPPORTED_MEDIA_TYPE"
	CodeInsufficientMemory = "INSUFFICIENT_MEMORY"
	CodeInsufficientVRAM   = "INSUFFICIENT_VRAM"
	CodeInsufficientDisk   = "INSUFFICIENT_DISK"
	CodeUnavailable        = "SERVICE_UNAVAILABLE"
	CodeUpstream           = "UPSTREAM_ERROR"
	CodeInternal           = "INTERNAL_ERROR"
)

// Error is an API error: an HTTP status plus the body
// {"error":{"code":...,"message":...,"details":{...}}}.
type Error struct {
	Status  int
	Code    string
	Message string
	Details map[string]any
}

func (e *Error) Error() string { return fmt.Sprintf("%s: %s", e.Code, e.Message) }

// Errorf builds an *Error with a formatted message.
func Errorf(status int, code, format string, args ...any) *Error {
	return &Error{Status: status, Code: code, Message: fmt.Sprintf(format, args...)}
}

// WithDetails returns a copy of e with details set.
func (e *Error) WithDetails(d map[string]any) *Error {
	c := *e
	c.Details = d
	return &c
}

type envelope struct {
	Error body `json:"error"`
}

type body struct {
	Code    string         `json:"code"`
	Message string         `json:"message"`
	Details map[string]any `json:"details,omitempty"`
}

// AsError maps any error to an *Error: an *Error anywhere in the chain keeps
// its status and code, everything else is a 500 whose text is not leaked.
func AsError(err error) *Error {
	var ae *Error
	if errors.As(err, &ae) {
		return ae
	}
	return &Error{Status: http.StatusInternalServerError, Code: CodeInternal, Message: "internal error"}
}

// recordCode tells the Router's writer (under any wrappers that Unwrap) the
// error code, so that every failed request is counted by type.
func recordCode(w http.ResponseWriter, code string) {
	if sw := findStatusWriter(w); sw != nil {
		sw.recordErrorCode(code)
	}
}

// WriteError writes err as the JSON error envelope.
func WriteError(w http.ResponseWriter, err error) {
	ae := AsError(err)
	recordCode(w, ae.Code)
	if ae.Status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="rbee-hive"`)
	}
	WriteJSON(w, ae.Status, envelope{Error: body{Code: ae.Code, Message: ae.Message, Details: ae.Details}})
}

// WriteJSON writes v as a JSON response with the given status.
func WriteJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v) // the client may be gone; nothing useful to do
}
