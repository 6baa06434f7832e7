package main

import (
	"context"
	"io"
)

func runModels(ctx context.Context, args []string, stdout, stderr io.Writer) error { return nil }
func runDetect(ctx context.Context, args []string, stdout io.Writer) error         { return nil }
