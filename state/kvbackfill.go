package state

import (
	"context"
	"errors"
	"runtime/debug"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// startBackfill archives in the background (backfill) the terminal
// records of the revisions after the archive's through and up to to, the
// last revision the start took from the bucket or its index cache without
// archiving it (a start without a cache file reading more than
// kvRecentOps records, the first start of an upgrade, a new member, a
// restart whose catch-up did). Without it, each read of one of them would
// be read from the bucket, for which the server loads the whole block
// holding it.
func (k *KV) startBackfill(to uint64) {
	if k.archive == nil {
		return
	}
	from := k.archive.through()
	if from >= to {
		k.backfilled.Store(true)
		return
	}
	k.saver.Go(func() { k.backfill(from, to) })
}

// backfill archives the terminal records of revisions from+1 to to that
// the index holds ended at their revision and the archive misses
// (archiveRange); once through to, it records to as the archive's
// through. Close stops it.
func (k *KV) backfill(from, to uint64) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-k.stop:
			cancel()
		case <-ctx.Done():
		}
	}()
	log := k.log.With("from", from+1, "to", to)
	began := time.Now()
	archived, err := k.archiveRange(ctx, from, to)
	if err != nil {
		if ctx.Err() == nil {
			log.Warn("ended operations not archived: read from the bucket", "err", err)
		}
		return
	}
	if err := k.archive.setThrough(to); err != nil {
		log.Warn("archive's progress not recorded", "err", err)
	}
	k.backfilled.Store(true)
	log.Info("ended operations archived", "operations", archived, "took", time.Since(began).Round(time.Millisecond))
	// The server drops the blocks it loaded for the backfill once they
	// are idle (10 s in nats-server's filestore); the heap they took then
	// goes back to the OS, as the start's does (saveCacheEvery).
	select {
	case <-k.stop:
	case <-time.After(kvBackfillIdle):
		debug.FreeOSMemory()
	}
}

// archiveRange archives what backfill does, read from the bucket in
// revision order (each of the server's blocks once) through an ordered
// consumer, which it deletes before it returns; it returns how many it
// archived, or an error if it did not read them all (ctx ended: Close).
// A consumer idle for kvSettleEvery is asked whether it has anything left:
// the last revisions up to to may hold no operation record (another
// key's, or removed), and none after them may come.
func (k *KV) archiveRange(ctx context.Context, from, to uint64) (int, error) {
	stream := k.stream.CachedInfo().Config.Name
	cons, err := k.js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{k.subject(kvOpPrefix + ">")},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy, OptStartSeq: from + 1})
	if err != nil {
		return 0, kvErr("backfill consumer", err)
	}
	// The server keeps an ordered consumer after its iterator stops.
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = k.js.DeleteConsumer(dctx, stream, cons.CachedInfo().Name)
	}()
	it, err := cons.Messages(jetstream.PullMaxMessages(kvLoadBatch))
	if err != nil {
		return 0, kvErr("backfill", err)
	}
	defer it.Stop()
	// When ctx ends, Next returns at once (or, while the ordered consumer
	// makes its consumer again, a server gone, at its next try).
	defer context.AfterFunc(ctx, it.Stop)()
	prefix := k.subject(kvOpPrefix)
	archived := 0
	// The consumer and delivery of the last message read: the server's
	// consumer has delivered nothing more when its info says so.
	var lastCons string
	var lastDelivered uint64
	for {
		msg, err := it.Next(jetstream.NextMaxWait(kvSettleEvery))
		if errors.Is(err, nats.ErrTimeout) && ctx.Err() == nil {
			// No operation record may be left up to to (the last
			// revisions another key's, or removed): none is pending.
			if drained(ctx, cons, lastCons, lastDelivered) {
				return archived, nil
			}
			continue
		}
		if err != nil {
			return archived, kvErr("backfill", errors.Join(ctx.Err(), err))
		}
		meta, err := msg.Metadata()
		if err != nil {
			continue
		}
		lastCons, lastDelivered = meta.Consumer, meta.Sequence.Consumer
		rev := meta.Sequence.Stream
		if rev > to {
			return archived, nil
		}
		if id := strings.TrimPrefix(msg.Subject(), prefix); !isDelete(msg.Headers()) && k.heldEnded(id) == rev {
			if completed, ok := completedOf(id, msg.Data()); ok {
				k.archive.put(id, rev, completed, msg.Data(), true)
				archived++
			}
		}
		if rev == to || meta.NumPending == 0 {
			return archived, nil
		}
	}
}

// drained reports whether the ordered consumer cons has no message left
// to deliver and delivered none after the last one read, delivery seq of
// consumer name (none: ""); after a failure it delivers from the next
// revision on a consumer it makes again.
func drained(ctx context.Context, cons jetstream.Consumer, name string, seq uint64) bool {
	ctx, cancel := context.WithTimeout(ctx, kvCacheInfoWait)
	defer cancel()
	info, err := cons.Info(ctx)
	if err != nil || info.NumPending > 0 {
		return false
	}
	if info.Name != name {
		seq = 0
	}
	return info.Delivered.Consumer == seq
}

// kvBackfillIdle is how long after the backfill its heap is returned to
// the OS: past the server's idle time for a loaded block.
const kvBackfillIdle = 15 * time.Second

// completedOf returns the completion (opScore) of raw, the terminal
// record of operation id, read as the watcher reads it.
func completedOf(id string, raw []byte) (int64, bool) {
	var sc scannedOp
	if scanIndexed(raw, &sc) && len(sc.typ) > 0 && len(sc.status) > 0 {
		return sc.fields().completed, true
	}
	var o kvIndexed
	if decode(kvOpPrefix+id, "", raw, &o) != nil {
		return 0, false
	}
	op := o.operation(id)
	return fieldsOf(&op).completed, true
}
