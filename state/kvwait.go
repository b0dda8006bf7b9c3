package state

import (
	"sync"
)

// OperationEnds is a store that tells, in process, when an operation
// ends: what a wait for an operation's end (GET /operations/{id}?wait)
// follows instead of the operation events. The embedded store does (its
// watcher sees every write to the bucket, by any process); Redis does not.
type OperationEnds interface {
	// WatchEnd follows operation id until Stop: the watch's Done closes
	// once the store sees the operation end (a terminal revision, written
	// by any process) or go (deleted). Only what happens after WatchEnd
	// is seen, so a caller watches first and then reads the record.
	WatchEnd(id string) *EndWatch
}

var _ OperationEnds = (*KV)(nil)

// EndWatch is one watch of KV.WatchEnd.
type EndWatch struct {
	ends *endWatches
	id   string
	done chan struct{}
	// record is the terminal record this process wrote, set before done
	// closes; nil when another process's write or a delete closed it.
	record []byte
}

// Done closes when the store has seen the operation end or go.
func (w *EndWatch) Done() <-chan struct{} { return w.done }

// Record is, once Done has closed, the operation's terminal record as
// this process wrote it: the JSON of the commands.Operation the store
// encoded, the latest revision when its compare-and-swap succeeded (and a
// completed or cancelled operation never changes again). nil when the end
// was written by another process, or the record deleted: then the caller
// reads the record from the store, which gives the latest.
func (w *EndWatch) Record() []byte {
	select {
	case <-w.done:
		return w.record
	default:
		return nil
	}
}

// Stop ends the watch; stopping twice is safe.
func (w *EndWatch) Stop() { w.ends.remove(w) }

// endWatches are the watches of a KV, by operation id; the zero value is
// ready.
type endWatches struct {
	mu sync.Mutex
	by map[string][]*EndWatch
}

// WatchEnd follows operation id until Stop (see OperationEnds).
func (k *KV) WatchEnd(id string) *EndWatch {
	w := &EndWatch{ends: &k.ends, id: id, done: make(chan struct{})}
	k.ends.mu.Lock()
	defer k.ends.mu.Unlock()
	if k.ends.by == nil {
		k.ends.by = make(map[string][]*EndWatch)
	}
	k.ends.by[id] = append(k.ends.by[id], w)
	return w
}

// remove drops w; its Done stays as it is.
func (e *endWatches) remove(w *EndWatch) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ws := e.by[w.id]
	for i := range ws {
		if ws[i] == w {
			ws = append(ws[:i], ws[i+1:]...)
			break
		}
	}
	if len(ws) == 0 {
		delete(e.by, w.id)
	} else {
		e.by[w.id] = ws
	}
}

// ended tells the watches of operation id that memory now holds its end:
// a terminal revision, or its delete. own is the terminal record's JSON
// when this process wrote it, else nil. It closes them.
func (e *endWatches) ended(id string, own []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	ws := e.by[id]
	if len(ws) == 0 {
		return
	}
	delete(e.by, id)
	for _, w := range ws {
		w.record = own
		close(w.done)
	}
}
