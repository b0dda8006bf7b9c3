package formation_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/formation"
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
