package retention_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/retention"
	"github.com/volumed/volumed/state"
)

// seed records an operation that ended (or, if status is not terminal,
// began) age ago.
func seed(t *testing.T, s state.Store, i int, status commands.OpStatus, age time.Duration) string {
	t.Helper()
	at := time.Now().UTC().Add(-age)
	op := commands.Operation{ID: fmt.Sprintf("op-00000000-0000-4000-8000-%012d", i), Type: commands.OpCreate,
		Status: status, Request: json.RawMessage(`{}`), CreatedAt: at.Add(-time.Second), UpdatedAt: at}
	if status.Terminal() {
		op.CompletedAt = &at
	}
	if _, err := s.CreateOperation(context.Background(), op); err != nil {
		t.Fatal(err)
	}
	return op.ID
}

func exists(t *testing.T, s state.Store, id string) bool {
	t.Helper()
	_, err := s.GetOperation(context.Background(), id)
	if err != nil && !errors.Is(err, state.ErrNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

// newStore is the embedded store on a bus of its own.
func newStore(t *testing.T) state.Store {
	t.Helper()
	b := testenv.StartBus(t)
	s, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close(context.Background()) })
	return s
}

// TestPrune removes exactly the terminal operations that ended before the
// retention period, across several batches, from the embedded store.
func TestPrune(t *testing.T) {
	s := newStore(t)
	const retain = 24 * time.Hour
	var old, kept []string
	for i := range 250 {
		old = append(old, seed(t, s, i, []commands.OpStatus{commands.StatusCompleted, commands.StatusFailed, commands.StatusCancelled}[i%3], 2*retain))
	}
	kept = append(kept, seed(t, s, 1000, commands.StatusCompleted, retain/2)) // recent
	kept = append(kept, seed(t, s, 1001, commands.StatusPending, 2*retain))   // old, not terminal
	kept = append(kept, seed(t, s, 1002, commands.StatusExecuting, 2*retain)) // old, not terminal
	p, err := retention.New(retention.Config{Store: s, Retention: retain, Batch: 100})
	if err != nil {
		t.Fatal(err)
	}
	n, err := p.Prune(context.Background())
	if err != nil || n != len(old) {
		t.Fatalf("Prune removed %d (%v), want %d", n, err, len(old))
	}
	for _, id := range old {
		if exists(t, s, id) {
			t.Fatalf("%s outlived its retention", id)
		}
	}
	for _, id := range kept {
		if !exists(t, s, id) {
			t.Fatalf("%s was pruned", id)
		}
	}
	st, err := s.Stats(context.Background())
	if err != nil || st.Total != int64(len(kept)) {
		t.Fatalf("stats after prune: %+v %v, want %d operations", st, err, len(kept))
	}
	ops, _, err := s.ListOperations(context.Background(), state.Filter{Status: commands.StatusCompleted})
	if err != nil || len(ops) != 1 {
		t.Fatalf("completed index after prune: %d rows %v, want 1", len(ops), err)
	}
	if n, err := p.Prune(context.Background()); err != nil || n != 0 {
		t.Fatalf("second Prune removed %d (%v), want 0", n, err)
	}
}

// TestPrunerLoop prunes on its timer until closed.
func TestPrunerLoop(t *testing.T) {
	s := newStore(t)
	p, err := retention.New(retention.Config{Store: s, Retention: time.Hour, Interval: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	if err := p.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	id := seed(t, s, 1, commands.StatusCompleted, 2*time.Hour)
	testenv.Eventually(t, 5*time.Second, func() bool { return !exists(t, s, id) }, "old operation pruned by the loop")
	for range 2 {
		if err := p.Close(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	id = seed(t, s, 2, commands.StatusCompleted, 2*time.Hour)
	time.Sleep(100 * time.Millisecond) // five intervals: a pruner still running would remove it
	if !exists(t, s, id) {
		t.Fatal("pruned after Close")
	}
	if _, err := retention.New(retention.Config{Store: s}); err == nil {
		t.Fatal("zero retention accepted")
	}
}
