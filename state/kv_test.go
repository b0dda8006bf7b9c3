package state_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// buckets gives every store of a test process its own bucket.
var buckets atomic.Int64

func newKV(t testing.TB, js jetstream.JetStream, bucket string) *state.KV {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := state.NewKV(ctx, js, state.KVConfig{Bucket: bucket})
	if err != nil {
		t.Fatalf("new kv store: %v", err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

func nextBucket() string { return fmt.Sprintf("test_%d", buckets.Add(1)) }

func TestKVConformance(t *testing.T) {
	b := testenv.StartBus(t)
	storetest.Run(t, func(t testing.TB) state.Store { return newKV(t, b.JetStream(), nextBucket()) })
}

// TestKVSharedBucket: two stores on one bucket converge through their
// watchers, and concurrent read-modify-writes of one operation through
// both lose no update: a writer that loses gets ErrStale, re-reads and
// decides again.
func TestKVSharedBucket(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	op, err := a.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	m, err := a.PutMapping(ctx, storetest.Mapping("vol-1", "vm-1", "/dev/vdb"))
	if err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 30*time.Second, func() bool {
		m, err := b.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		return slices.Equal(storetest.ListIDs(t, b, state.Filter{VMID: "vm-1", Status: commands.StatusPending}), []string{op.ID}) &&
			err == nil && m.VolumeID == "vol-1"
	}, "b sees a's operation and mapping")
	if _, err := b.CreateOperation(ctx, op); !errors.Is(err, state.ErrExists) {
		t.Fatalf("b creates a's operation: %v", err)
	}
	if _, err := b.PutMapping(ctx, storetest.Mapping("vol-2", "vm-1", "/dev/vdb")); !errors.Is(err, state.ErrConflict) {
		t.Fatalf("b takes a's device: %v", err)
	}

	op.Status = commands.StatusExecuting
	if op, err = b.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteMapping(ctx, "vol-1", m.Revision); err != nil {
		t.Fatal(err)
	}
	// a's copy of the mapping is stale now: it cannot bring it back.
	if _, err := a.PutMapping(ctx, m); !errors.Is(err, state.ErrStale) {
		t.Fatalf("a rewrites the deleted mapping: %v, want ErrStale", err)
	}
	testenv.Eventually(t, 30*time.Second, func() bool {
		_, err := a.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		st, _ := a.Stats(ctx)
		return slices.Equal(storetest.ListIDs(t, a, state.Filter{Status: commands.StatusExecuting}), []string{op.ID}) &&
			len(storetest.ListIDs(t, a, state.Filter{Status: commands.StatusPending})) == 0 &&
			errors.Is(err, state.ErrNotFound) && st.ByStatus[commands.StatusExecuting] == 1
	}, "a sees b's update and delete")

	// Four writers increment one operation's attempts through both
	// stores at once: every lost race is ErrStale, and no increment is lost.
	storetest.Increments(t, op.ID, 20, a, b, a, b)
}

// TestKVRestart: a store opened on a restarted bus rebuilds its indexes
// from the bucket before NewKV returns.
func TestKVRestart(t *testing.T) {
	dir := t.TempDir()
	bucket := nextBucket()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := time.Now().Add(time.Second)
	ops := []commands.Operation{
		storetest.Op(1, commands.OpCreate, commands.StatusCompleted, "vol-1", "", time.Now()),
		storetest.Op(2, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now().Add(time.Millisecond)),
		storetest.Op(3, commands.OpAttach, commands.StatusPending, "vol-2", "vm-1", time.Now().Add(2*time.Millisecond)),
	}
	ops[0].CompletedAt = &done

	bus1 := testenv.StartBusIn(t, dir)
	s1 := newKV(t, bus1.JetStream(), bucket)
	for _, op := range ops {
		if _, err := s1.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []commands.Mapping{storetest.Mapping("vol-1", "vm-1", "/dev/vdb"), storetest.Mapping("vol-2", "vm-1", "/dev/vdc")} {
		if _, err := s1.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := s1.DeleteMapping(ctx, "vol-2", 0); err != nil {
		t.Fatal(err)
	}
	want, err := s1.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := bus1.Close(ctx); err != nil {
		t.Fatal(err)
	}

	s2 := newKV(t, testenv.StartBusIn(t, dir).JetStream(), bucket)
	if got := storetest.ListIDs(t, s2, state.Filter{VMID: "vm-1", Type: commands.OpAttach}); !slices.Equal(got, []string{ops[2].ID, ops[1].ID}) {
		t.Fatalf("after restart, vm-1 attaches = %v", got)
	}
	got, err := s2.Stats(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got.Total != want.Total || got.Terminal != 1 || got.TerminalDuration != want.TerminalDuration ||
		got.ByStatus[commands.StatusPending] != 2 {
		t.Fatalf("after restart stats %+v, before %+v", got, want)
	}
	if m, err := s2.GetMappingByDevice(ctx, "vm-1", "/dev/vdb"); err != nil || m.VolumeID != "vol-1" {
		t.Fatalf("after restart /dev/vdb: %+v, %v", m, err)
	}
	if _, err := s2.GetMappingByDevice(ctx, "vm-1", "/dev/vdc"); !errors.Is(err, state.ErrNotFound) {
		t.Fatalf("after restart the deleted mapping's device: %v", err)
	}
}

// TestKVUnavailable: with the NATS connection gone, every method that
// reaches the server wraps ErrUnavailable. That includes the reads from
// memory: they first ask the bucket how far it is, so as never to answer
// from a state older than what was recorded.
func TestKVUnavailable(t *testing.T) {
	bus := testenv.StartBus(t)
	s := newKV(t, bus.JetStream(), nextBucket())
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	op, err := s.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	if err := bus.Close(ctx); err != nil {
		t.Fatal(err)
	}
	inMemory := map[string]bool{"PruneOperations": true} // nothing to prune: no call
	for _, call := range storetest.Calls(op) {
		err := call.Fn(ctx, s)
		if inMemory[call.Name] {
			if err != nil && !errors.Is(err, state.ErrNotFound) {
				t.Errorf("%s from memory: %v", call.Name, err)
			}
			continue
		}
		if !errors.Is(err, state.ErrUnavailable) {
			t.Errorf("%s: %v, want ErrUnavailable", call.Name, err)
		}
	}
	if _, err := state.NewKV(ctx, bus.JetStream(), state.KVConfig{}); !errors.Is(err, state.ErrUnavailable) {
		t.Fatalf("NewKV on a closed connection: %v", err)
	}
}

func BenchmarkKV(b *testing.B) {
	bus := testenv.StartBus(b)
	storetest.Bench(b, func(t testing.TB) state.Store { return newKV(t, bus.JetStream(), nextBucket()) })
}

// BenchmarkKVMemory measures the heap of this process (the store's
// indexes and the embedded NATS server holding the bucket) per 100k
// operations, and after pruning them.
func BenchmarkKVMemory(b *testing.B) {
	bus := testenv.StartBus(b)
	s := newKV(b, bus.JetStream(), nextBucket())
	storetest.MeasureMemory(b, s, func() int64 {
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return int64(ms.HeapAlloc)
	})
}

// TestKVUpgradesOldBucket: a bucket made before per-key TTLs and device
// claims (by an older volumed) is updated in place: its records stay,
// leases work on it, and its mappings' devices are claimed.
func TestKVUpgradesOldBucket(t *testing.T) {
	bus := testenv.StartBus(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	bucket := nextBucket()
	old, err := bus.JetStream().CreateKeyValue(ctx, jetstream.KeyValueConfig{Bucket: bucket, History: 1, Storage: jetstream.FileStorage})
	if err != nil {
		t.Fatal(err)
	}
	// Earlier releases turned direct gets off on the bucket's stream.
	stream, err := bus.JetStream().Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	scfg := stream.CachedInfo().Config
	scfg.AllowDirect = false
	if _, err := bus.JetStream().UpdateStream(ctx, scfg); err != nil {
		t.Fatal(err)
	}
	op := storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now())
	data, _ := json.Marshal(op)
	rev, err := old.Put(ctx, "op."+op.ID, data)
	if err != nil {
		t.Fatal(err)
	}
	data, _ = json.Marshal(storetest.Mapping("vol-1", "vm-1", "/dev/vdb"))
	if _, err := old.Put(ctx, "map.vol-1", data); err != nil {
		t.Fatal(err)
	}
	s := newKV(t, bus.JetStream(), bucket)
	if info, err := stream.Info(ctx); err != nil || !info.Config.AllowDirect {
		t.Fatalf("one replica, direct gets: %v, %v; want on", err, info.Config.AllowDirect)
	}
	got, err := s.GetOperation(ctx, op.ID)
	if err != nil || got.Revision != rev {
		t.Fatalf("old record: %+v, %v; want revision %d", got, err, rev)
	}
	got.Status = commands.StatusExecuting
	if _, err := s.UpdateOperation(ctx, got); err != nil {
		t.Fatal(err)
	}
	l, err := s.AcquireLease(ctx, "reconcile", "a", time.Minute)
	if err != nil {
		t.Fatalf("lease on an upgraded bucket: %v", err)
	}
	if _, err := s.PutMapping(ctx, storetest.Mapping("vol-2", "vm-1", "/dev/vdb")); !errors.Is(err, state.ErrConflict) {
		t.Fatalf("a device an old mapping holds, taken: %v", err)
	}
	// An older volumed deletes the mapping the old way, leaving its claim:
	// the device is free all the same.
	if err := old.Purge(ctx, "map.vol-1"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.PutMapping(ctx, storetest.Mapping("vol-2", "vm-1", "/dev/vdb")); err != nil {
		t.Fatalf("a device whose claim no mapping backs: %v", err)
	}
	if _, err := s.RenewLease(ctx, l); err != nil {
		t.Fatal(err)
	}
}

// TestKVSharedBucketPruneAndLeases: what one store prunes leaves the other
// store's indexes and counters too, a lease taken through one is held
// against the other, and a store opened afterwards loads nothing pruned.
func TestKVSharedBucketPruneAndLeases(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	done := time.Now().Add(-time.Hour)
	for i := range 10 {
		status := commands.StatusCompleted
		if i%2 == 1 {
			status = commands.StatusPending
		}
		op := storetest.Op(i+1, commands.OpAttach, status, "vol-1", "vm-1", done.Add(-time.Minute))
		if status == commands.StatusCompleted {
			op.CompletedAt = &done
		}
		if _, err := a.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	testenv.Eventually(t, 30*time.Second, func() bool { return len(storetest.ListIDs(t, b, state.Filter{})) == 10 }, "b sees the 10 operations")
	if n, err := b.PruneOperations(ctx, time.Now(), 0); err != nil || n != 5 {
		t.Fatalf("prune through b: %d, %v", n, err)
	}
	testenv.Eventually(t, 30*time.Second, func() bool {
		st, _ := a.Stats(ctx)
		return len(storetest.ListIDs(t, a, state.Filter{})) == 5 && len(storetest.ListIDs(t, a, state.Filter{Status: commands.StatusCompleted})) == 0 &&
			st.Total == 5 && st.Terminal == 0
	}, "a's indexes and counters drop what b pruned")
	if n, err := a.PruneOperations(ctx, time.Now(), 0); err != nil || n != 0 {
		t.Fatalf("prune again through a: %d, %v", n, err)
	}
	c := newKV(t, bus.JetStream(), bucket)
	if got := storetest.ListIDs(t, c, state.Filter{}); len(got) != 5 {
		t.Fatalf("a store opened after the prune lists %v", got)
	}

	l, err := a.AcquireLease(ctx, "reconcile", "a", time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.AcquireLease(ctx, "reconcile", "b", time.Minute); !errors.Is(err, state.ErrLeaseHeld) {
		t.Fatalf("b takes a's lease: %v", err)
	}
	if _, err := b.RenewLease(ctx, state.Lease{Name: "reconcile", Holder: "b", Token: l.Token - 1, TTL: time.Minute}); !errors.Is(err, state.ErrLeaseLost) {
		t.Fatalf("b renews with a made-up token: %v", err)
	}
	if err := a.ReleaseLease(ctx, l); err != nil {
		t.Fatal(err)
	}
	if _, err := b.AcquireLease(ctx, "reconcile", "b", time.Minute); err != nil {
		t.Fatalf("b after a released: %v", err)
	}
}

// TestKVReadYourWritesUnderChurn: each store sees its own creates, updates
// and deletes at once, whatever its watcher delivers later, and neither
// store keeps or brings back anything once the churn ends, although each
// watcher delivers the other's writes and its own after the fact.
func TestKVReadYourWritesUnderChurn(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	for w, s := range []*state.KV{a, b} {
		wg.Go(func() {
			for i := range 100 {
				vol := fmt.Sprintf("vol-%d-%d", w, i)
				op, err := s.CreateOperation(ctx, storetest.Op(w*1000+i, commands.OpDetach, commands.StatusPending, vol, "", time.Now()))
				if err != nil {
					t.Error(err)
					return
				}
				op.Status = commands.StatusExecuting
				if op, err = s.UpdateOperation(ctx, op); err != nil {
					t.Error(err)
					return
				}
				if got := storetest.ListIDs(t, s, state.Filter{VolumeID: vol, Status: commands.StatusExecuting}); len(got) != 1 {
					t.Errorf("store %d does not list its update of %s: %v", w, op.ID, got)
				}
				if err := s.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
					t.Error(err)
					return
				}
				if got := storetest.ListIDs(t, s, state.Filter{VolumeID: vol}); len(got) != 0 {
					t.Errorf("store %d lists its deleted %s: %v", w, op.ID, got)
				}
			}
		})
	}
	wg.Wait()
	for i, s := range []*state.KV{a, b} {
		testenv.Eventually(t, 30*time.Second, func() bool {
			st, _ := s.Stats(ctx)
			return len(storetest.ListIDs(t, s, state.Filter{})) == 0 && st.Total == 0
		}, "store %d empty after the churn", i)
	}
	if got := storetest.ListIDs(t, newKV(t, bus.JetStream(), bucket), state.Filter{}); len(got) != 0 {
		t.Fatalf("a new store loads %v", got)
	}
}

// TestKVDeviceConflictAcrossStores: two stores on one bucket race to map
// different volumes onto one device of a VM; each time exactly one wins,
// the other is refused (ErrConflict, or ErrStale when it lost the race
// for the claim itself), and no device ever has two volumes.
func TestKVDeviceConflictAcrossStores(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for round := range 20 {
		dev := fmt.Sprintf("/dev/vd%c", 'b'+round)
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for i, s := range []*state.KV{a, b} {
			wg.Go(func() {
				_, errs[i] = s.PutMapping(ctx, storetest.Mapping(fmt.Sprintf("vol-%d-%d", round, i), "vm-1", dev))
			})
		}
		wg.Wait()
		won := 0
		for i, err := range errs {
			switch {
			case err == nil:
				won++
			case !errors.Is(err, state.ErrConflict) && !errors.Is(err, state.ErrStale):
				t.Fatalf("round %d store %d: %v", round, i, err)
			}
		}
		if won != 1 {
			t.Fatalf("round %d: %d stores mapped %s (%v)", round, won, dev, errs)
		}
		testenv.Eventually(t, 30*time.Second, func() bool {
			ma, erra := a.GetMappingByDevice(ctx, "vm-1", dev)
			mb, errb := b.GetMappingByDevice(ctx, "vm-1", dev)
			all, _ := a.ListMappings(ctx, "vm-1")
			n := 0
			for _, m := range all {
				if m.DevicePath == dev {
					n++
				}
			}
			return erra == nil && errb == nil && ma.VolumeID == mb.VolumeID && n == 1
		}, "round %d: both stores agree on the one volume of %s", round, dev)
	}
	// A freed device can be taken through the other store at once.
	m, err := a.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
	if err != nil {
		t.Fatal(err)
	}
	if err := a.DeleteMapping(ctx, m.VolumeID, m.Revision); err != nil {
		t.Fatal(err)
	}
	if _, err := b.PutMapping(ctx, storetest.Mapping("vol-new", "vm-1", "/dev/vdb")); err != nil {
		t.Fatalf("take a freed device through the other store: %v", err)
	}
}

// TestKVListsSeeOtherWriters: a list on one process reflects every write
// another process sharing the bucket committed before it, at once, with
// no waiting for the watcher (an export ended on one instance must not
// still be listed, and served, by the instance that syncs it).
func TestKVListsSeeOtherWriters(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for i := range 50 {
		vol := fmt.Sprintf("vol-%d", i)
		e, err := a.PutExport(ctx, commands.Export{VolumeID: vol, VMID: "vm-1", ExportName: "e-" + vol})
		if err != nil {
			t.Fatal(err)
		}
		if got, err := b.ListExports(ctx); err != nil || !slices.ContainsFunc(got, func(x commands.Export) bool { return x.VolumeID == vol }) {
			t.Fatalf("b's list right after a's put of %s: %v %v", vol, got, err)
		}
		if err := a.DeleteExport(ctx, vol, e.Revision); err != nil {
			t.Fatal(err)
		}
		if got, err := b.ListExports(ctx); err != nil || len(got) != 0 {
			t.Fatalf("b's list right after a's delete of %s: %v %v", vol, got, err)
		}
		op, err := a.CreateOperation(ctx, storetest.Op(i+1, commands.OpDetach, commands.StatusPending, vol, "", time.Now()))
		if err != nil {
			t.Fatal(err)
		}
		if ids := storetest.ListIDs(t, b, state.Filter{VolumeID: vol}); !slices.Equal(ids, []string{op.ID}) {
			t.Fatalf("b's list right after a's create of %s: %v", op.ID, ids)
		}
	}
}

// TestKVReadsNoWildcard: an id that would make a wildcard subject (a read
// by key is a message get of the key's subject) reads nothing, however
// many records the bucket holds.
func TestKVReadsNoWildcard(t *testing.T) {
	b := testenv.StartBus(t)
	s := newKV(t, b.JetStream(), nextBucket())
	ctx := context.Background()
	if _, err := s.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now())); err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{">", "*", "op-1.>", "", "a..b", ".a", "a b"} {
		if op, err := s.GetOperation(ctx, id); err == nil || op.ID != "" {
			t.Errorf("GetOperation(%q) = %+v, %v; want an error and no record", id, op, err)
		}
	}
	if _, err := s.GetMapping(ctx, ">"); err == nil {
		t.Error("GetMapping(\">\"): no error")
	}
}

// TestKVReadsAfterDirectGetsOff: another instance turns the bucket's
// direct gets off (it started with more replicas); a store that read
// with them reads from the leader, the record as it is.
func TestKVReadsAfterDirectGetsOff(t *testing.T) {
	b := testenv.StartBus(t)
	bucket := nextBucket()
	s := newKV(t, b.JetStream(), bucket)
	ctx := context.Background()
	op, err := s.CreateOperation(ctx, storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	stream, err := b.JetStream().Stream(ctx, "KV_"+bucket)
	if err != nil {
		t.Fatal(err)
	}
	scfg := stream.CachedInfo().Config
	if !scfg.AllowDirect {
		t.Fatal("one replica: direct gets off")
	}
	scfg.AllowDirect = false
	if _, err := b.JetStream().UpdateStream(ctx, scfg); err != nil {
		t.Fatal(err)
	}
	got, err := s.GetOperation(ctx, op.ID)
	if err != nil || got.Revision != op.Revision {
		t.Fatalf("read after direct gets went off: %+v, %v; want revision %d", got, err, op.Revision)
	}
}

// TestKVListing: a listing walked page by page returns every matching
// operation once when a page's records are left out, and while
// operations change status (storetest.RunListing).
func TestKVListing(t *testing.T) {
	b := testenv.StartBus(t)
	var bucket string // the subtests' store, one at a time
	storetest.RunListing(t, func(t testing.TB) state.Store {
		bucket = nextBucket()
		return newKV(t, b.JetStream(), bucket)
	}, func(s state.Store, fn func()) { state.SetListGap(s.(*state.KV), fn) }, spoilKV(t, b.JetStream(), &bucket))
}

// spoilKV overwrites a record of the bucket *bucket behind its store's
// back.
func spoilKV(t testing.TB, js jetstream.JetStream, bucket *string) storetest.Spoil {
	return func(ctx context.Context, kind, id string, raw []byte) {
		kv, err := js.KeyValue(ctx, *bucket)
		if err != nil {
			t.Fatal(err)
		}
		prefix := map[string]string{"mapping": "map.", "export": "export.", "operation": "op."}[kind]
		if _, err := kv.Put(ctx, prefix+id, raw); err != nil {
			t.Fatal(err)
		}
	}
}

// TestKVCorrupt: a record damaged behind the store's back (a manual put,
// a command reply published on its key) is ErrCorrupt, skipped by the
// index, and replaced by a compare-and-swap on its revision.
func TestKVCorrupt(t *testing.T) {
	b := testenv.StartBus(t)
	var bucket string // the subtests' store, one at a time
	storetest.RunCorrupt(t, func(t testing.TB) state.Store {
		bucket = nextBucket()
		return newKV(t, b.JetStream(), bucket)
	}, spoilKV(t, b.JetStream(), &bucket))
}
