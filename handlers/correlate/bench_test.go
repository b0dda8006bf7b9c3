package correlate_test

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/devagent/loopdev"
)

// BenchmarkAddToMapping measures, on real loop devices reusing one name,
// the time from the kernel's add of a volume's disk (the loop device bound
// to the volume's file) to its mapping recorded in the store: the agent's
// uevent, the stored event, the correlator's pick, its re-check with a
// fresh list and the persistent name included. It reports p50 and p99.
func BenchmarkAddToMapping(b *testing.B) {
	e := setup(b, false, 30*time.Second)
	ctx := context.Background()
	dir := b.TempDir()
	var took []time.Duration
	for b.Loop() {
		vol := uuid.NewString()
		backing := filepath.Join(dir, "vol-"+vol+".img")
		if err := os.WriteFile(backing, nil, 0o600); err != nil {
			b.Fatal(err)
		}
		if err := os.Truncate(backing, 64<<20); err != nil {
			b.Fatal(err)
		}
		want := commands.Mapping{VolumeID: vol, VMID: vm, Size: 64 << 20, CloudStackState: commands.CloudStackAttached}
		start := time.Now()
		dev, err := loopdev.Create(ctx, backing)
		if err != nil {
			b.Fatal(err)
		}
		m, err := e.correlate(ctx, want, start)
		took = append(took, time.Since(start))
		if err != nil || m.DevicePath != dev.Path {
			b.Fatalf("mapping %+v (%v), want %s", m, err, dev.Path)
		}
		if err := dev.Remove(ctx); err != nil {
			b.Fatal(err)
		}
		if err := e.corr.Detached(ctx, m); err != nil {
			b.Fatal(err)
		}
		if err := e.store.DeleteMapping(ctx, vol, 0); err != nil {
			b.Fatal(err)
		}
		_ = os.Remove(backing)
	}
	reportPercentiles(b, took)
}

// reportPercentiles reports the p50 and p99 of took in milliseconds.
func reportPercentiles(b *testing.B, took []time.Duration) {
	if len(took) == 0 {
		return
	}
	slices.Sort(took)
	at := func(p float64) float64 {
		return float64(took[min(len(took)-1, int(p*float64(len(took))))]) / float64(time.Millisecond)
	}
	b.ReportMetric(at(0.50), "p50-ms")
	b.ReportMetric(at(0.90), "p90-ms")
	b.ReportMetric(at(0.99), "p99-ms")
	b.ReportMetric(0, "ns/op")
}
