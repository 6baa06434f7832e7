package api

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net"
	"net/http"
	"os"
)

// MaxBodyBytes caps every request body.
const MaxBodyBytes = 1 << 20

// DecodeJSON reads one JSON object from r's body (capped at MaxBodyBytes)
// into v. Unknown fields are ignored, so older and newer clients both work. It returns an
// *Error ready for WriteError.
func DecodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" {
		mt, _, err := mime.ParseMediaType(ct)
		if err != nil || mt != "application/json" {
			return Errorf(http.StatusUnsupportedMediaType, CodeUnsupportedMedia, "Content-Type must be application/json, got %q", ct)
		}
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, MaxBodyBytes))
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		var ute *json.UnmarshalTypeError
		switch {
		case errors.As(err, &mbe):
			return Errorf(http.StatusRequestEntityTooLarge, CodePayloadTooLarge, "request body exceeds %d bytes", MaxBodyBytes)
		case errors.Is(err, io.EOF):
			return Errorf(http.StatusBadRequest, CodeInvalidJSON, "request body is empty")
		case IsReadTimeout(err):
			return Errorf(http.StatusRequestTimeout, CodeRequestTimeout, "the request body did not arrive in time")
		case errors.As(err, &ute):
			return Errorf(http.StatusUnprocessableEntity, CodeValidation, "field %q: expected %s", ute.Field, ute.Type).
				WithDetails(map[string]any{"field": ute.Field})
		default:
			return Errorf(http.StatusBadRequest, CodeInvalidJSON, "malformed JSON: %v", err)
		}
	}
	// Trailing data after the object is a malformed request, not something to ignore.
	if dec.More() {
		return Errorf(http.StatusBadRequest, CodeInvalidJSON, "malformed JSON: trailing data after the object")
	}
	if _, err := dec.Token(); err != nil && !errors.Is(err, io.EOF) {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return Errorf(http.StatusRequestEntityTooLarge, CodePayloadTooLarge, "request body exceeds %d bytes", MaxBodyBytes)
		}
		return Errorf(http.StatusBadRequest, CodeInvalidJSON, "malformed JSON: %v", err)
	}
	return nil
}

// IsReadTimeout reports whether a request body read failed on the
// connection's read deadline (the server's ReadTimeout): the client was too
// slow, which is a 408, not malformed JSON.
func IsReadTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || (errors.As(err, &ne) && ne.Timeout())
}

// NotFound and MethodNotAllowed are the envelope versions of net/http's defaults.
func NotFound(path string) *Error {
	return Errorf(http.StatusNotFound, CodeNotFound, "no route for %s", path)
}

// Validation builds a 400 for a bad field.
func Validation(field, format string, args ...any) *Error {
	return Errorf(http.StatusBadRequest, CodeValidation, "invalid %s: %s", field, fmt.Sprintf(format, args...)).
		WithDetails(map[string]any{"field": field})
}
