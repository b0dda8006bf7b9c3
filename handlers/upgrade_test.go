package handlers_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/bus"
	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/handlers"
	"github.com/volumed/volumed/internal/testenv"
	"github.com/volumed/volumed/state"
)

// quorumLosingJS is a JetStream client after whose first stream info the
// members lose shuts down: the cluster loses its quorum between the
// requests of the caller.
type quorumLosingJS struct {
	jetstream.JetStream
	once sync.Once
	lose func()
}

func (j *quorumLosingJS) Stream(ctx context.Context, name string) (jetstream.Stream, error) {
	s, err := j.JetStream.Stream(ctx, name)
	if err == nil {
		j.once.Do(j.lose)
	}
	return s, err
}

// TestRelineJobsWaitsForQuorum: a member restarting while the two others
// do too (a three-member cluster, the jobs stream's leader among those
// lost) reads, relines and deletes the jobs of before lines once they are
// back, as the rest of start-up waits, instead of failing at start.
func TestRelineJobsWaitsForQuorum(t *testing.T) {
	const n = 3
	c, _ := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
	setup := bus.New(bus.Config{URL: c.Srvs[0].ClientURL(), Replicas: n, Logger: log})
	if err := setup.Start(ctx); err != nil {
		t.Fatal(err)
	}
	_ = setup.Close(ctx) // the streams are made
	// The member that stays leads neither the cluster nor the jobs stream.
	survivor := c.AnyBystander(bus.StreamJobs)
	_, js := c.Connect(survivor)
	store, err := state.NewKV(ctx, js, state.KVConfig{Replicas: n, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = store.Close(context.Background()) })
	// Jobs queued as before lines: two of recorded operations, one whose
	// operation is not recorded (left where it is).
	var ops []commands.Operation
	for _, vol := range []string{"vol-a", "vol-b"} {
		op, err := store.CreateOperation(ctx, commands.Operation{ID: "op-" + vol, Type: commands.OpDetach,
			Status: commands.StatusPending, VolumeID: vol})
		if err != nil {
			t.Fatal(err)
		}
		ops = append(ops, op)
	}
	for _, id := range []string{ops[0].ID, "op-unrecorded", ops[1].ID} {
		if _, err := js.Publish(ctx, bus.JobsSubjectPrefix+id, fmt.Appendf(nil, `{"operation_id":%q}`, id)); err != nil {
			t.Fatal(err)
		}
	}

	lost := make(chan struct{})
	wrapped := &quorumLosingJS{JetStream: js, lose: func() {
		c.StopAllBut(survivor)
		close(lost)
	}}
	var out testenv.Buffer
	debug := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	done := make(chan error, 1)
	go func() { done <- handlers.RelineJobs(context.Background(), wrapped, store, debug) }()
	<-lost
	// It asks again while the members are down; then they come back.
	c.OutlastOutage(survivor, &out, done)

	// A stream leader just elected can answer a read with what it held
	// before the last writes for a moment: the queue is polled.
	polled := time.Now()
	for diff := relined(ctx, js, ops); diff != ""; diff = relined(ctx, js, ops) {
		if time.Since(polled) > 10*time.Second {
			t.Fatal(diff)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// relined says how the jobs stream differs from ops' jobs on their lines
// and the unrecorded operation's where it was, each once: "" when it
// does not.
func relined(ctx context.Context, js jetstream.JetStream, ops []commands.Operation) string {
	stream, err := js.Stream(ctx, bus.StreamJobs)
	if err != nil {
		return err.Error()
	}
	for _, tc := range []struct{ subject, id string }{
		{bus.JobsSubjectPrefix + "vol-a." + ops[0].ID, ops[0].ID},
		{bus.JobsSubjectPrefix + "vol-b." + ops[1].ID, ops[1].ID},
		{bus.JobsSubjectPrefix + "op-unrecorded", "op-unrecorded"},
	} {
		msg, err := stream.GetLastMsgForSubject(ctx, tc.subject)
		if err != nil {
			return fmt.Sprintf("job of %s on %s: %v", tc.id, tc.subject, err)
		}
		if want := fmt.Sprintf(`{"operation_id":%q}`, tc.id); string(msg.Data) != want {
			return fmt.Sprintf("job on %s = %s, want %s", tc.subject, msg.Data, want)
		}
	}
	for _, op := range ops {
		if _, err := stream.GetLastMsgForSubject(ctx, bus.JobsSubjectPrefix+op.ID); !errors.Is(err, jetstream.ErrMsgNotFound) {
			return fmt.Sprintf("the job of %s before lines is still there: %v", op.ID, err)
		}
	}
	if n := stream.CachedInfo().State.Msgs; n != 3 {
		return fmt.Sprintf("%d jobs queued, want 3 (no copies)", n)
	}
	return ""
}
