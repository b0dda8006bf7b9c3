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
	"github.com/volumed/volumed/csapi"
	"github.com/volumed/volumed/devagent/loopdev"
	"github.com/volumed/volumed/test/cloudsim"
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

// BenchmarkAttachAddToCompleted attaches volumes through the CloudStack
// simulator, which makes each one's loop device during its job (a freed
// name comes back each time), and measures from the kernel's add of the
// disk (the time the agent read its uevent) to the attach's end: the job's
// answer (polled as volumed's attach handler polls it), the correlation
// and the mapping recorded. It reports p50 and p99.
func BenchmarkAttachAddToCompleted(b *testing.B) {
	e := setup(b, false, 30*time.Second)
	ctx := context.Background()
	// volumed's own CloudStack client, polling the job as the handler does.
	cs := csapi.New(csapi.Config{URL: e.sim.URL(), APIKey: cloudsim.DefaultAPIKey, SecretKey: cloudsim.DefaultSecretKey})
	events, stop := e.agent.Subscribe()
	defer stop()
	var took []time.Duration
	for b.Loop() {
		vol := e.createVolume(b, 1)
		since := time.Now()
		jobID, err := cs.AttachVolume(ctx, vol, vm, nil)
		if err != nil {
			b.Fatal(err)
		}
		job, err := cs.WaitJob(ctx, jobID)
		if err != nil || job.Volume == nil {
			b.Fatalf("attach job %+v: %v", job, err)
		}
		want := commands.Mapping{VolumeID: vol, VMID: vm, Size: job.Volume.Size, DeviceID: job.Volume.DeviceID,
			CloudStackState: commands.CloudStackAttached}
		m, err := e.correlate(ctx, want, since)
		done := time.Now()
		if err != nil {
			b.Fatal(err)
		}
		dev := e.simDevice(b, vol)
		var added time.Time
		for added.IsZero() {
			ev := <-events
			if ev.Action == commands.DeviceAdd && ev.Path == dev.Path && ev.BackingFile == dev.BackingFile {
				added = ev.Time
			}
		}
		took = append(took, done.Sub(added))
		e.detach(b, vol)
		if err := e.corr.Detached(ctx, m); err != nil {
			b.Fatal(err)
		}
		if err := e.store.DeleteMapping(ctx, vol, 0); err != nil {
			b.Fatal(err)
		}
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
