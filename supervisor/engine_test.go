package supervisor

import (
	"net/http"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/config"
)

// recordingProxy answers 200 and remembers the target it was given.
type recordingProxy struct{ got chan ProxyTarget }

func (p recordingProxy) Forward(w http.ResponseWriter, r *http.Request, t ProxyTarget) {
	t.OnStart()
	defer t.OnEnd()
	p.got <- t
	w.WriteHeader(http.StatusOK)
}

// Each route reaches the proxy only on a backend that speaks it, with the
// backend's api and the engine path in the target.
func TestEngineRoutesFollowTheBackendsAPI(t *testing.T) {
	h := newHarness(t, func(c *config.Config) {
		be := c.Backends["sim"]
		be.API = config.APIOpenAI
		c.Backends["openai"] = be
		be.NativeCompletion = true
		c.Backends["native"] = be
		sim := c.Backends["sim"]
		sim.API = config.APIRbee
		c.Backends["sim"] = sim
	})
	p := recordingProxy{got: make(chan ProxyTarget, 1)}
	h.s.deps.Proxy = p
	ids := map[string]string{}
	for _, b := range []string{"sim", "openai", "native"} {
		ids[b] = h.spawn(map[string]any{"backend": b}).WorkerID
		h.waitState(ids[b], StateIdle, 10*time.Second)
	}
	tests := []struct {
		backend, route string
		want           int
	}{
		{"sim", RouteRbee, 200},
		{"sim", RouteChat, 404},
		{"openai", RouteChat, 200},
		{"openai", RouteCompletion, 200},
		{"openai", RouteNative, 404},
		{"openai", RouteRbee, 404},
		{"native", RouteNative, 200},
	}
	for _, tc := range tests {
		t.Run(tc.backend+tc.route, func(t *testing.T) {
			code, body := h.do("POST", "/v1/workers/"+ids[tc.backend]+tc.route, `{}`)
			if code != tc.want {
				t.Fatalf("%d %s, want %d", code, body, tc.want)
			}
			if code != 200 {
				return
			}
			got := <-p.got
			wantAPI := string(h.s.cfg.Backends[tc.backend].API)
			if got.Route != tc.route || got.API != wantAPI {
				t.Errorf("target route %q api %q, want %q %q", got.Route, got.API, tc.route, wantAPI)
			}
		})
	}
}
