package handlers_test

import (
	"context"
	"encoding/json"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// behindMemory is the embedded store whose memory is behind for the
// operations in stale: it answers their stale record.
type behindMemory struct {
	*state.KV
	mu    sync.Mutex
	stale map[string]commands.Operation
	asked atomic.Int64
}

var _ state.RecentOperations = (*behindMemory)(nil)

func (s *behindMemory) RecentOperation(id string) (commands.Operation, bool) {
	s.asked.Add(1)
	s.mu.Lock()
	op, ok := s.stale[id]
	s.mu.Unlock()
	if ok {
		return op, true
	}
	return s.KV.RecentOperation(id)
}

// TestJobOnMemoryBehind: a job's first delivery reads its operation from
// the store's memory; memory behind the store never has an operation run
// twice or wrongly. An end memory has not seen ends the job without a
// CloudStack change (the claim finds the record moved and reads it), and
// a claim by another executor memory has not seen is taken over on the
// redelivery, which reads the store.
func TestJobOnMemoryBehind(t *testing.T) {
	mem := &behindMemory{stale: map[string]commands.Operation{}}
	h := newHarness(t, harnessOpts{cfg: handlers.Config{AckWait: time.Second},
		wrap: func(s state.Store) state.Store { mem.KV = s.(*state.KV); return mem }})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	js := h.bus.JetStream()
	// queue records a detach of vol written as it is now (the store), with
	// memory holding it as first recorded, and queues its job.
	queue := func(t *testing.T, vol string, now func(commands.Operation) commands.Operation) commands.Operation {
		t.Helper()
		at := time.Now().UTC()
		op, err := h.store.CreateOperation(ctx, commands.Operation{ID: "op-" + uuid.NewString(), Type: commands.OpDetach,
			Status: commands.StatusPending, VolumeID: vol, Request: json.RawMessage(`{"volume_id":"` + vol + `"}`),
			CreatedAt: at, UpdatedAt: at})
		if err != nil {
			t.Fatal(err)
		}
		mem.mu.Lock()
		mem.stale[op.ID] = op
		mem.mu.Unlock()
		if op, err = h.store.UpdateOperation(ctx, now(op)); err != nil {
			t.Fatal(err)
		}
		data, _ := json.Marshal(map[string]string{"operation_id": op.ID})
		if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+vol+"."+op.ID, data); err != nil {
			t.Fatal(err)
		}
		return op
	}
	queueEmpty := func() bool {
		s, err := js.Stream(ctx, bus.StreamJobs)
		return err == nil && s.CachedInfo().State.Msgs == 0
	}

	t.Run("an end memory has not seen", func(t *testing.T) {
		vol := h.createVolume("behind-end")
		asked := mem.asked.Load()
		op := queue(t, vol, func(op commands.Operation) commands.Operation {
			now := time.Now().UTC()
			op.Status, op.UpdatedAt, op.CompletedAt = commands.StatusCancelled, now, &now
			return op
		})
		testenv.Eventually(t, 30*time.Second, queueEmpty, "the job of the cancelled %s acked", op.ID)
		if mem.asked.Load() == asked {
			t.Fatal("memory was not asked: nothing tested")
		}
		got, err := h.store.GetOperation(ctx, op.ID)
		if err != nil || got.Revision != op.Revision || got.Status != commands.StatusCancelled {
			t.Errorf("record %+v %v, want it as cancelled (revision %d)", got, err, op.Revision)
		}
		if n := h.sim.Stats().Calls["detachVolume"]; n != 0 {
			t.Errorf("%d detachVolume calls for a cancelled operation", n)
		}
	})
	t.Run("a claim memory has not seen", func(t *testing.T) {
		vol := h.createVolume("behind-claim")
		op := queue(t, vol, func(op commands.Operation) commands.Operation {
			op.Status, op.Attempts, op.UpdatedAt = commands.StatusExecuting, 1, time.Now().UTC()
			return op
		})
		testenv.Eventually(t, 30*time.Second, func() bool {
			got, err := h.store.GetOperation(ctx, op.ID)
			return err == nil && got.Status.Terminal()
		}, "the detach claimed by an executor that went: taken over, and ended")
		got, _ := h.store.GetOperation(ctx, op.ID)
		if got.Status != commands.StatusCompleted || got.Attempts != 2 {
			t.Errorf("record %+v, want completed at attempt 2", got)
		}
		testenv.Eventually(t, 30*time.Second, queueEmpty, "the job of %s acked", op.ID)
	})
}
