package state

import (
	"context"
	"strings"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/internal/follow"
)

// kvWatcher follows every key of a KV's bucket, its last revision first and
// then every change in revision order, applying each entry to the KV's
// indexes until close. Its reader (package follow) goes on from the next
// revision on a new consumer when the member holding its consumer goes,
// within a few seconds, so a read barrier waits no longer than that.
type kvWatcher struct {
	k *KV
	r *follow.Reader
	// loaded is closed once the entries the bucket held at the start are
	// applied; initial and received count them. All three belong to the
	// reader's goroutine once startWatch returns.
	loaded            chan struct{}
	initial, received uint64
	isLoaded          bool
}

// startWatch makes the watcher's first consumer and follows the bucket
// from it: from every key's last revision when after is 0, from the
// revisions after it otherwise (the index cache reflects those up to it).
func (k *KV) startWatch(ctx context.Context, after uint64) (*kvWatcher, error) {
	w := &kvWatcher{k: k, loaded: make(chan struct{})}
	first := true
	policy, from := jetstream.DeliverLastPerSubjectPolicy, uint64(0)
	if after > 0 {
		policy, from = jetstream.DeliverByStartSequencePolicy, after+1
	}
	r, err := follow.Start(ctx, k.js, follow.Config{Stream: k.stream.CachedInfo().Config.Name,
		FilterSubjects: []string{k.subject(">")}, DeliverPolicy: policy, OptStartSeq: from, Logger: k.log,
		OnConsumer: func(info *jetstream.ConsumerInfo) {
			if first {
				w.initial, first = info.NumPending, false
				if after == 0 { // every record: room for them at once
					k.mu.Lock()
					k.ops.grow(int(info.NumPending))
					k.mu.Unlock()
				}
			}
			// Before the initial entries are loaded, a consumer with
			// nothing pending means they are.
			if info.NumPending == 0 {
				w.markLoaded()
			}
		}}, w.apply)
	if err != nil {
		return nil, kvErr("watch bucket", err)
	}
	w.r = r
	return w, nil
}

func (w *kvWatcher) markLoaded() {
	if !w.isLoaded {
		w.isLoaded = true
		close(w.loaded)
	}
}

// apply applies one entry the reader delivered and counts the initial ones.
func (w *kvWatcher) apply(msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		w.k.log.Warn("skipping bad record", "subject", msg.Subject(), "err", err)
		return
	}
	w.k.applyEntry(strings.TrimPrefix(msg.Subject(), w.k.subject("")), meta.Sequence.Stream, msg.Headers(), msg.Data())
	w.k.seenAt.Store(meta.Timestamp.UnixNano())
	if !w.isLoaded {
		if w.received++; w.received >= w.initial || meta.NumPending == 0 {
			w.markLoaded()
		}
	}
}

// applyEntry applies one bucket entry, the message at revision rev on
// key's subject, to the indexes: a put, or a delete (a KV delete or purge,
// or a marker the server left when a key's TTL ran out).
func (k *KV) applyEntry(key string, rev uint64, h nats.Header, data []byte) {
	raw := data
	if isDelete(h) {
		raw = nil
	}
	var apply func(raw []byte) error
	switch {
	case strings.HasPrefix(key, kvOpPrefix):
		apply = func(raw []byte) error { return k.applyWatchedOp(strings.TrimPrefix(key, kvOpPrefix), rev, raw) }
	case strings.HasPrefix(key, kvMappingPrefix):
		apply = func(raw []byte) error {
			return k.applyMapping(strings.TrimPrefix(key, kvMappingPrefix), rev, raw, true)
		}
	case strings.HasPrefix(key, kvExportPrefix):
		apply = func(raw []byte) error { return k.applyExport(strings.TrimPrefix(key, kvExportPrefix), rev, raw, true) }
	default:
		k.mu.Lock()
		k.seen = max(k.seen, rev)
		k.mu.Unlock()
		return
	}
	if err := apply(raw); err != nil {
		// A record that does not decode is applied as a delete: the
		// index then holds for its key what a start reading every record
		// (and the index cache) would, nothing, and the watcher is past
		// its revision, which read barriers wait for.
		k.log.Warn("skipping bad record", "key", key, "revision", rev, "err", err)
		_ = apply(nil)
	}
}
