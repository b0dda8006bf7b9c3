package state_test

import (
	"context"
	"reflect"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/stores/storetest"
)

// TestKVRecentOperation: memory answers an operation as the store reads
// it, at the revision this process wrote or its watcher saw last, and
// nothing once it is deleted or for an unknown id.
func TestKVRecentOperation(t *testing.T) {
	bus := testenv.StartBus(t)
	bucket := nextBucket()
	a, b := newKV(t, bus.JetStream(), bucket), newKV(t, bus.JetStream(), bucket)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	op, err := a.CreateOperation(ctx, storetest.Op(1, commands.OpDetach, commands.StatusPending, "vol-1", "", time.Now()))
	if err != nil {
		t.Fatal(err)
	}
	same := func(label string) {
		t.Helper()
		want, err := a.GetOperation(ctx, op.ID)
		if err != nil {
			t.Fatal(err)
		}
		got, ok := a.RecentOperation(op.ID)
		if !ok || !reflect.DeepEqual(got, want) {
			t.Fatalf("%s: memory has %+v (%v), the store %+v", label, got, ok, want)
		}
	}
	same("own create")
	op.Status, op.Step = commands.StatusExecuting, "detach:submitted"
	if op, err = b.UpdateOperation(ctx, op); err != nil {
		t.Fatal(err)
	}
	testenv.Eventually(t, 10*time.Second, func() bool {
		got, ok := a.RecentOperation(op.ID)
		return ok && got.Revision == op.Revision
	}, "memory sees the other process's update")
	same("another process's update")
	if _, ok := a.RecentOperation(storetest.ID(2)); ok {
		t.Error("memory answers an unknown id")
	}
	if err := a.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
		t.Fatal(err)
	}
	if got, ok := a.RecentOperation(op.ID); ok {
		t.Errorf("memory answers a deleted operation: %+v", got)
	}
}
