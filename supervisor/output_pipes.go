package supervisor

import (
	"fmt"
	"os"
	"os/exec"
	"sync"
)

// outputPipes is one run's stdout/stderr pipe pair. The write ends go to
// the child as *os.File outputs (so cmd.Wait does not wait for our readers,
// and a grandchild holding a pipe cannot delay exit handling); the read
// ends are pumped into the worker's log sink.
type outputPipes struct {
	outR, outW, errR, errW *os.File
}

// openOutputPipes opens both pipes and makes them cmd's stdout and stderr.
// On error nothing stays open.
func openOutputPipes(cmd *exec.Cmd) (*outputPipes, error) {
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("stdout pipe: %w", err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("stderr pipe: %w", err)
	}
	cmd.Stdout, cmd.Stderr = outW, errW
	return &outputPipes{outR: outR, outW: outW, errR: errR, errW: errW}, nil
}

// close closes all four ends: the process did not start.
func (p *outputPipes) close() {
	p.closeWriteEnds()
	p.outR.Close()
	p.errR.Close()
}

// closeWriteEnds drops our copies of the child's ends once it has them, so
// the readers see EOF when the last process holding them exits.
func (p *outputPipes) closeWriteEnds() {
	p.outW.Close()
	p.errW.Close()
}

// pump copies both streams into sink until EOF; readers is done when both
// have ended.
func (p *outputPipes) pump(sink *logSink, readers *sync.WaitGroup) {
	readers.Add(2)
	go func() { defer readers.Done(); sink.pump(streamStdout, p.outR) }()
	go func() { defer readers.Done(); sink.pump(streamStderr, p.errR) }()
}
