package state

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/follow"
)

// kvWatcher follows every key of a KV's bucket, its last revision first and
// then every change in revision order, applying each entry to the KV's
// indexes until close. Its reader (package follow) goes on from the next
// revision on a new consumer when the member holding its consumer goes,
// within a few seconds, so a read barrier waits no longer than that. A
// start reading every record reads them first through a consumer of its
// own in large batches (load), and the reader goes on from the next
// revision.
type kvWatcher struct {
	k *KV
	r *follow.Reader
	// loaded is closed, and isLoaded set, once the entries the bucket
	// held at the start are applied (markLoaded); initial and received
	// count them, once begun, and belong to the goroutine applying
	// entries (load's handler, then the reader's).
	loaded            chan struct{}
	loadOnce          sync.Once
	isLoaded          atomic.Bool
	initial, received uint64
	begun             bool
	// unarchived is the revision of the last initial entry applied but
	// not archived (not recent).
	unarchived atomic.Uint64
	// all: the start reads every record (no index cache).
	all bool
	// prefix begins the subjects of the bucket's keys.
	prefix string
}

// kvLoadBatch is how many messages load asks the server for at a time.
const kvLoadBatch = 4096

// kvLoadCreate bounds the making of load's consumer; the reader's
// waits for a cluster that is forming.
const kvLoadCreate = 5 * time.Second

// kvSettleEvery is how long the watcher must have applied nothing, while
// it loads the initial entries, before settle asks whether it has them
// all.
const kvSettleEvery = time.Second

// startWatch makes the watcher's first consumer and follows the bucket
// from it: from every key's last revision when after is 0, from the
// revisions after it otherwise (the index cache reflects those up to it).
func (k *KV) startWatch(ctx context.Context, after uint64) (*kvWatcher, error) {
	w := &kvWatcher{k: k, loaded: make(chan struct{}), all: after == 0, prefix: k.subject("")}
	cfg := follow.Config{Stream: k.stream.CachedInfo().Config.Name, FilterSubjects: []string{k.subject(">")},
		DeliverPolicy: jetstream.DeliverLastPerSubjectPolicy, Logger: k.log,
		OnConsumer: func(info *jetstream.ConsumerInfo) {
			w.begin(info.NumPending)
			// Before the initial entries are loaded, a consumer with
			// nothing pending means they are.
			if info.NumPending == 0 {
				w.markLoaded()
			}
		}}
	sctx, stopSettle := context.WithCancel(ctx)
	go w.settle(sctx, stopSettle)
	if after == 0 && k.stream.CachedInfo().State.Msgs > 0 {
		after = w.load(ctx, cfg)
	}
	if after > 0 {
		cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, after+1
	}
	r, err := follow.Start(ctx, k.js, cfg, w.apply)
	if err != nil {
		stopSettle()
		return nil, kvErr("watch bucket", err)
	}
	w.r = r
	return w, nil
}

// begin counts the entries pending on the first consumer as the initial
// ones (with those received before it), and makes room for them when the
// start reads every record; the lists are made at the end (endDeferred).
func (w *kvWatcher) begin(pending uint64) {
	if w.begun {
		return
	}
	w.begun, w.initial = true, w.received+pending
	if w.all {
		w.k.mu.Lock()
		if !w.isLoaded.Load() { // settle may have found every record read
			w.k.ops.delta.grow(int(pending))
			w.k.ops.delta.deferred = true
		}
		w.k.mu.Unlock()
	}
}

// settle marks the initial entries loaded when the watcher has applied
// every record the bucket holds although fewer came than were counted
// at the start: the last of them was removed during the read and nothing
// was written after it (a delete marker whose TTL ran out: the server
// removes it and writes nothing), so no delivery would end the read.
// After each kvSettleEvery in which the watcher applied nothing, it asks
// for the read barrier (caughtUp's) and compares. It returns once loaded
// or when ctx ends (or Close), and then calls cancel.
func (w *kvWatcher) settle(ctx context.Context, cancel context.CancelFunc) {
	defer cancel()
	t := time.NewTicker(kvSettleEvery)
	defer t.Stop()
	var last uint64
	for {
		select {
		case <-w.loaded:
			return
		case <-w.k.stop:
			return
		case <-ctx.Done():
			return
		case <-t.C:
		}
		w.k.mu.RLock()
		seen := w.k.seen
		w.k.mu.RUnlock()
		if seen != last {
			last = seen
			continue
		}
		// Every message the stream holds up to the barrier came in
		// order, none missed (load and the reader check their delivery
		// sequences), so seen at or past it means all are applied.
		bctx, bcancel := context.WithTimeout(ctx, w.k.js.Options().DefaultTimeout)
		target, err := w.k.barrier(bctx)
		bcancel()
		if err == nil && seen >= target {
			w.k.log.Debug("every record read, fewer than counted at the start", "revision", seen)
			w.markLoaded()
		}
	}
}

// load reads the bucket's records into the indexes as the reader would
// (cfg) through a consumer of its own, kvLoadBatch messages a pull, and
// returns the stream sequence of the last message it applied (0: none),
// for the reader to go on from: at the first failure (its cluster member
// gone, ctx done) it stops and leaves the rest to the reader.
func (w *kvWatcher) load(ctx context.Context, cfg follow.Config) uint64 {
	log := w.k.log.With("stream", cfg.Stream)
	cctx, cancel := context.WithTimeout(ctx, kvLoadCreate)
	defer cancel()
	cons, err := w.loadConsumer(cctx, cfg)
	if err != nil {
		log.Debug("records read by the watcher", "err", err)
		return 0
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		_ = w.k.js.DeleteConsumer(dctx, cfg.Stream, cons.CachedInfo().Name)
	}()
	w.begin(cons.CachedInfo().NumPending)
	if w.initial == 0 {
		w.markLoaded()
		return 0
	}
	// The handler runs on the subscription's goroutine, one message at
	// a time, under mu, until ended: it then ignores the rest. Once the
	// read ends, ended is set under mu, so what the handler set is read
	// here after its last call (a stopped consumption's Closed may come
	// before that call returns). The first stop says why the read ends
	// (nil: every record read).
	var (
		mu              sync.Mutex
		last, delivered uint64
		ended           bool
		why             error
	)
	end := make(chan struct{})
	var endOnce sync.Once
	stop := func(err error) {
		endOnce.Do(func() {
			why = err
			close(end)
		})
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		mu.Lock()
		defer mu.Unlock()
		if ended {
			return
		}
		meta, err := msg.Metadata()
		switch {
		case err != nil:
		case meta.Sequence.Consumer != delivered+1:
			err = errors.New("a delivery was missed")
		default:
			delivered = meta.Sequence.Consumer
			w.applyMsg(msg, meta)
			last = meta.Sequence.Stream
			if !w.isLoaded.Load() {
				return
			}
		}
		ended = true
		stop(err)
	}, jetstream.PullMaxMessages(kvLoadBatch), jetstream.PullHeartbeat(time.Second),
		jetstream.ConsumeErrHandler(func(_ jetstream.ConsumeContext, err error) { stop(err) }))
	if err != nil {
		log.Debug("records read by the watcher", "err", err)
		return 0
	}
	defer context.AfterFunc(ctx, func() { stop(ctx.Err()) })()
	select {
	case <-end:
	case <-w.loaded: // by settle: no delivery would end the read
		stop(nil)
	}
	cc.Stop()
	mu.Lock()
	ended = true
	mu.Unlock()
	if why != nil {
		log.Debug("records left to the watcher's reader", "from", last+1, "err", why)
	}
	return last
}

// kvLoadPlaceTries bounds the consumers loadConsumer makes to find one
// on its own server: each lands there one time in three with three
// replicas, so six miss it one time in eleven.
const kvLoadPlaceTries = 6

// loadConsumer makes load's consumer (cfg). With more than one replica
// the cluster places it on any current member holding the stream, most
// often another one: every record would then cross the network between
// the members (and the routes cost both servers CPU). When this
// process's server holds a current copy (it leads the stream, or its
// replica is current and not behind), a consumer placed elsewhere is
// made again, up to kvLoadPlaceTries in all, and the one before deleted;
// the last one made (or, when making it fails, the one before) is kept
// wherever it is. A replica that is behind (a member catching up after
// its restart or a wiped data dir) is not preferred.
func (w *kvWatcher) loadConsumer(ctx context.Context, cfg follow.Config) (jetstream.Consumer, error) {
	ccfg := jetstream.ConsumerConfig{DeliverPolicy: cfg.DeliverPolicy, FilterSubjects: cfg.FilterSubjects,
		AckPolicy: jetstream.AckNonePolicy, Replicas: 1, MemoryStorage: true, InactiveThreshold: time.Minute}
	tries := 1
	local := w.k.js.Conn().ConnectedServerName()
	if w.k.stream.CachedInfo().Config.Replicas > 1 {
		if info, err := w.k.stream.Info(ctx); err == nil && holdsCurrent(info.Cluster, local) {
			tries = kvLoadPlaceTries
		}
	}
	var placed jetstream.Consumer // the last one made, elsewhere
	for try := 1; ; try++ {
		cons, err := w.k.js.CreateConsumer(ctx, cfg.Stream, ccfg)
		if err != nil && placed != nil {
			return placed, nil
		}
		if err != nil {
			return nil, err
		}
		if placed != nil {
			_ = w.k.js.DeleteConsumer(ctx, cfg.Stream, placed.CachedInfo().Name)
		}
		info := cons.CachedInfo()
		if try >= tries || info.Cluster == nil || info.Cluster.Leader == local {
			if info.Cluster != nil {
				w.k.log.Debug("first read's consumer made", "server", info.Cluster.Leader, "tries", try)
			}
			return cons, nil
		}
		placed = cons
	}
}

// holdsCurrent reports whether server leads the stream of cluster c or
// holds a replica of it that is current and not behind.
func holdsCurrent(c *jetstream.ClusterInfo, server string) bool {
	if c == nil || server == "" {
		return false
	}
	if c.Leader == server {
		return true
	}
	for _, p := range c.Replicas {
		if p.Name == server {
			return p.Current && !p.Offline && p.Lag == 0
		}
	}
	return false
}

// markLoaded records that the initial entries are applied, from any
// goroutine, once: the lists deferred by begin are made (under the
// index's lock, as each entry is applied), then loaded is closed.
func (w *kvWatcher) markLoaded() {
	w.loadOnce.Do(func() {
		w.k.mu.Lock()
		w.isLoaded.Store(true)
		w.k.ops.delta.endDeferred()
		w.k.mu.Unlock()
		close(w.loaded)
	})
}

// apply applies one entry the reader delivered.
func (w *kvWatcher) apply(msg jetstream.Msg) {
	meta, err := msg.Metadata()
	if err != nil {
		w.k.log.Warn("skipping bad record", "subject", msg.Subject(), "err", err)
		return
	}
	w.applyMsg(msg, meta)
}

// applyMsg applies one entry and counts the initial ones.
func (w *kvWatcher) applyMsg(msg jetstream.Msg, meta *jetstream.MsgMetadata) {
	// Of the initial entries, only the last ones are kept as recent
	// records: the others would only pass through.
	recent := w.isLoaded.Load() || w.initial-w.received <= kvRecentOps
	w.k.applyEntry(strings.TrimPrefix(msg.Subject(), w.prefix), meta.Sequence.Stream, msg.Headers(), msg.Data(), recent)
	if !recent {
		w.unarchived.Store(meta.Sequence.Stream)
	}
	w.k.seenAt.Store(meta.Timestamp.UnixNano())
	if !w.isLoaded.Load() {
		if w.received++; w.received >= w.initial || meta.NumPending == 0 {
			w.markLoaded()
		}
	}
}

// applyEntry applies one bucket entry, the message at revision rev on
// key's subject, to the indexes: a put, or a delete (a KV delete or purge,
// or a marker the server left when a key's TTL ran out). An operation's
// record is kept as a recent one if recent.
func (k *KV) applyEntry(key string, rev uint64, h nats.Header, data []byte, recent bool) {
	raw := data
	if isDelete(h) {
		raw = nil
	}
	var apply func(raw []byte) error
	var kind, id string
	switch {
	case strings.HasPrefix(key, kvOpPrefix):
		kind, id = "operation", strings.TrimPrefix(key, kvOpPrefix)
		apply = func(raw []byte) error {
			return k.applyWatchedOp(id, rev, raw, recent)
		}
	case strings.HasPrefix(key, kvMappingPrefix):
		kind, id = "mapping", strings.TrimPrefix(key, kvMappingPrefix)
		apply = func(raw []byte) error {
			return k.applyMapping(id, rev, raw, true)
		}
	case strings.HasPrefix(key, kvExportPrefix):
		kind, id = "export", strings.TrimPrefix(key, kvExportPrefix)
		apply = func(raw []byte) error { return k.applyExport(id, rev, raw, true) }
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
		k.mu.Lock()
		k.corrupt[key] = Corrupt{Kind: kind, ID: id, Key: key, Revision: rev, Err: err.Error()}
		k.mu.Unlock()
		return
	}
	k.mu.Lock()
	if c, ok := k.corrupt[key]; ok && c.Revision < rev {
		delete(k.corrupt, key)
	}
	k.mu.Unlock()
}

// CorruptRecords returns the mapping, export and operation records the
// watcher skipped because they are not records of their kind (ErrCorrupt),
// ordered by key; a later revision of the key (a repair, a delete)
// removes it from the list.
func (k *KV) CorruptRecords(ctx context.Context) ([]Corrupt, error) {
	if err := k.caughtUp(ctx); err != nil {
		return nil, err
	}
	k.mu.RLock()
	out := slices.Collect(maps.Values(k.corrupt))
	k.mu.RUnlock()
	slices.SortFunc(out, func(a, b Corrupt) int { return strings.Compare(a.Key, b.Key) })
	return out, nil
}

// applyWatchedOp puts revision rev of an operation (nil raw: deleted),
// as the watcher delivers it, in the index unless it already holds that
// revision or a later one (the watcher's copy of this process's own
// write), and keeps its record as a recent one, and in the archive if it
// is terminal, if recent (of a start's initial entries, the last
// kvRecentOps only: archiving every record of a start that reads them
// all would double its time). Of the record,
// the scanner reads the indexed fields (scanIndexed), or encoding/json
// when the scanner is unsure; an error if neither can, unless the index
// holds that revision.
func (k *KV) applyWatchedOp(id string, rev uint64, raw []byte, recent bool) error {
	if raw == nil {
		return k.applyOpValue(id, rev, nil, nil, true)
	}
	var sc scannedOp
	if scanIndexed(raw, &sc) && len(sc.typ) > 0 && len(sc.status) > 0 {
		f := sc.fields()
		if putWatchedOp(k, id, rev, &f, raw, recent) && recent {
			k.archive.put(id, rev, f.completed, raw, true)
		}
		return nil
	}
	var o kvIndexed
	if err := decode(kvOpPrefix+id, "", raw, &o); err != nil {
		k.mu.Lock()
		defer k.mu.Unlock()
		if held, _, _ := k.ops.rev(id); rev <= held {
			k.seen = max(k.seen, rev)
			return nil
		}
		return err
	}
	op := o.operation(id)
	f := fieldsOf(&op)
	if putWatchedOp(k, id, rev, &f, raw, recent) && recent {
		k.archive.put(id, rev, f.completed, raw, true)
	}
	return nil
}

// putWatchedOp is applyWatchedOp of a decoded record, f, but for the
// archive; it reports whether the index took revision rev of a terminal
// record.
func putWatchedOp[S ~string | ~[]byte](k *KV, id string, rev uint64, f *opFields[S], raw []byte, recent bool) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	// fresh but for the revision the index holds, which putNewer looks
	// up.
	if !k.fresh(0, rev, true) || !putNewerLayers(k.ops, id, rev, f) {
		return false
	}
	k.nudge()
	if recent {
		k.recent.put(id, rev, raw)
	}
	if !commands.OpStatus(f.status).Terminal() {
		return false
	}
	k.ends.ended(id, nil)
	return true
}

// kvIndexed is what encoding/json reads of an operation's JSON when the
// scanner is unsure of it: the indexed fields only.
type kvIndexed struct {
	Type        commands.OpType   `json:"type"`
	Status      commands.OpStatus `json:"status"`
	VolumeID    string            `json:"volume_id"`
	VMID        *string           `json:"vm_id"`
	RequestedBy string            `json:"requested_by"`
	CreatedAt   time.Time         `json:"created_at"`
	UpdatedAt   time.Time         `json:"updated_at"`
	CompletedAt *time.Time        `json:"completed_at"`
}

// operation is the operation id with the indexed fields of o.
func (o *kvIndexed) operation(id string) commands.Operation {
	return commands.Operation{ID: id, Type: o.Type, Status: o.Status, VolumeID: o.VolumeID, VMID: o.VMID,
		RequestedBy: o.RequestedBy, CreatedAt: o.CreatedAt, UpdatedAt: o.UpdatedAt, CompletedAt: o.CompletedAt}
}
