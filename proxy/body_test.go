package proxy

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestRequestBodyCutOrSlow: a body that stops short of its Content-Length
// (the client half-closes) or does not arrive before the server's read
// timeout gets an error envelope, never a 200 with nothing in it, and counts
// as rejected; the worker is never called. Raw TCP, since net/http's client
// will not send a body shorter than its Content-Length.
func TestRequestBodyCutOrSlow(t *testing.T) {
	tests := []struct {
		name     string
		halfShut bool // close the write side after the partial body
		status   int
		code     string
	}{
		{"cut short", true, http.StatusBadRequest, "INVALID_JSON"},
		{"too slow", false, http.StatusRequestTimeout, CodeRequestTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int32
			rg := newRig(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				w.WriteHeader(http.StatusOK)
			}), Options{})
			// The daemon's server has a ReadTimeout; this one a short one.
			srv := httptest.NewUnstartedServer(rg.hive.Config.Handler)
			srv.Config.ReadTimeout = 500 * time.Millisecond
			srv.Start()
			t.Cleanup(srv.Close)

			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_, err = io.WriteString(conn, "POST /v1/workers/w-1/inference HTTP/1.1\r\nHost: hive\r\n"+
				"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"+`{"prompt":"he`)
			if err != nil {
				t.Fatal(err)
			}
			if tt.halfShut {
				if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatalf("no response: %v", err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			var env struct {
				Error struct {
					Code string `json:"code"`
				} `json:"error"`
			}
			if resp.StatusCode != tt.status || json.Unmarshal(body, &env) != nil || env.Error.Code != tt.code {
				t.Fatalf("got %d %q, want %d with code %s", resp.StatusCode, body, tt.status, tt.code)
			}
			rg.waitEnd()
			rg.outcomes(StatusRejected, "")
			if n := calls.Load(); n != 0 {
				t.Errorf("worker called %d times", n)
			}
			if !strings.Contains(resp.Header.Get("Content-Type"), "application/json") {
				t.Errorf("content type %q", resp.Header.Get("Content-Type"))
			}
		})
	}
}
