package state

import (
	"context"
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// How the watcher reads the bucket. Its consumer lives on one member of a
// cluster, chosen by the server; when that member goes (kill -9 of an
// embedded instance), the missing heartbeats are noticed after two of them,
// and the watcher goes on from the next revision on a new consumer, with a
// new name (the library's ordered consumer asks for its lost consumer again
// by name, which hangs for as long as the member the server first chose is
// gone, and the KeyValue watcher's push consumer notices only after 10 to
// 20 s; every read barrier waits that long).
const (
	watchPullExpiry = 5 * time.Second
	watchHeartbeat  = time.Second
	// watchCreateTry bounds making a consumer: one placed on a member that
	// has just gone (the cluster does not know yet) never answers.
	watchCreateTry = 3 * time.Second
	// watchInactive: the server removes a consumer left behind this long.
	watchInactive = time.Minute
)

// kvWatcher follows every key of a KV's bucket, its last revision first and
// then every change in revision order, applying each entry to the KV's
// indexes until stop.
type kvWatcher struct {
	k *KV
	// loaded is closed once the entries the bucket held at the start are
	// applied; initial and received count them (follow's alone).
	loaded            chan struct{}
	initial, received uint64
	isLoaded          bool

	stop chan struct{} // closed by Close
	done chan struct{} // closed when follow returns

	mu      sync.Mutex // guards iter and cons
	iter    jetstream.MessagesContext
	cons    jetstream.Consumer
	stopped bool
}

// startWatch makes the watcher's first consumer and follows the bucket
// from it.
func (k *KV) startWatch(ctx context.Context) (*kvWatcher, error) {
	w := &kvWatcher{k: k, loaded: make(chan struct{}), stop: make(chan struct{}), done: make(chan struct{})}
	cons, err := w.consumer(ctx, 0)
	if err != nil {
		return nil, kvErr("watch bucket", err)
	}
	w.initial = cons.CachedInfo().NumPending
	go w.follow(cons)
	return w, nil
}

// consumer makes a consumer of the bucket: the last revision of every key
// when from is 0, else every revision from from on. Before the initial
// entries are loaded, one with nothing pending means they are.
func (w *kvWatcher) consumer(ctx context.Context, from uint64) (jetstream.Consumer, error) {
	cfg := jetstream.ConsumerConfig{DeliverPolicy: jetstream.DeliverLastPerSubjectPolicy, AckPolicy: jetstream.AckNonePolicy,
		FilterSubject: w.k.subject(">"), Replicas: 1, MemoryStorage: true, InactiveThreshold: watchInactive}
	if from > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, from
	}
	cons, err := w.k.stream.CreateConsumer(ctx, cfg)
	if err != nil {
		return nil, err
	}
	if cons.CachedInfo().NumPending == 0 {
		w.markLoaded()
	}
	return cons, nil
}

func (w *kvWatcher) markLoaded() {
	if !w.isLoaded {
		w.isLoaded = true
		close(w.loaded)
	}
}

// follow reads cons until it fails, then a new consumer from the next
// revision, until stop or the connection closes.
func (w *kvWatcher) follow(cons jetstream.Consumer) {
	defer close(w.done)
	var next uint64 // the next revision to apply; 0 before the first
	for pause := 100 * time.Millisecond; ; {
		if cons == nil {
			select {
			case <-w.stop:
				return
			case <-time.After(pause):
			}
			ctx, cancel := context.WithTimeout(context.Background(), watchCreateTry)
			var err error
			cons, err = w.consumer(ctx, next)
			cancel()
			if errors.Is(err, nats.ErrConnectionClosed) {
				return
			}
			if err != nil {
				w.k.log.Debug("watcher consumer not made", "from", next, "err", err)
				pause = min(2*pause, 2*time.Second)
				continue
			}
			pause = 100 * time.Millisecond
		}
		read, err := w.read(cons, &next)
		if errors.Is(err, nats.ErrConnectionClosed) || errors.Is(err, errWatchStopped) {
			return
		}
		w.k.log.Debug("watcher goes on from a new consumer", "from", next, "read", read, "err", err)
		cons = nil
	}
}

// errWatchStopped ends read when the watcher is stopped.
var errWatchStopped = errors.New("state: kv watcher stopped")

// read applies what cons delivers until it fails: missing heartbeats, a
// gap in its delivery sequence, or its end. next is the revision after the
// last one applied.
func (w *kvWatcher) read(cons jetstream.Consumer, next *uint64) (int, error) {
	iter, err := cons.Messages(jetstream.PullExpiry(watchPullExpiry), jetstream.PullHeartbeat(watchHeartbeat))
	if err != nil {
		return 0, err
	}
	w.mu.Lock()
	if w.stopped {
		w.mu.Unlock()
		iter.Stop()
		return 0, errWatchStopped
	}
	w.iter, w.cons = iter, cons
	w.mu.Unlock()
	defer iter.Stop()
	prefix := w.k.subject("")
	var delivered uint64
	for n := 0; ; n++ {
		msg, err := iter.Next()
		if err != nil {
			select {
			case <-w.stop:
				return n, errWatchStopped
			default:
			}
			return n, err
		}
		meta, err := msg.Metadata()
		if err != nil {
			return n, err
		}
		if meta.Sequence.Consumer != delivered+1 {
			return n, errors.New("state: kv watcher: a delivery was missed")
		}
		delivered = meta.Sequence.Consumer
		w.k.applyEntry(strings.TrimPrefix(msg.Subject(), prefix), meta.Sequence.Stream, msg.Headers(), msg.Data())
		*next = meta.Sequence.Stream + 1
		if !w.isLoaded {
			if w.received++; w.received >= w.initial || meta.NumPending == 0 {
				w.markLoaded()
			}
		}
	}
}

// close stops the watcher, removes its consumer (within ctx) and waits
// for it.
func (w *kvWatcher) close(ctx context.Context) error {
	w.mu.Lock()
	w.stopped = true
	close(w.stop)
	iter, cons := w.iter, w.cons
	w.mu.Unlock()
	if iter != nil {
		iter.Stop()
	}
	select {
	case <-w.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if cons != nil {
		dctx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_ = w.k.js.DeleteConsumer(dctx, cons.CachedInfo().Stream, cons.CachedInfo().Name)
	}
	return nil
}

// applyEntry applies one bucket entry, the message at revision rev on
// key's subject, to the indexes: a put, or a delete (a KV delete or purge,
// or a marker the server left when a key's TTL ran out).
func (k *KV) applyEntry(key string, rev uint64, h nats.Header, data []byte) {
	raw := data
	if h.Get(kvOperationHeader) != "" || h.Get(jetstream.MarkerReasonHeader) != "" {
		raw = nil
	}
	var err error
	switch {
	case strings.HasPrefix(key, kvOpPrefix):
		err = k.applyWatchedOp(strings.TrimPrefix(key, kvOpPrefix), rev, raw)
	case strings.HasPrefix(key, kvMappingPrefix):
		err = k.applyMapping(strings.TrimPrefix(key, kvMappingPrefix), rev, raw, true)
	case strings.HasPrefix(key, kvExportPrefix):
		err = k.applyExport(strings.TrimPrefix(key, kvExportPrefix), rev, raw, true)
	default:
		k.mu.Lock()
		k.seen = max(k.seen, rev)
		k.mu.Unlock()
	}
	if err != nil {
		k.log.Warn("skipping bad record", "key", key, "revision", rev, "err", err)
	}
}
