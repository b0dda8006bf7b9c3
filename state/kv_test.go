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
	ops, err := s.ListOperations(context.Background(), f)
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
// watchers, and concurrent updates of one operation retry on the
// revision race instead of failing.
func TestKVSharedBucket(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	op := storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now())
	if err := a.CreateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if err := a.PutMapping(ctx, storetest.Mapping("vol-1", "vm-1", "/dev/vdb")); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, func() bool {
		m, err := b.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		return slices.Equal(listed(t, b, state.Filter{VMID: "vm-1", Status: commands.StatusPending}), []string{op.ID}) &&
			err == nil && m.VolumeID == "vol-1"
	}, "b sees a's operation and mapping")
	if err := b.CreateOperation(ctx, op); !errors.Is(err, state.ErrExists) {
		t.Fatalf("b creates a's operation: %v", err)
	}
	if err := b.PutMapping(ctx, storetest.Mapping("vol-2", "vm-1", "/dev/vdb")); !errors.Is(err, state.ErrConflict) {
		t.Fatalf("b takes a's device: %v", err)
	}

	op.Status = commands.StatusExecuting
	if err := b.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteMapping(ctx, "vol-1"); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 5*time.Second, func() bool {
		_, err := a.GetMappingByDevice(ctx, "vm-1", "/dev/vdb")
		st, _ := a.Stats(ctx)
		return slices.Equal(listed(t, a, state.Filter{Status: commands.StatusExecuting}), []string{op.ID}) &&
			len(listed(t, a, state.Filter{Status: commands.StatusPending})) == 0 &&
			errors.Is(err, state.ErrNotFound) && st.ByStatus[commands.StatusExecuting] == 1
	}, "a sees b's update and delete")

	// Both update the same operation at once: each store's revision goes
	// stale under the other's writes, and the retries absorb it.
	var wg sync.WaitGroup
	for i, s := range []*state.KV{a, b, a, b} {
		wg.Go(func() {
			next := op
			for n := range 20 {
				next.Attempts = i*100 + n
				if err := s.UpdateOperation(ctx, next); err != nil {
					t.Errorf("writer %d update %d: %v", i, n, err)
					return
				}
			}
		})
	}
	wg.Wait()
	got, err := a.GetOperation(ctx, op.ID)
	if err != nil || got.Attempts%100 != 19 {
		t.Fatalf("after the race: attempts %d, %v; want some writer's last", got.Attempts, err)
	}
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
		if err := s1.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []commands.Mapping{storetest.Mapping("vol-1", "vm-1", "/dev/vdb"), storetest.Mapping("vol-2", "vm-1", "/dev/vdc")} {
		if err := s1.PutMapping(ctx, m); err != nil {
			t.Fatal(err)
		}
	}
	if err := s1.DeleteMapping(ctx, "vol-2"); err != nil {
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
	op := storetest.Op(1, commands.OpAttach, commands.StatusPending, "vol-1", "vm-1", time.Now())
	if err := s.CreateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if err := bus.Close(ctx); err != nil {
		t.Fatal(err)
	}
	inMemory := map[string]bool{"ListOperations": true, "Stats": true, "GetMappingByDevice": true, "ListMappings": true}
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
