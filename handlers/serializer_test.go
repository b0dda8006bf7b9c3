package handlers

import (
	"sync"
	"testing"
	"time"
)

// TestSerializerOrder runs work on a few keys and requires that, per key,
// the holders run one at a time in the order they enqueued, while
// different keys overlap.
func TestSerializerOrder(t *testing.T) {
	s := newSerializer()
	const perKey = 20
	keys := []string{"a", "b", "c"}
	var mu sync.Mutex
	order := map[string][]int{}
	running := map[string]int{}
	overlap := false
	active := 0
	var wg sync.WaitGroup
	for i := range perKey {
		for _, k := range keys {
			wait, done := s.enqueue(k)
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer done()
				<-wait
				mu.Lock()
				running[k]++
				active++
				if running[k] > 1 {
					t.Errorf("key %s: two holders at once", k)
				}
				if active > 1 {
					overlap = true
				}
				order[k] = append(order[k], i)
				mu.Unlock()
				time.Sleep(time.Millisecond)
				mu.Lock()
				running[k]--
				active--
				mu.Unlock()
			}()
		}
	}
	wg.Wait()
	for _, k := range keys {
		for i, v := range order[k] {
			if v != i {
				t.Fatalf("key %s ran out of order: %v", k, order[k])
			}
		}
	}
	if !overlap {
		t.Error("different keys never ran concurrently")
	}
	if len(s.tails) != 0 {
		t.Errorf("serializer kept %d finished keys", len(s.tails))
	}
}

func TestSerializerDoneTwice(t *testing.T) {
	s := newSerializer()
	_, done := s.enqueue("k")
	done()
	done()
	wait, done2 := s.enqueue("k")
	select {
	case <-wait:
	case <-time.After(time.Second):
		t.Fatal("next holder blocked after the previous one finished")
	}
	done2()
}
