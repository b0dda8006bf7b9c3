package backoff_test

import (
	"context"
	"testing"
	"time"

	"github.com/volumed/volumed/internal/backoff"
)

func TestDelays(t *testing.T) {
	p := backoff.Policy{Min: 10 * time.Millisecond, Max: 100 * time.Millisecond}
	tm := p.Start()
	want := []time.Duration{10, 20, 40, 80, 100, 100}
	for i, w := range want {
		if got := tm.Next(); got != w*time.Millisecond {
			t.Fatalf("delay %d: %v, want %v", i, got, w*time.Millisecond)
		}
	}
	tm.Reset()
	if got := tm.Next(); got != p.Min {
		t.Fatalf("after reset: %v, want %v", got, p.Min)
	}
	for n, w := range map[int]time.Duration{0: 10, 1: 20, 3: 80, 4: 100, 60: 100} {
		if got := p.Delay(n); got != w*time.Millisecond {
			t.Errorf("Delay(%d) = %v, want %v", n, got, w*time.Millisecond)
		}
	}
}

func TestSleepEndsWithContext(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if backoff.Sleep(ctx, time.Hour) {
		t.Fatal("Sleep of an ended context reported a full sleep")
	}
	if !backoff.Sleep(context.Background(), time.Millisecond) {
		t.Fatal("Sleep did not report a full sleep")
	}
	tm := backoff.Policy{Min: time.Millisecond, Max: time.Millisecond}.Start()
	start := time.Now()
	if !tm.Wait(context.Background(), 30*time.Millisecond) || time.Since(start) < 30*time.Millisecond {
		t.Fatal("Wait did not honour atLeast")
	}
}
