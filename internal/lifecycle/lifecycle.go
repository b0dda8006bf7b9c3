// Package lifecycle holds what components share about stopping: Close
// runs a component's stop once and waits for it within the caller's ctx.
package lifecycle

import (
	"context"
	"sync"
)

// Stopper runs a component's stop function once.
type Stopper struct {
	once sync.Once
	done chan struct{}
}

// Close runs stop the first time it is called, in the background, and
// waits for it to end within ctx: past ctx it returns ctx's error and stop
// goes on. Every later call waits for that same run; none runs stop again.
func (s *Stopper) Close(ctx context.Context, stop func()) error {
	s.once.Do(func() {
		s.done = make(chan struct{})
		go func() {
			defer close(s.done)
			stop()
		}()
	})
	select {
	case <-s.done: // stopped already: nil even if ctx has ended too
		return nil
	default:
	}
	select {
	case <-s.done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
