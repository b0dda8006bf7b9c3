package state_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

var (
	fullReadOps = flag.Int("fullread.ops", 100_000, "operations BenchmarkKVFullRead writes before reading them")
	fullReadDir = flag.String("fullread.dir", "", "BenchmarkKVFullRead's data dir, kept to be read again by the next run "+
		"(with the same -fullread.ops); default a temporary one")
)

// benchOp is the i-th operation of bench/scale's history over 10,000
// volumes, 1,000 VMs and 20 requesters, created 2.5 s apart from base.
func benchOp(i int, base time.Time) commands.Operation {
	return storetest.History{Volumes: 10_000, VMs: 1_000, Callers: 20, Start: base, Step: 2500 * time.Millisecond}.Op(i)
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

// fullReadFilters are listings of benchOp's history compared after a
// full read, beside cacheFilters.
var fullReadFilters = []state.Filter{
	{VolumeID: "00000001-0000-4000-8000-000000000007"}, {VMID: benchVM()},
	{RequestedBy: "api-token:bench-3@127.0.0.1"}, {Status: commands.StatusFailed, Type: commands.OpAttach},
	{Limit: 7},
}

// benchVM is a VM of benchOp's history.
func benchVM() string {
	for i := 0; ; i++ {
		if op := benchOp(i, time.Time{}); op.VMID != nil {
			return *op.VMID
		}
	}
}

// sameFullRead fails unless got (a store that read every record) holds
// what want does: the same counts, mappings and exports, and the same
// first page and a deep one of each listing of cacheFilters and
// fullReadFilters (not every record: reading them all takes long).
func sameFullRead(t *testing.T, got, want state.Store) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sameCounts(ctx, t, got, want)
	for _, f := range append(slices.Clone(cacheFilters), fullReadFilters...) {
		f.Cursor = ""
		if f.Limit == 0 {
			f.Limit = 20
		}
		for page := range 4 {
			g, gnext, gerr := got.ListOperations(ctx, f)
			w, wnext, werr := want.ListOperations(ctx, f)
			if gerr != nil || werr != nil || !reflect.DeepEqual(g, w) || gnext != wnext {
				t.Errorf("list %+v: got %v (%v), want %v (%v)", f, storetest.IDs(g), gerr, storetest.IDs(w), werr)
			}
			if wnext == "" {
				break
			}
			// Deeper: the fourth page is many pages down.
			f.Cursor = wnext
			if page == 1 {
				_, f.Cursor, _ = want.ListOperations(ctx, state.Filter{Type: f.Type, Status: f.Status,
					VolumeID: f.VolumeID, VMID: f.VMID, RequestedBy: f.RequestedBy, Limit: 1000, Cursor: wnext})
			}
			if f.Cursor == "" {
				break
			}
		}
	}
}

// writeWhile creates, deletes and updates operations through s until
// stop is closed, and returns how many writes it made.
func writeWhile(t *testing.T, s *state.KV, from int, stop <-chan struct{}) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	base := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	n := 0
	for i := from; ; i++ {
		select {
		case <-stop:
			return n
		default:
		}
		op := benchOp(i, base)
		op.Status, op.CompletedAt = commands.StatusPending, nil
		created, err := s.CreateOperation(ctx, op)
		if err != nil {
			t.Error(err)
			return n
		}
		old, err := s.GetOperation(ctx, benchOp(i-from, base).ID)
		if err != nil {
			t.Error(err)
			return n
		}
		if i%2 == 0 {
			err = s.DeleteOperation(ctx, old.ID, old.Revision)
		} else {
			created.Status = commands.StatusExecuting
			_, err = s.UpdateOperation(ctx, created)
		}
		if err != nil {
			t.Error(err)
			return n
		}
		n += 3
	}
}

// TestKVFullRead: a start reading every record (no index cache) lists,
// counts and holds what a store that indexed each record as it was
// written does, the writes made while it read included.
func TestKVFullRead(t *testing.T) {
	const ops = 20_000
	js := testenv.StartBus(t).JetStream()
	bucket := nextBucket()
	writer := newKV(t, js, bucket)
	fillCacheTest(t, writer)
	fillBucket(t, js, bucket, ops)
	stop := make(chan struct{})
	var writes int
	done := make(chan struct{})
	go func() {
		defer close(done)
		writes = writeWhile(t, writer, ops, stop)
	}()
	s, logs := openCached(t, js, bucket, "")
	close(stop)
	<-done
	if writes == 0 {
		t.Log("no write while reading")
	}
	st, err := s.Stats(context.Background())
	if err != nil || st.Total < ops {
		t.Fatalf("stats %+v, %v", st, err)
	}
	sameFullRead(t, s, writer)
	if strings.Contains(logs.String(), "records left to the watcher's reader") {
		t.Errorf("the first read did not read every record itself:\n%s", logs)
	}
}

// TestKVFullReadLeftToReader: when the first read's consumer goes in the
// middle (its cluster member gone), the watcher's reader goes on from
// the next record: the store still holds every record, once. (The test
// deletes the consumer as soon as it sees it, and tries again when the
// first read had ended by then.)
func TestKVFullReadLeftToReader(t *testing.T) {
	const ops = 50_000
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	js := testenv.StartBus(t).JetStream()
	bucket := nextBucket()
	writer := newKV(t, js, bucket)
	fillCacheTest(t, writer)
	fillBucket(t, js, bucket, ops)
	stream, err := js.Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	for try := 0; ; try++ {
		if try == 5 {
			t.Fatal("the first read always ended before its consumer was deleted")
		}
		known := map[string]bool{}
		for name := range stream.ConsumerNames(ctx).Name() {
			known[name] = true
		}
		deleted := make(chan bool, 1)
		go func() {
			for ctx.Err() == nil {
				for name := range stream.ConsumerNames(ctx).Name() {
					if !known[name] {
						deleted <- stream.DeleteConsumer(ctx, name) == nil
						return
					}
				}
			}
			deleted <- false
		}()
		s, logs := openCached(t, js, bucket, "")
		if !<-deleted {
			t.Fatal("the first read's consumer was not deleted")
		}
		if !strings.Contains(logs.String(), "records left to the watcher's reader") {
			_ = s.Close(ctx)
			continue
		}
		st, err := s.Stats(ctx)
		if err != nil || st.Total != ops+29 {
			t.Fatalf("stats %+v, %v; want %d operations", st, err, ops+29)
		}
		sameFullRead(t, s, writer)
		return
	}
}
