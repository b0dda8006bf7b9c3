// Package backoff is volumed's one exponential backoff: a delay that
// starts at Min and doubles after every failed try up to Max, and a sleep
// that ends early with its context.
package backoff

import (
	"context"
	"time"
)

// Policy bounds the delays between tries: the first is Min, each next
// one doubles, none exceeds Max.
type Policy struct {
	Min, Max time.Duration
}

// Delay is the delay before retry n (0 for the first retry).
func (p Policy) Delay(n int) time.Duration {
	d := p.Min
	for i := 0; i < n && d < p.Max; i++ {
		d *= 2
	}
	return min(d, p.Max)
}

// Timer walks a Policy's delays, one per failed try.
type Timer struct {
	p Policy
	n int
}

// Start returns a Timer at the policy's first delay.
func (p Policy) Start() *Timer { return &Timer{p: p} }

// Next returns the delay before the next try and doubles the one after.
func (t *Timer) Next() time.Duration {
	d := t.p.Delay(t.n)
	if d < t.p.Max {
		t.n++
	}
	return d
}

// Reset goes back to the first delay (a try succeeded).
func (t *Timer) Reset() { t.n = 0 }

// Wait sleeps for the next delay, or for atLeast when that is longer (a
// server's Retry-After), and reports false when ctx ended first.
func (t *Timer) Wait(ctx context.Context, atLeast time.Duration) bool {
	return Sleep(ctx, max(t.Next(), atLeast))
}

// Sleep sleeps for d and reports false when ctx ended first.
func Sleep(ctx context.Context, d time.Duration) bool {
	tm := time.NewTimer(d)
	defer tm.Stop()
	select {
	case <-tm.C:
		return true
	case <-ctx.Done():
		return false
	}
}
