package engine

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/rbee/rbee-hive/internal/testkit"
)

// BenchmarkProxyOverhead streams the same greedy chat completion from
// llama-server directly and through the hive, alternating, in one run, and
// reports the hive's time to first token and decode rate as ratios to the
// direct ones (bench/engine.sh runs it).
func BenchmarkProxyOverhead(b *testing.B) {
	bin := llamaServer(b)
	dir := b.TempDir()
	modelPath := writeModel(b, dir)
	h := startHive(b, backends(b, bin))
	code, body := h.Do("POST", "/v1/workers/spawn", map[string]any{"model_ref": "file:" + modelPath, "backend": "llama-server", "device": 0})
	if code != http.StatusOK {
		b.Fatalf("spawn: %d %s", code, body)
	}
	var sp struct {
		WorkerID string `json:"worker_id"`
	}
	_ = json.Unmarshal(body, &sp)
	var wi workerInfo
	testkit.WaitFor(b, 60*time.Second, "idle", func() bool { wi, _ = h.worker(sp.WorkerID); return wi.State == "idle" })

	req := map[string]any{"messages": []map[string]string{{"role": "user", "content": "Hello"}},
		"max_tokens": 128, "stream": true, "temperature": 0, "seed": 1}
	direct := func() (time.Duration, float64) {
		return timeStream(b, wi.URL+"/v1/chat/completions", "", req)
	}
	viaHive := func() (time.Duration, float64) {
		return timeStream(b, h.URL+"/v1/workers/"+sp.WorkerID+"/v1/chat/completions", h.Token, req)
	}
	direct() // warm both paths
	viaHive()
	const rounds = 12
	var dT, hT []time.Duration
	var dR, hR []float64
	b.ResetTimer()
	for range b.N {
		for i := range rounds {
			// Alternate which goes first, so neither always follows the other.
			if i%2 == 0 {
				t1, r1 := direct()
				t2, r2 := viaHive()
				dT, dR, hT, hR = append(dT, t1), append(dR, r1), append(hT, t2), append(hR, r2)
			} else {
				t2, r2 := viaHive()
				t1, r1 := direct()
				dT, dR, hT, hR = append(dT, t1), append(dR, r1), append(hT, t2), append(hR, r2)
			}
		}
	}
	b.StopTimer()
	md, mh := median(dT), median(hT)
	rd, rh := medianF(dR), medianF(hR)
	b.ReportMetric(float64(mh)/float64(md), "ttft_ratio")
	b.ReportMetric(rh/rd, "tps_ratio")
	fmt.Printf("engine proxy overhead (%d streams each, 128 tokens, same run):\n"+
		"  time to first token p50: direct %v, via hive %v, ratio %.3f\n"+
		"  tokens/s p50:            direct %.1f, via hive %.1f, ratio %.3f\n",
		len(dT), md, mh, float64(mh)/float64(md), rd, rh, rh/rd)
}

// timeStream posts a streamed chat and returns the time to the first content
// chunk and the chunk rate from first to last.
func timeStream(b *testing.B, url, token string, req map[string]any) (time.Duration, float64) {
	body, _ := json.Marshal(req)
	r, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	if token != "" {
		r.Header.Set("Authorization", "Bearer "+token)
	}
	start := time.Now()
	// A fresh connection for each stream, on both paths: llama-server may
	// close an idle keep-alive connection just as a POST reuses it.
	resp, err := (&http.Client{Transport: &http.Transport{DisableKeepAlives: true}}).Do(r)
	if err != nil {
		b.Fatal(err)
	}
	defer resp.Body.Close()
	var first, last time.Time
	n := 0
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		d, ok := strings.CutPrefix(sc.Text(), "data: ")
		if !ok || !strings.Contains(d, `"content":"`) || strings.Contains(d, `"content":""`) {
			continue
		}
		now := time.Now()
		if n == 0 {
			first = now
		}
		last = now
		n++
	}
	if n < 2 {
		b.Fatalf("%s: %d content chunks", url, n)
	}
	return first.Sub(start), float64(n-1) / last.Sub(first).Seconds()
}

func median(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianF(d []float64) float64 {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}
