package state_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/state/storetest"
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

func listed(t testing.TB, s state.Store, f state.Filter) []string {
	t.Helper()
	ops, _, err := s.ListOperations(context.Background(), f)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, op := range ops {
		out = append(out, op.ID)
	}
	return out
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
	testenv.Eventually(t, 5*time.Second, func() bool {
		m, err := b.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		return slices.Equal(listed(t, b, state.Filter{VMID: "vm-1", Status: commands.StatusPending}), []string{op.ID}) &&
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
	testenv.Eventually(t, 5*time.Second, func() bool {
		_, err := a.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		st, _ := a.Stats(ctx)
		return slices.Equal(listed(t, a, state.Filter{Status: commands.StatusExecuting}), []string{op.ID}) &&
			len(listed(t, a, state.Filter{Status: commands.StatusPending})) == 0 &&
			errors.Is(err, state.ErrNotFound) && st.ByStatus[commands.StatusExecuting] == 1
	}, "a sees b's update and delete")

	// Four writers increment one operation's attempts through both
	// stores at once: every lost race is ErrStale, and no increment is lost.
	var wg sync.WaitGroup
	var stale atomic.Int64
	const writers, each = 4, 20
	for i, s := range []*state.KV{a, b, a, b} {
		wg.Go(func() {
			for n := 0; n < each; {
				cur, err := s.GetOperation(ctx, op.ID)
				if err != nil {
					t.Errorf("writer %d: %v", i, err)
					return
				}
				cur.Attempts++
				_, err = s.UpdateOperation(ctx, cur)
				switch {
				case errors.Is(err, state.ErrStale):
					stale.Add(1)
				case err != nil:
					t.Errorf("writer %d update %d: %v", i, n, err)
					return
				default:
					n++
				}
			}
		})
	}
	wg.Wait()
	got, err := a.GetOperation(ctx, op.ID)
	if err != nil || got.Attempts != writers*each {
		t.Fatalf("after the race: attempts %d, %v; want %d", got.Attempts, err, writers*each)
	}
	t.Logf("%d stale writes refused", stale.Load())
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
	if got := listed(t, s2, state.Filter{VMID: "vm-1", Type: commands.OpAttach}); !slices.Equal(got, []string{ops[2].ID, ops[1].ID}) {
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
// reaches the server wraps ErrUnavailable; the in-memory reads keep
// answering from the last known state.
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
	inMemory := map[string]bool{"ListOperations": true, "Stats": true, "GetMappingByDevice": true, "ListMappings": true,
		"ListExports": true, "PruneOperations": true}
	for _, call := range storeCalls(op) {
		err := call.fn(ctx, s)
		if inMemory[call.name] {
			if err != nil && !errors.Is(err, state.ErrNotFound) {
				t.Errorf("%s from memory: %v", call.name, err)
			}
			continue
		}
		if !errors.Is(err, state.ErrUnavailable) {
			t.Errorf("%s: %v, want ErrUnavailable", call.name, err)
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
