package handlers

import (
	"context"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

func TestJobLines(t *testing.T) {
	for _, tc := range []struct {
		name string
		op   commands.Operation
		line string
	}{
		{"create, volume unknown", commands.Operation{ID: "op-1", Type: commands.OpCreate}, "op-1"},
		{"create that knows its volume keeps its own line", commands.Operation{ID: "op-1", Type: commands.OpCreate, VolumeID: "v-1"}, "op-1"},
		{"attach waits on its volume", commands.Operation{ID: "op-2", Type: commands.OpAttach, VolumeID: "v-1"}, "v-1"},
		{"export waits on its volume", commands.Operation{ID: "op-3", Type: commands.OpExport, VolumeID: "v-1"}, "v-1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			subject := jobSubject(tc.op)
			if lineOf(tc.op) != tc.line || subject != bus.JobsSubjectPrefix+tc.line+"."+tc.op.ID {
				t.Fatalf("line %q, subject %q, want line %q", lineOf(tc.op), subject, tc.line)
			}
		})
	}
}

func TestTurnDelay(t *testing.T) {
	for delivered, want := range map[uint64]time.Duration{1: 20 * time.Millisecond, 2: 40 * time.Millisecond, 3: 80 * time.Millisecond, 50: 500 * time.Millisecond} {
		if got := turnDelay(delivered); got != want {
			t.Errorf("turnDelay(%d) = %v, want %v", delivered, got, want)
		}
	}
}

// newTestService is a Service on a real embedded bus and KV store, for
// the parts that need no CloudStack.
func newTestService(t testing.TB) *Service {
	t.Helper()
	b := testenv.StartBus(t)
	store, err := state.NewKV(context.Background(), b.JetStream(), state.KVConfig{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close(context.Background()) })
	return New(Config{Conn: b.Conn(), JetStream: b.JetStream(), Store: store, RetryMin: time.Millisecond,
		RetryMax: time.Millisecond, StepTimeout: 30 * time.Second})
}

// TestSweepRequeuesALostJob: a job lost from the stream within the dedup
// window (its operation id already seen) is queued again by the sweep,
// once; a queued job is left alone.
func TestSweepRequeuesALostJob(t *testing.T) {
	s := newTestService(t)
	ctx := context.Background()
	var err error
	if s.jobs, err = s.cfg.JetStream.Stream(ctx, bus.StreamJobs); err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	op, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: "op-lost", Type: commands.OpDetach,
		Status: commands.StatusPending, VolumeID: "v-1", Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.enqueue(ctx, op); err != nil {
		t.Fatal(err)
	}
	if changes, err := s.sweep(ctx); err != nil || len(changes) != 0 {
		t.Fatalf("sweep with the job queued: %v %v, want nothing", changes, err)
	}
	msg, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(jobSubject(op)))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.jobs.DeleteMsg(ctx, msg.Sequence); err != nil {
		t.Fatal(err)
	}
	changes, err := s.sweep(ctx)
	if err != nil || len(changes) != 1 {
		t.Fatalf("sweep after the job was lost: %v %v, want it requeued", changes, err)
	}
	if queued, err := s.jobQueued(ctx, op); err != nil || !queued {
		t.Fatalf("job queued after the sweep: %v %v", queued, err)
	}
	if changes, err := s.sweep(ctx); err != nil || len(changes) != 0 {
		t.Fatalf("second sweep: %v %v, want nothing", changes, err)
	}
}
