package state

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"reflect"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
)

// TestKVNewBases: a store whose start read every record into the heap
// writes it as a base on disk once ready, and a new base whenever its
// delta grows past deltaMin, while it serves; its listings and counts
// stay those of a store without a cache, and a restart loads the last
// base.
func TestKVNewBases(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	old := deltaMin
	deltaMin = 8
	t.Cleanup(func() { deltaMin = old })
	js := testenv.StartBus(t).JetStream()
	plain, err := NewKV(ctx, js, KVConfig{Bucket: "bases"})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close(ctx)
	n := 0
	create := func(s *KV, count int) {
		t.Helper()
		for range count {
			n++
			vm := fmt.Sprintf("vm-%d", n%3)
			op := commands.Operation{ID: fmt.Sprintf("op-%d", n), Type: commands.OpTypes[n%len(commands.OpTypes)],
				Status: commands.StatusPending, VolumeID: fmt.Sprintf("vol-%d", n%5), VMID: &vm, Request: json.RawMessage(`{}`),
				CreatedAt: time.Now(), UpdatedAt: time.Now()}
			if _, err := s.CreateOperation(ctx, op); err != nil {
				t.Fatal(err)
			}
		}
	}
	create(plain, 40)
	path := filepath.Join(t.TempDir(), "state-index.cache")
	// The start reads 40 records, past deltaMin: New returns, then the
	// base is written.
	k, err := NewKV(ctx, js, KVConfig{Bucket: "bases", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	based := func(want int) {
		t.Helper()
		for {
			k.mu.RLock()
			b, d := k.ops.base, len(k.ops.delta.slots)-len(k.ops.delta.free)
			k.mu.RUnlock()
			if b != nil && b.n >= want && d <= deltaMin {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("no base of %d operations", want)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	same := func() {
		t.Helper()
		if err := plain.caughtUp(ctx); err != nil {
			t.Fatal(err)
		}
		for _, f := range []Filter{{}, {VMID: "vm-1"}, {Type: commands.OpAttach}, {VolumeID: "vol-2", Limit: 3}} {
			g, gnext, gerr := k.ListOperations(ctx, f)
			w, wnext, werr := plain.ListOperations(ctx, f)
			if gerr != nil || werr != nil || !reflect.DeepEqual(g, w) || gnext != wnext {
				t.Fatalf("list %+v: %d (%v), want %d (%v)", f, len(g), gerr, len(w), werr)
			}
		}
		gs, _ := k.Stats(ctx)
		ws, _ := plain.Stats(ctx)
		gs.Writes, ws.Writes = 0, 0
		if !reflect.DeepEqual(gs, ws) {
			t.Fatalf("stats %+v, want %+v", gs, ws)
		}
	}
	based(40)
	same()
	// Writes through it and through the other store: a new base each
	// time the delta passes 8.
	create(k, 30)
	create(plain, 30)
	based(90)
	same()
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	k, err = NewKV(ctx, js, KVConfig{Bucket: "bases", IndexCache: path})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	k.mu.RLock()
	loaded := k.ops.base != nil && k.ops.base.n == 100
	k.mu.RUnlock()
	if !loaded {
		t.Fatal("restart did not load the base")
	}
	same()
}
