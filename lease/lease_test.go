package lease_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/lease"
	"github.com/volumed/volumed/state"
	"github.com/volumed/volumed/stores/memstore"
)

// TestLeasedExcludes: two holders of one lease in one process never work
// at once; a caller that does not wait is told the lease is held.
func TestLeasedExcludes(t *testing.T) {
	l := &lease.Leaser{Store: memstore.New(), Holder: lease.Holder(), Log: slog.Default()}
	ctx := context.Background()
	var inside, overlaps, runs atomic.Int32
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			err := l.Leased(ctx, "test", true, func(ctx context.Context) error {
				if inside.Add(1) > 1 {
					overlaps.Add(1)
				}
				time.Sleep(20 * time.Millisecond)
				inside.Add(-1)
				runs.Add(1)
				return nil
			})
			if err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	if overlaps.Load() != 0 || runs.Load() != 4 {
		t.Fatalf("%d overlaps in %d runs, want 0 in 4", overlaps.Load(), runs.Load())
	}
	held := make(chan struct{})
	release := make(chan struct{})
	go l.Leased(ctx, "test", false, func(ctx context.Context) error { close(held); <-release; return nil })
	<-held
	err := l.Leased(ctx, "test", false, func(ctx context.Context) error { return errors.New("ran while held") })
	close(release)
	if !errors.Is(err, state.ErrLeaseHeld) {
		t.Fatalf("leased without waiting while held: %v, want ErrLeaseHeld", err)
	}
}
