package state_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

var (
	fullReadOps = flag.Int("fullread.ops", 100_000, "operations BenchmarkKVFullRead writes before reading them")
	fullReadDir = flag.String("fullread.dir", "", "BenchmarkKVFullRead's data dir, kept to be read again by the next run "+
		"(with the same -fullread.ops); default a temporary one")
)

// benchOp is the i-th operation of a history like bench/scale's: types
// and terminal statuses in turn over 10,000 volumes, 1,000 VMs and 20
// requesters.
func benchOp(i int, base time.Time) commands.Operation {
	uuid := func(kind, i int) string { return fmt.Sprintf("%08x-0000-4000-8000-%012x", kind, i) }
	typ := commands.OpTypes[i%len(commands.OpTypes)]
	status := commands.StatusCompleted
	if (i/len(commands.OpTypes))%10 == 3 {
		status = commands.StatusFailed
	}
	vol, vm := uuid(1, i%10_000), uuid(2, i%1_000)
	created := base.Add(time.Duration(i) * 2500 * time.Millisecond)
	done := created.Add(3 * time.Second)
	dev := int64(1 + i%14)
	op := commands.Operation{ID: "op-" + uuid(3, i), Type: typ, Status: status, VolumeID: vol,
		Request: json.RawMessage(fmt.Sprintf(`{"volume_id":%q,"vm_id":%q}`, vol, vm)),
		Step:    string(typ) + ":done", JobID: uuid(4, i), Attempts: 1,
		RequestedBy: fmt.Sprintf("api-token:bench-%d@127.0.0.1", i%20), CreatedAt: created, UpdatedAt: done, CompletedAt: &done}
	if typ == commands.OpAttach || typ == commands.OpDetach {
		op.VMID = &vm
	}
	if status == commands.StatusCompleted {
		op.Response = &commands.OpResponse{VolumeID: vol, VMID: vm, DevicePath: "/dev/vdb", DeviceID: &dev,
			Message: "Volume attached successfully"}
	} else {
		op.Error = "cloudstack: job failed: bench"
	}
	return op
}

// fillBucket writes n operations into bucket as a store's creates do (a
// put expecting no earlier revision of the key), many in flight at once.
func fillBucket(b testing.TB, js jetstream.JetStream, bucket string, n int) {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	for i := 0; i < n; i++ {
		op := benchOp(i, base)
		data, err := json.Marshal(op)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := js.PublishAsync("$KV."+bucket+".op."+op.ID, data, jetstream.WithExpectLastSequencePerSubject(0)); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-ctx.Done():
		b.Fatal(ctx.Err())
	}
}

// BenchmarkKVFullRead times a start without an index cache: NewKV on a
// bucket of -fullread.ops operations (a bus restarted after writing them,
// so the server reads them from its files), reading every record.
func BenchmarkKVFullRead(b *testing.B) {
	dir := *fullReadDir
	if dir == "" {
		dir = b.TempDir()
	}
	bucket := fmt.Sprintf("fullread_%d", *fullReadOps)
	ctx := context.Background()
	if _, err := os.Stat(filepath.Join(dir, "filled-"+bucket)); err != nil {
		bus := testenv.StartBusIn(b, dir)
		s := newKV(b, bus.JetStream(), bucket)
		fillBucket(b, bus.JetStream(), bucket, *fullReadOps)
		_ = s.Close(ctx)
		_ = bus.Close(ctx)
		if err := os.WriteFile(filepath.Join(dir, "filled-"+bucket), nil, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	bus := testenv.StartBusIn(b, dir)
	cpu0 := cpuTime(b)
	b.ResetTimer()
	for range b.N {
		s, err := state.NewKV(ctx, bus.JetStream(), state.KVConfig{Bucket: bucket})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		st, err := s.Stats(ctx)
		if err != nil || st.Total != int64(*fullReadOps) {
			b.Fatalf("read %d operations (%v), want %d", st.Total, err, *fullReadOps)
		}
		_ = s.Close(ctx)
		b.StartTimer()
	}
	b.ReportMetric(float64(*fullReadOps)*float64(b.N)/b.Elapsed().Seconds(), "records/s")
	// The process's CPU (the server's included, and the checks between
	// the reads): less at the mercy of a shared machine than the time.
	b.ReportMetric((cpuTime(b)-cpu0).Seconds()/float64(b.N), "cpu-s/op")
}

// cpuTime is the CPU time this process has used.
func cpuTime(b testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
