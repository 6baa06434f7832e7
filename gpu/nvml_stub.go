//go:build !(linux && cgo)

package gpu

import "fmt"

// Without cgo go-nvml does not compile; such a binary has no GPU backend.
func openNVML() (GPUs, error) {
	return nil, fmt.Errorf("%w: binary built without cgo (NVML needs linux and cgo)", ErrUnavailable)
}
