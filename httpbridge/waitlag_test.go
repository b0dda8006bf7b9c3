package httpbridge_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// TestOperationWaitWatcherLags: the operation ended on
// another instance and the store (the bucket) holds the end; this
// process's watcher lags (its consumer paused: a slow or replaced
// consumer). api.md: "?wait returns as soon as it is terminal": the
// wait reads the record before it waits for memory, and answers.
func TestOperationWaitWatcherLags(t *testing.T) {
	b := testenv.StartBus(t)
	a := newKV(t, b)
	h := newHarnessOnBus(t, b, options{store: a})
	other := newKV(t, b)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	op := h.seedOperation(t, opPending, commands.OpDelete, commands.StatusPending, vol2, "", 34)
	for _, s := range []*state.KV{a, other} { // both watchers have applied the create
		testenv.Eventually(t, 10*time.Second, func() bool {
			_, ok := s.RecentOperation(op.ID)
			return ok
		}, "the store's memory holds the operation")
	}

	// Pause every consumer of the bucket (both watchers lag from now on).
	js := b.JetStream()
	s, err := js.Stream(ctx, "KV_"+state.DefaultKVBucket)
	if err != nil {
		t.Fatal(err)
	}
	names := s.ConsumerNames(ctx)
	for n := range names.Name() {
		if _, err := js.PauseConsumer(ctx, "KV_"+state.DefaultKVBucket, n, time.Now().Add(time.Minute)); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now().UTC()
	op.Status, op.UpdatedAt, op.CompletedAt = commands.StatusCancelled, now, &now
	if _, err := other.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	if got, err := a.GetOperation(ctx, op.ID); err != nil || got.Status != commands.StatusCancelled {
		t.Fatalf("store: %+v %v", got, err)
	}
	// A client that already saw it cancelled (a read, or its event) waits on it.
	type res struct {
		code int
		body []byte
	}
	done := make(chan res, 1)
	go func() {
		resp, body := h.do(t, "GET", "/operations/"+op.ID+"?wait=30s", "")
		done <- res{resp.StatusCode, body}
	}()
	select {
	case r := <-done:
		if r.code != http.StatusOK || decodeAs[commands.Operation](t, r.body).Status != commands.StatusCancelled {
			t.Errorf("answer %d %s", r.code, r.body)
		}
	case <-time.After(20 * time.Second): // well short of the 30 s wait, and long for a loaded CI machine
		t.Errorf("?wait has not answered in 20 s an end the store has held all along: it waits for this process's watcher")
		// Let the watchers go on so the wait ends and the test cleans up.
		for n := range s.ConsumerNames(ctx).Name() {
			_, _ = js.ResumeConsumer(ctx, "KV_"+state.DefaultKVBucket, n)
		}
		<-done
	}
}
