package devagent

import (
	"sync"

	"github.com/volumed/volumed/commands"
)

// Subscribe returns a channel of every add, remove and change from now on,
// in order, and a cancel func that ends the subscription and closes the
// channel (safe to call twice). A slow reader never blocks the agent: its
// events queue up. Close ends every subscription. Call Subscribe before
// Devices to miss nothing in between.
func (a *Agent) Subscribe() (<-chan commands.Device, func()) {
	s := &subscription{
		ch:      make(chan commands.Device),
		wake:    make(chan struct{}, 1),
		done:    make(chan struct{}),
		stopped: make(chan struct{}),
	}
	go s.run()
	a.mu.Lock()
	if a.closed {
		a.mu.Unlock()
		s.stop()
		return s.ch, s.stop
	}
	a.subs[s] = struct{}{}
	a.mu.Unlock()
	return s.ch, func() {
		a.mu.Lock()
		delete(a.subs, s)
		a.mu.Unlock()
		s.stop()
	}
}

// subscription forwards queued events to ch in its own goroutine.
type subscription struct {
	ch      chan commands.Device
	mu      sync.Mutex
	queue   []commands.Device
	wake    chan struct{}
	done    chan struct{}
	stopped chan struct{}
	once    sync.Once
}

// push queues d for the reader.
func (s *subscription) push(d commands.Device) {
	s.mu.Lock()
	s.queue = append(s.queue, d)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run delivers the queue until stop.
func (s *subscription) run() {
	defer close(s.stopped)
	defer close(s.ch)
	for {
		s.mu.Lock()
		q := s.queue
		s.queue = nil
		s.mu.Unlock()
		for _, d := range q {
			select {
			case s.ch <- d:
			case <-s.done:
				return
			}
		}
		select {
		case <-s.wake:
		case <-s.done:
			return
		}
	}
}

// stop ends run and waits for it; safe to call twice.
func (s *subscription) stop() {
	s.once.Do(func() { close(s.done) })
	<-s.stopped
}
