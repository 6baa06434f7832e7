package router

import (
	"bufio"
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/rbee/rbee-hive/proxy"
)

func timedPost(b *testing.B, url, body string) time.Duration {
	t0 := time.Now()
	resp, err := http.Post(url, "application/json", strings.NewReader(body))
	if err != nil {
		b.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 {
		b.Fatalf("status %d", resp.StatusCode)
	}
	return time.Since(t0)
}

// BenchmarkOverhead: a warm worker asked directly, through a bare proxy hop
// and through the router, interleaved in the same run; reports all three
// and the ratios.
func BenchmarkOverhead(b *testing.B) {
	// "a" answers as fast as it can, so the hops dominate; "paced" streams
	// 1000 tokens/s, closer to an engine.
	h := newFakeHive(b, 1000, map[string]simModel{"a": {memMiB: 100, slots: 4}, "paced": {memMiB: 100, slots: 4, tps: 1000}})
	models := []Model{{Name: "a", Backend: "sim", Autoload: true}, {Name: "paced", Backend: "sim", Autoload: true}}
	_, srv := newTestRouter(b, h, models...)
	for _, c := range []struct {
		name, model string
		stream      bool
	}{{"json", "a", false}, {"stream", "a", true}, {"stream-paced", "paced", true}} {
		b.Run(c.name, func(b *testing.B) {
			body := chatBody(c.model, 16, c.stream)
			timedPost(b, srv.URL+PathChatCompletions, body) // load, warm both connections
			ws, _ := h.Workers(context.Background(), c.model)
			direct := ws[0].URL.JoinPath(RouteChatCompletions).String()
			timedPost(b, direct, body)
			// The same forwarder to a fixed worker without the router: the
			// hop's own cost, to tell it from routing's.
			fwd := &HTTPForwarder{}
			hop := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				fwd.Forward(w, r, Target{Served: c.model, WorkerID: ws[0].ID, URL: ws[0].URL}, RouteChatCompletions)
			}))
			defer hop.Close()
			timedPost(b, hop.URL, body)
			// The production path: the router over the hive's OpenAI proxy.
			hp := hiveProxyRouter(b, h, models)
			timedPost(b, hp+PathChatCompletions, body)
			var d, p, r, rh time.Duration
			b.ResetTimer()
			for b.Loop() {
				d += timedPost(b, direct, body)
				p += timedPost(b, hop.URL, body)
				r += timedPost(b, srv.URL+PathChatCompletions, body)
				rh += timedPost(b, hp+PathChatCompletions, body)
			}
			n := float64(b.N)
			b.ReportMetric(float64(d.Microseconds())/n, "direct-µs/req")
			b.ReportMetric(float64(p.Microseconds())/n, "proxied-µs/req")
			b.ReportMetric(float64(r.Microseconds())/n, "routed-µs/req")
			b.ReportMetric(float64(rh.Microseconds())/n, "routed-hiveproxy-µs/req")
			b.ReportMetric(float64(r)/float64(d), "routed/direct")
			b.ReportMetric(float64(r)/float64(p), "routed/proxied")
			b.ReportMetric(float64(rh)/float64(d), "routed-hiveproxy/direct")
		})
	}
}

// BenchmarkColdStart: a request for an unloaded model, split into the hive's
// admission, fork/exec, load (exec to /health 200) and the rest up to the
// client's first streamed byte (routing, first token, forwarding).
func BenchmarkColdStart(b *testing.B) {
	h := newFakeHive(b, 1000, map[string]simModel{"a": {memMiB: 100}})
	r, srv := newTestRouter(b, h, Model{Name: "a", Autoload: true})
	var admit, execd, load, ttft, total time.Duration
	for b.Loop() {
		b.StopTimer()
		if _, err := r.Unload(context.Background(), "a"); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		resp, err := http.Post(srv.URL+PathChatCompletions, "application/json", strings.NewReader(chatBody("a", 4, true)))
		if err != nil {
			b.Fatal(err)
		}
		rd := bufio.NewReader(resp.Body)
		if _, err := rd.ReadString('\n'); err != nil {
			b.Fatal(err)
		}
		ttft += time.Since(t0)
		_, _ = io.Copy(io.Discard, rd)
		resp.Body.Close()
		total += time.Since(t0)
		h.mu.Lock()
		admit, execd, load = admit+h.last.admit, execd+h.last.exec, load+h.last.load
		h.mu.Unlock()
	}
	n := float64(b.N)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 / n }
	b.ReportMetric(ms(admit)*1000, "admission-µs")
	b.ReportMetric(ms(execd), "exec-ms")
	b.ReportMetric(ms(load), "load-ms")
	b.ReportMetric(ms(ttft-admit-execd-load), "rest-to-first-byte-ms")
	b.ReportMetric(ms(ttft), "first-byte-ms")
	b.ReportMetric(ms(total), "total-ms")
}

// hiveProxyRouter serves a router over h whose Forwarder is the hive's
// OpenAI proxy, and returns its URL.
func hiveProxyRouter(b *testing.B, h Hive, models []Model) string {
	p, err := proxy.New(prometheus.NewRegistry(), proxy.Options{})
	if err != nil {
		b.Fatal(err)
	}
	fwd := ForwarderFunc(func(w http.ResponseWriter, r *http.Request, t Target, route string) {
		p.ServeOpenAI(w, r, t.URL, proxy.Route(route), proxy.Labels{Backend: t.Backend, Model: t.Served}, proxy.Hooks{})
	})
	ms := append([]Model(nil), models...)
	for i := range ms {
		ms[i].Queue, ms[i].LoadTimeout = 8, time.Minute
	}
	r, err := New(h, fwd, ms, Options{Registry: prometheus.NewRegistry()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(r.Close)
	srv := httptest.NewServer(r.Handler())
	b.Cleanup(srv.Close)
	return srv.URL
}
