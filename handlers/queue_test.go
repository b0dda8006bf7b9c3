package handlers

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
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

// newQueueService is newTestService with its jobs stream opened.
func newQueueService(t testing.TB) *Service {
	t.Helper()
	s := newTestService(t)
	var err error
	if s.jobs, err = s.cfg.JetStream.Stream(context.Background(), bus.StreamJobs); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestSweepRequeuesALostJob: a job lost from the stream within the dedup
// window (its operation id already seen) is queued again by the sweep,
// once; a queued job is left alone.
func TestSweepRequeuesALostJob(t *testing.T) {
	s := newQueueService(t)
	ctx := context.Background()
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

// TestTurnWaitsForTheCreate: a job on a volume waits while the create that
// made it has not ended; once the create is seen ended (by the turn, or by
// its end's event on this instance), the store is not asked again.
func TestTurnWaitsForTheCreate(t *testing.T) {
	s := newQueueService(t)
	ctx := context.Background()
	now := time.Now().UTC()
	record := func(id string, typ commands.OpType, volumeID string) commands.Operation {
		t.Helper()
		op, err := s.cfg.Store.CreateOperation(ctx, commands.Operation{ID: id, Type: typ, Status: commands.StatusPending,
			VolumeID: volumeID, Request: []byte(`{}`), CreatedAt: now, UpdatedAt: now})
		if err != nil {
			t.Fatal(err)
		}
		return op
	}
	end := func(op commands.Operation) {
		t.Helper()
		op.Status = commands.StatusExecuting
		op, err := s.cfg.Store.UpdateOperation(ctx, op)
		if err == nil {
			done := time.Now().UTC()
			op.Status, op.CompletedAt = commands.StatusCompleted, &done
			_, err = s.cfg.Store.UpdateOperation(ctx, op)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	create := record("op-create-1", commands.OpCreate, "v-1")
	attach := record("op-attach-1", commands.OpAttach, "v-1")
	if wait, why := s.turn(ctx, 1, attach); !wait || !strings.Contains(why, create.ID) {
		t.Fatalf("turn with the create unfinished: %v %q, want a wait for %s", wait, why, create.ID)
	}
	if s.createsEnded.has("v-1") {
		t.Fatal("an unfinished create is remembered as ended")
	}
	end(create)
	if wait, why := s.turn(ctx, 1, attach); wait {
		t.Fatalf("turn with the create ended: waits (%s)", why)
	}
	if !s.createsEnded.has("v-1") {
		t.Fatal("the create's end is not remembered")
	}
	// A create whose end this instance published is not asked about: the
	// store still shows this one unfinished.
	record("op-create-2", commands.OpCreate, "v-2")
	unasked := record("op-attach-2", commands.OpAttach, "v-2")
	s.createsEnded.noteEnded(commands.Operation{ID: "op-create-2", Type: commands.OpCreate, Status: commands.StatusCompleted, VolumeID: "v-2"})
	if wait, why := s.turn(ctx, 1, unasked); wait {
		t.Fatalf("turn after the create's end was published: waits (%s)", why)
	}
}

func TestEndedCreatesBounded(t *testing.T) {
	var e endedCreates
	for i := range endedCreatesKept + 1 {
		e.add(fmt.Sprintf("v-%d", i))
	}
	e.add("v-1") // already held: not added twice
	if e.has("v-0") || !e.has("v-1") || !e.has(fmt.Sprintf("v-%d", endedCreatesKept)) || len(e.set) != endedCreatesKept {
		t.Fatalf("after %d volumes: v-0 %v, v-1 %v, last %v, %d held", endedCreatesKept+1, e.has("v-0"), e.has("v-1"),
			e.has(fmt.Sprintf("v-%d", endedCreatesKept)), len(e.set))
	}
	for _, op := range []commands.Operation{
		{Type: commands.OpCreate, Status: commands.StatusExecuting, VolumeID: "v-running"},
		{Type: commands.OpCreate, Status: commands.StatusFailed},
		{Type: commands.OpAttach, Status: commands.StatusCompleted, VolumeID: "v-attached"},
	} {
		e.noteEnded(op)
	}
	if e.has("v-running") || e.has("v-attached") || len(e.set) != endedCreatesKept {
		t.Fatal("noteEnded remembered what is not a create's end naming its volume")
	}
}

// inFlightOnce answers the first publish with JetStream's "duplicate
// message id is in process" (10158) without storing it, as when an earlier
// attempt with the same id is still being stored and may yet fail.
type inFlightOnce struct {
	jetstream.JetStream
	answered bool
}

func (j *inFlightOnce) PublishMsg(ctx context.Context, m *nats.Msg, opts ...jetstream.PublishOpt) (*jetstream.PubAck, error) {
	if !j.answered {
		j.answered = true
		return nil, &jetstream.APIError{Code: 409, ErrorCode: errDuplicateInFlight, Description: "duplicate message id is in process"}
	}
	return j.JetStream.PublishMsg(ctx, m, opts...)
}

// TestBatchInFlightSentAgain: a batch whose message id JetStream says is
// still being stored is sent again until it is stored (or a duplicate),
// not taken for stored: the job of an operation on several volumes is
// queued.
func TestBatchInFlightSentAgain(t *testing.T) {
	s := newQueueService(t)
	js := &inFlightOnce{JetStream: s.cfg.JetStream}
	s.cfg.JetStream = js
	ctx := context.Background()
	op := commands.Operation{ID: "op-two", Type: commands.OpDetach, VolumeID: "v-1", VolumeIDs: []string{"v-1", "v-2"}}
	seq, kept, err := s.publishJob(ctx, op, op.ID)
	if err != nil || !kept || !js.answered {
		t.Fatalf("publish: seq %d kept %v err %v (10158 answered: %v), want stored", seq, kept, err, js.answered)
	}
	for _, subject := range []string{jobSubject(op), lineSubject("v-2", op.ID)} {
		if _, err := s.jobs.GetMsg(ctx, 1, jetstream.WithGetMsgSubject(subject)); err != nil {
			t.Errorf("%s: %v, want queued", subject, err)
		}
	}
}
