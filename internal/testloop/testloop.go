// Package testloop makes loop devices for tests (the caller has checked
// testenv.RequireLoopControl). It is apart from testenv, whose helpers the
// loopdev tests use.
package testloop

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/volumed/volumed/devagent/loopdev"
)

// File makes a 3 MiB file in dir whose name carries the volume UUID
// (vol-<uuid>.img) and returns its path.
func File(t testing.TB, dir, volume string) string {
	t.Helper()
	backing := filepath.Join(dir, "vol-"+volume+".img")
	if err := os.WriteFile(backing, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(backing, 3<<20); err != nil {
		t.Fatal(err)
	}
	return backing
}

// Volume makes a loop device on a File of the volume in dir, removed at
// the end of the test.
func Volume(ctx context.Context, t testing.TB, dir, volume string) *loopdev.Device {
	t.Helper()
	dev, err := loopdev.Create(ctx, File(t, dir, volume))
	if err != nil {
		t.Fatalf("loop device: %v", err)
	}
	t.Cleanup(func() { _ = dev.Remove(context.Background()) })
	return dev
}
