package handlers

import "sync"

// serializer runs work on one key one at a time, in the order the work was
// enqueued; different keys run concurrently.
type serializer struct {
	mu    sync.Mutex
	tails map[string]chan struct{}
}

func newSerializer() *serializer { return &serializer{tails: map[string]chan struct{}{}} }

// enqueue takes a place in key's line. The returned channel closes when
// every earlier holder of key is done; done must be called exactly once
// when this holder is finished.
func (s *serializer) enqueue(key string) (wait <-chan struct{}, done func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	prev, ok := s.tails[key]
	if !ok {
		closed := make(chan struct{})
		close(closed)
		prev = closed
	}
	mine := make(chan struct{})
	s.tails[key] = mine
	var once sync.Once
	return prev, func() {
		once.Do(func() {
			s.mu.Lock()
			if s.tails[key] == mine {
				delete(s.tails, key)
			}
			s.mu.Unlock()
			close(mine)
		})
	}
}
