package state

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"strings"
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
	smallDelta(t)
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
			// A new base is due past deltaMin or an eighth of the
			// base: up to that many may be left in the delta.
			k.mu.RLock()
			b, d, full := k.ops.base, k.ops.pending(), k.ops.full()
			k.mu.RUnlock()
			if b != nil && b.n >= want-max(deltaMin, want/8) && !full {
				return
			}
			select {
			case <-ctx.Done():
				n := 0
				if b != nil {
					n = b.n
				}
				t.Fatalf("no base of %d operations: base %d, delta %d", want, n, d)
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
	loaded := k.ops.base != nil && k.ops.len() == 100
	k.mu.RUnlock()
	if !loaded {
		t.Fatal("restart did not load the base")
	}
	same()
}

// TestKVFailedBaseWaitsForTick: a new base that cannot be written (its
// temporary file is a directory, as a full disk fails it) is tried again
// at the next tick, not at each change while the delta stays full.
func TestKVFailedBaseWaitsForTick(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	smallDelta(t)
	js := testenv.StartBus(t).JetStream()
	path := filepath.Join(t.TempDir(), "state-index.cache")
	if err := os.Mkdir(path+".tmp", 0o700); err != nil {
		t.Fatal(err)
	}
	logs := &testenv.Buffer{}
	k, err := NewKV(ctx, js, KVConfig{Bucket: "unwritable", IndexCache: path, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	for n := range 30 {
		op := commands.Operation{ID: fmt.Sprintf("op-%d", n), Type: commands.OpAttach, Status: commands.StatusPending,
			VolumeID: "vol-1", Request: json.RawMessage(`{}`), CreatedAt: time.Now(), UpdatedAt: time.Now()}
		if _, err := k.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
		// The writer takes each request before the next change.
		for len(k.compact) > 0 {
			select {
			case <-ctx.Done():
				t.Fatal("the request for a new base was never taken")
			case <-time.After(time.Millisecond):
			}
		}
	}
	if err := k.Close(ctx); err != nil {
		t.Fatal(err)
	}
	// The first request's write and Close's.
	if got := strings.Count(logs.String(), "index cache not written"); got != 2 {
		t.Fatalf("%d failed writes, want 2:\n%s", got, logs)
	}
}

// TestKVDeletionsCompact: deletions (the prune's) leave dead slots in
// the base, which every walk of it still reads; past deltaMin of them a
// new base is written without them.
func TestKVDeletionsCompact(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	smallDelta(t)
	js := testenv.StartBus(t).JetStream()
	k, err := NewKV(ctx, js, KVConfig{Bucket: "deletions", IndexCache: filepath.Join(t.TempDir(), "state-index.cache")})
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close(ctx)
	for n := range 40 {
		op := commands.Operation{ID: fmt.Sprintf("op-%d", n), Type: commands.OpAttach, Status: commands.StatusCompleted,
			VolumeID: "vol-1", Request: json.RawMessage(`{}`), CreatedAt: time.Now(), UpdatedAt: time.Now()}
		if _, err := k.CreateOperation(ctx, op); err != nil {
			t.Fatal(err)
		}
	}
	// until polls until the base holds at most n slots and the delta at
	// most deltaMin.
	until := func(n int) {
		t.Helper()
		for {
			k.mu.RLock()
			b, d := k.ops.base, k.ops.pending()
			k.mu.RUnlock()
			if b != nil && b.n <= n && d <= deltaMin {
				return
			}
			select {
			case <-ctx.Done():
				t.Fatalf("no base of at most %d operations", n)
			case <-time.After(10 * time.Millisecond):
			}
		}
	}
	until(40)
	ops, _, err := k.ListOperations(ctx, Filter{Limit: 20})
	if err != nil || len(ops) != 20 {
		t.Fatalf("list: %d, %v", len(ops), err)
	}
	for _, op := range ops {
		if err := k.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
			t.Fatal(err)
		}
	}
	// 20 live, and at most deltaMin dead.
	until(20 + deltaMin)
	if s, err := k.Stats(ctx); err != nil || s.Total != 20 {
		t.Fatalf("stats: %+v, %v", s, err)
	}
}
