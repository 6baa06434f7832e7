package supervisor

import (
	"context"
	"fmt"
)

// WedgeLoop blocks the Run loop until release is closed, so
// Alive fails as it would with a real bug. It returns once the loop is stuck.
func (s *Supervisor) WedgeLoop(ctx context.Context, release <-chan struct{}) error {
	select {
	case s.wedge <- release:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("wedge: %w", ctx.Err())
	}
}

// HandleDatagram feeds one datagram to the notify intake as if the kernel
// had vouched for pid.
func (s *Supervisor) HandleDatagram(pid int32, fields map[string]string) {
	s.handleDatagram(pid, fields)
}
