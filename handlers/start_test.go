package handlers_test

import (
	"context"
	"encoding/json"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/engine"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// sweepDownStore is the real store refusing the sweep's lease while down,
// as a bucket without a quorum does (ErrUnavailable).
type sweepDownStore struct {
	state.Store
	down atomic.Bool
	took atomic.Int32 // sweep leases taken
}

func (f *sweepDownStore) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (state.Lease, error) {
	if name == engine.LeaseSweep && f.down.Load() {
		return state.Lease{}, fmt.Errorf("injected: %w", state.ErrUnavailable)
	}
	l, err := f.Store.AcquireLease(ctx, name, holder, ttl)
	if name == engine.LeaseSweep && err == nil {
		f.took.Add(1)
	}
	return l, err
}

// TestStartWhileSweepFails: the service starts while its first sweep
// fails (a member restarting into a cluster that has no quorum yet), and
// the periodic sweep queues, once the store answers, the job of an
// operation recorded without one.
func TestStartWhileSweepFails(t *testing.T) {
	f := &sweepDownStore{}
	f.down.Store(true)
	h := newHarness(t, harnessOpts{cfg: handlers.Config{AckWait: time.Second},
		wrap: func(s state.Store) state.Store { f.Store = s; return f }})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	at := time.Now().UTC()
	op, err := h.store.CreateOperation(ctx, commands.Operation{ID: "op-jobless", Type: commands.OpDetach,
		Status: commands.StatusPending, VolumeID: "vol-jobless", Request: json.RawMessage(`{"volume_id":"vol-jobless"}`),
		CreatedAt: at, UpdatedAt: at})
	if err != nil {
		t.Fatal(err)
	}
	f.down.Store(false)
	testenv.Eventually(t, 30*time.Second, func() bool {
		got, err := h.store.GetOperation(ctx, op.ID)
		return err == nil && got.Status.Terminal()
	}, "the operation recorded without a job run after a periodic sweep")
	if f.took.Load() == 0 {
		t.Fatal("no sweep lease taken")
	}
}
