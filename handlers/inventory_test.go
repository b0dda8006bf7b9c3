package handlers

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// fakeList is a list of ids that can be changed, slowed and broken.
type fakeList struct {
	mu    sync.Mutex
	ids   []string
	err   error
	delay time.Duration
	calls atomic.Int64
}

func (f *fakeList) list(ctx context.Context) ([]string, error) {
	f.calls.Add(1)
	f.mu.Lock()
	ids, err, delay := append([]string(nil), f.ids...), f.err, f.delay
	f.mu.Unlock()
	select {
	case <-time.After(delay):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return ids, err
}

func (f *fakeList) set(ids []string, err error, delay time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ids, f.err, f.delay = ids, err, delay
}

func TestEntitySetLookup(t *testing.T) {
	svc, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait() }()
	f := &fakeList{ids: []string{"a"}, delay: 20 * time.Millisecond}
	set := newEntitySet("test", slog.New(slog.NewTextHandler(io.Discard, nil)), f.list)
	ask := func(id string, budget time.Duration) lookup {
		ctx, cancel := context.WithTimeout(context.Background(), budget)
		defer cancel()
		return set.lookup(ctx, svc, &wg, id)
	}

	// Concurrent misses on an empty cache share one refresh.
	var answers [20]lookup
	var asked sync.WaitGroup
	for i := range answers {
		asked.Go(func() { answers[i] = ask("b", time.Second) })
	}
	asked.Wait()
	for i, a := range answers {
		if a != absent {
			t.Fatalf("answer %d: %v, want absent", i, a)
		}
	}
	if n := f.calls.Load(); n != 1 {
		t.Fatalf("%d refreshes for concurrent misses, want 1", n)
	}
	if ask("a", time.Second) != present || f.calls.Load() != 1 {
		t.Fatal("a listed id not answered from the cache")
	}
	// A miss within the gap is answered by the fresh list.
	if ask("c", time.Second) != absent || f.calls.Load() != 1 {
		t.Fatalf("a miss just after a refresh asked again (%d refreshes)", f.calls.Load())
	}
	// Past the gap, a miss refreshes and finds a new entity.
	f.set([]string{"a", "c"}, nil, 0)
	set.mu.Lock()
	set.loaded = set.loaded.Add(-2 * inventoryMissGap)
	set.mu.Unlock()
	if ask("c", time.Second) != present || f.calls.Load() != 2 {
		t.Fatalf("a new entity not found by the refresh on a miss (%d refreshes)", f.calls.Load())
	}
	// CloudStack failing or too slow for the budget: unsure, and a slow
	// refresh still completes for the next question.
	age := func() {
		set.mu.Lock()
		set.loaded = set.loaded.Add(-2 * inventoryMissGap)
		set.mu.Unlock()
	}
	age()
	f.set([]string{"a", "c"}, errors.New("cloudstack down"), 0)
	if got := ask("d", time.Second); got != unsure {
		t.Fatalf("lookup while the list fails: %v, want unsure", got)
	}
	f.set([]string{"a", "c", "d"}, nil, 300*time.Millisecond)
	start := time.Now()
	if got := ask("d", 50*time.Millisecond); got != unsure || time.Since(start) > 250*time.Millisecond {
		t.Fatalf("lookup with a slow list: %v after %v, want unsure within the budget", got, time.Since(start))
	}
	if got := ask("d", 2*time.Second); got != present {
		t.Fatalf("lookup after the slow refresh: %v, want present", got)
	}
}
