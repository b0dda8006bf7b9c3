package cloudsim_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/test/cloudsim"
)

// boundUnder lists the loop devices bound to a file under dir: name → file.
func boundUnder(dir string) map[string]string {
	out := map[string]string{}
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		if b, ok := loopdev.BackingFile(e.Name()); ok && strings.HasPrefix(b, dir+"/") {
			out[e.Name()] = b
		}
	}
	return out
}

// TestRestartReconcilesLoopDevices: Close keeps loop devices; a restart
// keeps the ones still bound, re-creates a lost one and removes a loop
// device of ours that no attachment explains; Teardown removes them all.
func TestRestartReconcilesLoopDevices(t *testing.T) {
	testenv.RequireLoopControl(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cfg := cloudsim.Config{StateDir: t.TempDir(), LocalDevices: cloudsim.LocalDevicesAuto}
	s1 := startSim(t, cfg)
	cs := syncClient(s1)
	kept, keptDev := attachToAppliance(t, s1, cs, "kept", 1)
	lost, lostDev := attachToAppliance(t, s1, cs, "lost", 1)
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if b, ok := loopdev.BackingFile(filepath.Base(keptDev.Path)); !ok || b != keptDev.BackingFile {
		t.Fatalf("Close removed %s (backing %q)", keptDev.Path, b)
	}
	// The host loses one device; a stray of ours appears.
	lostLoop, ok := loopdev.Lookup(filepath.Base(lostDev.Path))
	if !ok {
		t.Fatalf("%s not bound after Close", lostDev.Path)
	}
	if err := lostLoop.Remove(ctx); err != nil {
		t.Fatal(err)
	}
	stray := filepath.Join(filepath.Dir(keptDev.BackingFile), "stray.img")
	if err := os.WriteFile(stray, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	strayLoop, err := loopdev.Create(ctx, stray)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = strayLoop.Remove(context.Background()) })

	s2 := startSim(t, cfg)
	if d, ok := s2.LocalDevice(kept); !ok || d != keptDev {
		t.Fatalf("kept device = %+v, want %+v", d, keptDev)
	}
	d, ok := s2.LocalDevice(lost)
	if b, bound := loopdev.BackingFile(filepath.Base(d.Path)); !ok || !bound || b != lostDev.BackingFile {
		t.Fatalf("lost device not re-created: %+v (backing %q)", d, b)
	}
	if b, ok := loopdev.BackingFile(strayLoop.Name()); ok && b == stray {
		t.Fatalf("stray %s still bound to %s", strayLoop.Path, stray)
	}
	if err := s2.Teardown(ctx); err != nil {
		t.Fatal(err)
	}
	if left := boundUnder(cfg.StateDir); len(left) != 0 {
		t.Fatalf("after Teardown: %v", left)
	}
}
