// Command gen writes the generated dashboard files. Run it from the
// repository root: go run ./dashboards/gen
package main

import (
	"fmt"
	"os"

	"github.com/rbee/rbee-hive/dashboards"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "dashboards/gen:", err)
		os.Exit(1)
	}
}

func run() error {
	for _, f := range []struct {
		path   string
		render func() ([]byte, error)
	}{
		{dashboards.OverviewFile, dashboards.OverviewJSON},
		{dashboards.QueriesFile, dashboards.QueriesJSON},
	} {
		b, err := f.render()
		if err != nil {
			return err
		}
		if err := os.WriteFile(f.path, b, 0o644); err != nil {
			return fmt.Errorf("write %s (run from the repository root): %w", f.path, err)
		}
		fmt.Println("wrote", f.path)
	}
	return nil
}
