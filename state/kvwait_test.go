package state_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/storetest"
)

// TestKVWatchEnd: a watch of an operation's end closes on a terminal
// revision or a delete, written by this process (with the record as
// written, which a read returns too) or by another sharing the bucket
// (without: the caller reads it), and never on a non-terminal one.
func TestKVWatchEnd(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	closed := func(w *state.EndWatch) bool {
		select {
		case <-w.Done():
			return true
		default:
			return false
		}
	}
	create := func(n int) commands.Operation {
		t.Helper()
		op, err := a.CreateOperation(ctx, storetest.Op(n, commands.OpDetach, commands.StatusPending, "vol-1", "", time.Now()))
		if err != nil {
			t.Fatal(err)
		}
		return op
	}
	update := func(s state.Store, op commands.Operation, status commands.OpStatus) commands.Operation {
		t.Helper()
		op.Status, op.UpdatedAt = status, time.Now().UTC()
		if status.Terminal() {
			op.CompletedAt = &op.UpdatedAt
		}
		op, err := s.UpdateOperation(ctx, op)
		if err != nil {
			t.Fatal(err)
		}
		return op
	}

	t.Run("own end", func(t *testing.T) {
		op := create(1)
		w := a.WatchEnd(op.ID)
		defer w.Stop()
		other := a.WatchEnd(storetest.ID(99))
		defer other.Stop()
		op = update(a, op, commands.StatusExecuting)
		if closed(w) || w.Record() != nil {
			t.Fatal("closed on an executing revision")
		}
		update(a, op, commands.StatusCompleted)
		if !closed(w) {
			t.Fatal("not closed on this process's completed revision")
		}
		if closed(other) {
			t.Fatal("another operation's watch closed")
		}
		got, err := a.GetOperation(ctx, op.ID)
		if err != nil {
			t.Fatal(err)
		}
		// The watcher may deliver the write before the writer applies
		// it: then the watch closes without the record (nil), and a
		// caller reads it. A record given must be the one stored.
		want, _ := json.Marshal(got)
		if rec := w.Record(); rec != nil && string(rec) != string(want) {
			t.Errorf("record %s, the store reads %s", rec, want)
		}
	})
	t.Run("another process's end", func(t *testing.T) {
		op := create(2)
		w := a.WatchEnd(op.ID)
		defer w.Stop()
		update(b, op, commands.StatusFailed)
		select {
		case <-w.Done():
		case <-ctx.Done():
			t.Fatal("not closed on another process's failed revision")
		}
		if w.Record() != nil {
			t.Errorf("record %s of another process's write, want none (read it)", w.Record())
		}
	})
	t.Run("delete", func(t *testing.T) {
		op := create(3)
		w := a.WatchEnd(op.ID)
		defer w.Stop()
		if err := b.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
			t.Fatal(err)
		}
		select {
		case <-w.Done():
		case <-ctx.Done():
			t.Fatal("not closed on a delete")
		}
		if w.Record() != nil {
			t.Errorf("record %s of a deleted operation", w.Record())
		}
	})
	t.Run("stopped", func(t *testing.T) {
		op := create(4)
		w := a.WatchEnd(op.ID)
		w.Stop()
		w.Stop()
		update(a, op, commands.StatusCancelled)
		if closed(w) {
			t.Error("a stopped watch closed")
		}
	})
}
