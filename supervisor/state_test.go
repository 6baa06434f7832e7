package supervisor

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
)

// TestStateTransitionTable walks every (from, to) pair: a pair in the table
// (or a move to the same state) is taken; any other is refused, leaves the
// state alone, is logged at error naming both states and is counted.
func TestStateTransitionTable(t *testing.T) {
	reg := prometheus.NewRegistry()
	s, err := New(testConfig(t), Deps{Cgroups: newCgroups(t), Registry: reg})
	if err != nil {
		t.Fatal(err)
	}
	if len(transitions) != len(allStates) {
		t.Fatalf("the table has %d source states, want all %d", len(transitions), len(allStates))
	}
	illegal := 0
	for _, from := range allStates {
		for _, to := range allStates {
			var logBuf bytes.Buffer
			w := &worker{id: "w-table", state: from, log: slog.New(slog.NewTextHandler(&logBuf, nil))}
			legal := from == to
			for _, t2 := range transitions[from] {
				legal = legal || t2 == to
			}
			got := s.setState(w, to, "table test")
			labels := map[string]string{"from": string(from), "to": string(to)}
			if legal {
				if !got || w.state != to {
					t.Errorf("%s → %s: refused (state %s), want taken", from, to, w.state)
				}
				if n := counter(t, reg, "rbee_hive_worker_illegal_transitions_total", labels); n > 0 {
					t.Errorf("%s → %s: counted as illegal %v times", from, to, n)
				}
				continue
			}
			illegal++
			if got || w.state != from {
				t.Errorf("%s → %s: taken (state %s), want refused", from, to, w.state)
			}
			if n := counter(t, reg, "rbee_hive_worker_illegal_transitions_total", labels); n != 1 {
				t.Errorf("%s → %s: illegal transitions counted %v, want 1", from, to, n)
			}
			line := logBuf.String()
			if !strings.Contains(line, "level=ERROR") || !strings.Contains(line, "from="+string(from)) || !strings.Contains(line, "to="+string(to)) {
				t.Errorf("%s → %s: log %q, want an error naming both states", from, to, line)
			}
		}
	}
	// Terminal states are final.
	for _, st := range allStates {
		if st.terminal() && len(transitions[st]) != 0 {
			t.Errorf("terminal state %s has transitions %v", st, transitions[st])
		}
	}
	if illegal == 0 {
		t.Fatal("no illegal pair was tried")
	}
}
