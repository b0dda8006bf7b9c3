package nbd

import "sync"

// budget bounds the bytes of request buffers held at once: at most
// perConn by one connection, and at most total by all of them, except that
// a connection holding nothing may always take one buffer (its floor), so
// clients that never read their replies cannot stop the others. The bound
// on buffer memory is therefore total + MaxConns × chunkSize.
type budget struct {
	mu      sync.Mutex
	cond    *sync.Cond
	used    int64 // bytes held beyond the floors
	total   int64
	perConn int64
}

// connBudget is one connection's share; guarded by budget.mu.
type connBudget struct {
	used   int64 // bytes held, the floor included
	closed bool
}

// grant is bytes taken by acquire; floor ones are not in budget.used.
type grant struct {
	n     int64
	floor bool
}

// newBudget returns a budget of total bytes, perConn per connection.
func newBudget(total, perConn int64) *budget {
	b := &budget{total: total, perConn: perConn}
	b.cond = sync.NewCond(&b.mu)
	return b
}

// acquire waits until cb may hold n more bytes and takes them; ok is
// false when the connection was closed meanwhile. n is at most chunkSize.
func (b *budget) acquire(cb *connBudget, n int64) (g grant, ok bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for {
		switch {
		case cb.closed:
			return grant{}, false
		case cb.used+n <= b.perConn && b.used+n <= b.total:
			cb.used += n
			b.used += n
			return grant{n: n}, true
		case cb.used == 0:
			cb.used = n
			return grant{n: n, floor: true}, true
		}
		b.cond.Wait()
	}
}

// release returns a grant from acquire.
func (b *budget) release(cb *connBudget, g grant) {
	if g.n == 0 {
		return
	}
	b.mu.Lock()
	cb.used -= g.n
	if !g.floor {
		b.used -= g.n
	}
	b.mu.Unlock()
	b.cond.Broadcast()
}

// close wakes a connection waiting in acquire, which then returns false.
func (b *budget) close(cb *connBudget) {
	b.mu.Lock()
	cb.closed = true
	b.mu.Unlock()
	b.cond.Broadcast()
}
