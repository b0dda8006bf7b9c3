package formation_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/testenv"
)

var errBusy = errors.New("no meta leader")

// TestRetry: attempts go on while their error is retryable, each under
// its own deadline; a final error or the end of ctx stops them with the
// last error.
func TestRetry(t *testing.T) {
	always := func(error) bool { return true }
	calls := 0
	err := formation.Retry(context.Background(), 2*time.Second, always, func(ctx context.Context) error {
		calls++
		if _, ok := ctx.Deadline(); !ok {
			t.Fatal("an attempt without a deadline")
		}
		if calls < 3 {
			return errBusy
		}
		return nil
	})
	if err != nil || calls != 3 {
		t.Fatalf("Retry = %v after %d calls, want nil after 3", err, calls)
	}

	final := errors.New("bad config")
	calls = 0
	err = formation.Retry(context.Background(), time.Second, func(err error) bool { return err == errBusy },
		func(context.Context) error { calls++; return final })
	if !errors.Is(err, final) || calls != 1 {
		t.Fatalf("final error: %v after %d calls", err, calls)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	err = formation.Retry(ctx, time.Second, always, func(context.Context) error { return errBusy })
	if !errors.Is(err, errBusy) || ctx.Err() == nil {
		t.Fatalf("Retry past its ctx = %v (ctx %v)", err, ctx.Err())
	}
}

// TestTransient: the answers of a cluster forming or catching up are
// retried; a refusal and a missing stream are final.
func TestTransient(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"unanswered", fmt.Errorf("consumer: %w", context.DeadlineExceeded), true},
		{"nats timeout", nats.ErrTimeout, true},
		{"no responders", nats.ErrNoResponders, true},
		{"no stream response", jetstream.ErrNoStreamResponse, true},
		{"503", &jetstream.APIError{Code: 503, ErrorCode: 10008, Description: "JetStream system temporarily unavailable"}, true},
		{"no peers", &jetstream.APIError{Code: 500, ErrorCode: 10005, Description: "no suitable peers for placement"}, true},
		{"stream offline", &jetstream.APIError{Code: 500, ErrorCode: 10118, Description: "stream is offline"}, true},
		{"same message id being stored", &jetstream.APIError{Code: 409, ErrorCode: 10158, Description: "duplicate message id is in process"}, true},
		{"stream not found", jetstream.ErrStreamNotFound, false},
		{"stream just made, not found yet", fmt.Errorf("bucket: %w", formation.NotYet(jetstream.ErrStreamNotFound)), true},
		{"bad request", &jetstream.APIError{Code: 400, ErrorCode: 10003, Description: "bad request"}, false},
		{"canceled", context.Canceled, false},
		{"other", errors.New("disk full"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := formation.Transient(tc.err); got != tc.want {
				t.Fatalf("Transient(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}

// TestWaitConsumerOnQuorumLoss: the job consumer's creation, as start-up
// makes it, on a stream two of whose three members are down (restarting)
// goes unanswered; under Wait it is asked again until they are back, and
// made.
func TestWaitConsumerOnQuorumLoss(t *testing.T) {
	const n = 3
	c, js := testenv.StartJSCluster(t, n)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	const stream = "JOBS"
	testenv.Eventually(t, 30*time.Second, func() bool {
		_, err := js.CreateStream(ctx, jetstream.StreamConfig{Name: stream, Subjects: []string{"jobs.>"},
			Retention: jetstream.WorkQueuePolicy, Replicas: n})
		return err == nil
	}, "a stream of %d replicas made", n)
	_, js0 := c.Connect(0)
	for i := 1; i < n; i++ {
		c.Srvs[i].Shutdown()
		c.Srvs[i].WaitForShutdown()
	}
	var out testenv.Buffer
	log := slog.New(slog.NewTextHandler(&out, &slog.HandlerOptions{Level: slog.LevelDebug}))
	made := make(chan error, 1)
	go func() {
		// No deadline, as at volumed's start.
		made <- formation.Wait(context.Background(), log, "consumer", func(ctx context.Context) error {
			_, err := js0.CreateOrUpdateConsumer(ctx, stream, jetstream.ConsumerConfig{Durable: "handlers",
				AckPolicy: jetstream.AckExplicitPolicy, MaxDeliver: -1})
			return err
		})
	}()
	testenv.Eventually(t, 30*time.Second, func() bool {
		return len(testenv.Mentioning(out.Lines(), "jetstream not ready yet")) > 0
	}, "the consumer asked for again while the stream has no quorum")
	for i := 1; i < n; i++ {
		c.Start(i)
	}
	select {
	case err := <-made:
		if err != nil {
			t.Fatalf("consumer once the members are back: %v\n%s", err, out.String())
		}
	case <-ctx.Done():
		t.Fatal("the consumer was never made")
	}
}
