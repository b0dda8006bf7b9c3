package lifecycle_test

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/lifecycle"
)

// TestStopper: stop runs once whatever the number of Close calls; a Close
// whose ctx ends first returns its error while stop goes on, and a later
// Close waits for that same run.
func TestStopper(t *testing.T) {
	var s lifecycle.Stopper
	var runs atomic.Int32
	release := make(chan struct{})
	stop := func() { runs.Add(1); <-release }
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if err := s.Close(ctx, stop); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Close past its ctx: %v, want DeadlineExceeded", err)
	}
	done := make(chan error, 1)
	go func() { done <- s.Close(context.Background(), stop) }()
	select {
	case err := <-done:
		t.Fatalf("second Close returned %v before stop ended", err)
	case <-time.After(20 * time.Millisecond):
	}
	close(release)
	if err := <-done; err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if err := s.Close(context.Background(), stop); err != nil || runs.Load() != 1 {
		t.Fatalf("third Close: %v; stop ran %d times, want 1", err, runs.Load())
	}
	ended, cancelEnded := context.WithCancel(context.Background())
	cancelEnded()
	for range 100 { // a select between two ready cases would pick at random
		if err := s.Close(ended, stop); err != nil {
			t.Fatalf("Close of a stopped component with an ended ctx: %v", err)
		}
	}
}
