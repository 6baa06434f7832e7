package supervisor

import (
	"crypto/sha256"
	"sort"
)

// maxTerminal bounds how many stopped/failed workers stay listed.
const maxTerminal = 256

// pruneTerminal drops the oldest terminal workers beyond maxTerminal. Caller holds s.mu.
func (s *Supervisor) pruneTerminal() {
	var term []*worker
	for _, w := range s.workers {
		if w.state.terminal() {
			term = append(term, w)
		}
	}
	if len(term) <= maxTerminal {
		return
	}
	sort.Slice(term, func(i, j int) bool { return term[i].terminalAt.Before(term[j].terminalAt) })
	for _, w := range term[:len(term)-maxTerminal] {
		s.removeLocked(w)
	}
}

// removeLocked drops w from the registry. Caller holds s.mu and ends with
// s.unlock, which deletes the log files.
func (s *Supervisor) removeLocked(w *worker) {
	s.unpersist(w)
	delete(s.workers, w.id)
	delete(s.tokens, w.tokenHash)
	if s.ports[w.port] == w.id {
		delete(s.ports, w.port)
	}
	s.afterUnlock = append(s.afterUnlock, w.logs.remove, func() { removeOutputFiles(s.outDir, w.id) }, func() { s.ids.release(w, w.log) })
}

// tokenKey is how a worker token is kept in s.tokens: hashed, so the map
// holds no secret.
func tokenKey(tok string) [32]byte { return sha256.Sum256([]byte(tok)) }
