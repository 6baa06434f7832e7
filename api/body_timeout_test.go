package api

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"
)

// A JSON body (spawn, download, ready, heartbeat) that does not arrive
// before the server's read timeout is a 408 REQUEST_TIMEOUT, one cut short
// of its Content-Length a 400 INVALID_JSON: the client's fault, said as
// such, not "malformed JSON: i/o timeout". Raw TCP, since net/http's client
// will not send a body shorter than its Content-Length.
func TestDecodeJSONSlowOrCutBody(t *testing.T) {
	tests := []struct {
		name     string
		halfShut bool
		status   int
		code     string
	}{
		{"cut short", true, http.StatusBadRequest, CodeInvalidJSON},
		{"too slow", false, http.StatusRequestTimeout, CodeRequestTimeout},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				var v map[string]any
				if err := DecodeJSON(w, r, &v); err != nil {
					WriteError(w, err)
					return
				}
				w.WriteHeader(http.StatusOK)
			}))
			srv.Config.ReadTimeout = 300 * time.Millisecond
			srv.Start()
			t.Cleanup(srv.Close)
			conn, err := net.Dial("tcp", srv.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, "POST /v1/workers/spawn HTTP/1.1\r\nHost: hive\r\n"+
				"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"+`{"model_ref":"fi`); err != nil {
				t.Fatal(err)
			}
			if tt.halfShut {
				if err := conn.(*net.TCPConn).CloseWrite(); err != nil {
					t.Fatal(err)
				}
			}
			resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var env struct {
				Error struct{ Code string } `json:"error"`
			}
			if err := json.NewDecoder(resp.Body).Decode(&env); err != nil {
				t.Fatalf("status %d, no envelope: %v", resp.StatusCode, err)
			}
			if resp.StatusCode != tt.status || env.Error.Code != tt.code {
				t.Errorf("got %d %s, want %d %s", resp.StatusCode, env.Error.Code, tt.status, tt.code)
			}
		})
	}
}
