package router

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/rbee/rbee-hive/proxy"
)

// TestThroughHiveProxy mounts the router on the hive's own OpenAI proxy as
// the Forwarder, the way the hive wires it: answers, streams, the proxy's
// metrics labelled by the served model, and a crash mid-stream ending in
// the proxy's error event.
func TestThroughHiveProxy(t *testing.T) {
	h := newFakeHive(t, 1000, map[string]simModel{"a": {memMiB: 100, tps: 50}})
	preg := prometheus.NewPedanticRegistry()
	p, err := proxy.New(preg, proxy.Options{})
	if err != nil {
		t.Fatal(err)
	}
	fwd := ForwarderFunc(func(w http.ResponseWriter, r *http.Request, tg Target, route string) {
		p.ServeOpenAI(w, r, tg.URL, proxy.Route(route), proxy.Labels{Backend: tg.Backend, Model: tg.Served}, proxy.Hooks{})
	})
	r, err := New(h, fwd, []Model{{Name: "a", Backend: "sim", Autoload: true, Queue: 8, LoadTimeout: time.Minute}}, Options{Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()

	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 3, false)); a.status != 200 || !strings.Contains(a.body, `"completion_tokens":3`) {
		t.Fatalf("json: %d %s", a.status, a.body)
	}
	a := post(t, srv.URL+PathCompletions, `{"model":"a","prompt":"x","max_tokens":3,"stream":true}`)
	if a.status != 200 || !strings.HasSuffix(a.body, "data: [DONE]\n\n") || strings.Contains(a.body, `"usage"`) {
		t.Fatalf("stream: %d %q", a.status, a.body)
	}
	rec := httptest.NewRecorder()
	promhttp.HandlerFor(preg, promhttp.HandlerOpts{}).ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	if want := `rbee_hive_inference_requests_total{backend="sim",model="a",status="ok"} 2`; !strings.Contains(rec.Body.String(), want) {
		t.Errorf("proxy metrics lack %s", want)
	}

	first, rest := crashMidStream(t, srv.URL, h)
	if !strings.Contains(string(rest), `"error":{`) || !strings.Contains(string(rest), `"type":"server_error"`) {
		t.Fatalf("no error event after the crash: %q", rest)
	}
	if a := post(t, srv.URL+PathChatCompletions, chatBody("a", 2, false)); a.status != 200 {
		t.Fatalf("after crash: %d %s", a.status, a.body)
	}
	if ids := h.ids("a"); len(ids) != 1 || ids[0] == first[0] {
		t.Errorf("not a new worker: before %v after %v", first, ids)
	}
}
