// Package simtest starts the CloudStack simulator for a test: on a free
// loopback port, its state in the test's temporary directory, torn down
// (loop devices and files) when the test ends.
package simtest

import (
	"context"
	"testing"
	"time"

	"github.com/volumed/volumed/test/cloudsim"
)

// Start runs a simulator for t. Unset fields of cfg default to a free
// port, a temporary state directory, no local devices and 20 ms jobs; set
// cfg.LocalDevices to cloudsim.LocalDevicesAuto for real loop devices.
func Start(t testing.TB, cfg cloudsim.Config) *cloudsim.Sim {
	t.Helper()
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:0"
	}
	if cfg.StateDir == "" {
		cfg.StateDir = t.TempDir()
	}
	if cfg.LocalDevices == "" {
		cfg.LocalDevices = cloudsim.LocalDevicesOff
	}
	if cfg.JobDuration == 0 {
		cfg.JobDuration = 20 * time.Millisecond
	}
	s, err := cloudsim.New(cfg)
	if err != nil {
		t.Fatalf("cloudsim: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := s.Start(ctx); err != nil {
		t.Fatalf("cloudsim start: %v", err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		if err := s.Teardown(ctx); err != nil {
			t.Errorf("cloudsim teardown: %v", err)
		}
	})
	return s
}
