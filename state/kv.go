package state

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"path/filepath"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/internal/backoff"
	"github.com/volumed/volumed/internal/formation"
	"github.com/volumed/volumed/internal/jsget"
)

// DefaultKVBucket is the JetStream KeyValue bucket of the embedded store.
const DefaultKVBucket = "volumed_state"

// Key prefixes in the bucket.
const (
	kvOpPrefix      = "op."
	kvMappingPrefix = "map."
	kvExportPrefix  = "export."
	kvLeasePrefix   = "lease."
)

// kvMarkerTTL is how long the bucket keeps the marker of a deleted key
// (and of an expired lease). A watcher that falls further behind than this
// would miss the delete, so it is long; the markers are what keeps the
// stream bounded once records are pruned.
const kvMarkerTTL = 24 * time.Hour

// KVConfig configures a KV store.
type KVConfig struct {
	// Bucket name; default DefaultKVBucket.
	Bucket string
	// Replicas of the bucket's stream; default 1.
	Replicas int
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
	// IndexCache is the file the store keeps a copy of its in-memory
	// index in (kvcache.go), written at Close and every kvCacheEvery, so
	// that a start reads only the records written since; empty: none.
	// The files beside it named IndexCache.base.* are its base files:
	// the store removes those its cache file does not name.
	// Each process sharing the bucket (each cluster member) needs its own
	// file; the path may be the same on every host.
	IndexCache string
	// Archive is the directory of the store's archive of terminal
	// operation records (kvarchive.go), read instead of the bucket; empty:
	// none. Each process sharing the bucket needs its own.
	Archive string
}

// KVFiles returns the IndexCache and Archive paths volumed gives the
// store in its data dir.
func KVFiles(dataDir string) (indexCache, archive string) {
	return filepath.Join(dataDir, "state-index.cache"), filepath.Join(dataDir, "ops-archive")
}

// KV is the Store on a JetStream KeyValue bucket: operations under
// op.<id>, mappings under map.<volume_id>, exports under
// export.<volume_id>, leases under lease.<base64url(name)>, each logical
// write one KV operation conditioned on the key's last revision, which is
// the record's Revision. The secondary indexes and Stats live in memory,
// built at start by a watcher over the bucket and kept live by it, so every
// process sharing the bucket converges; each write also updates them
// before it returns. Of an operation, memory keeps only what the indexes
// need (opIndex), and the JSON of the recent ones (recentOps); other
// records are read from the archive of terminal records (opArchive) or
// the bucket. Deletes leave a marker that expires after a day
// (LimitMarkerTTL), so pruned records leave nothing behind for long.
type KV struct {
	js     jetstream.JetStream
	kv     jetstream.KeyValue
	stream jetstream.Stream // the bucket's, for batches and delete markers
	bucket string
	log    *slog.Logger
	writes atomic.Int64

	cache   string // the index cache file; "" none
	archive *opArchive
	sealKey string // the key of its seals (kvCacheSealPrefix): this process's

	mu     sync.RWMutex
	seen   uint64 // the last revision the watcher delivered
	cached uint64 // the sequence of the cache file's seal
	loaded uint64 // the last sequence the index cache loaded at start reflects
	// seenAt is the stream time (Unix ns) of the last message the watcher
	// delivered: no message after k.seen was stored before it.
	seenAt   atomic.Int64
	gap      kvGap // see caughtUp
	ops      *opLayers
	recent   *recentOps
	mappings map[string]kvEntry[commands.Mapping]
	byDevice map[string]string
	byVM     map[string]map[string]struct{}
	exports  map[string]kvEntry[commands.Export]
	corrupt  map[string]Corrupt // by key: records the watcher skipped
	ends     endWatches         // the watches of WatchEnd
	held     heldOps            // see PruneOperations

	// afterListIndex, set by tests only, runs in ListOperations between
	// the read of the index and that of the records.
	afterListIndex func()
	// onGet, set by tests only, runs in get before the bucket's read.
	onGet func(key string)

	watcher *kvWatcher
	// compact asks the cache's writer for a new file, and so a new base
	// of the operation index (opLayers): the delta is full, or the index
	// is all in the heap after the start.
	compact   chan struct{}
	stop      chan struct{} // closed by Close: stops saving the cache
	saver     sync.WaitGroup
	closeOnce sync.Once
	// backfilled: every terminal record the index held when the start
	// ended is archived (kvbackfill.go).
	backfilled atomic.Bool
}

var _ Store = (*KV)(nil)

// kvEntry is the in-memory entry of a record at revision rev; v is nil for
// a record this process deleted until the watcher delivers the delete.
type kvEntry[T any] struct {
	rev uint64
	v   *T
	raw []byte
}

// NewKV creates or updates the bucket (file storage, one value per key,
// per-key TTLs for leases), brings its records to KVFormat or refuses
// them (upgrade.ErrRefused), reads every record into the indexes (or the
// index cache and the records written after it) and keeps watching the
// bucket until Close.
func NewKV(ctx context.Context, js jetstream.JetStream, cfg KVConfig) (*KV, error) {
	if cfg.Bucket == "" {
		cfg.Bucket = DefaultKVBucket
	}
	if cfg.Replicas <= 0 {
		cfg.Replicas = 1
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	log := cfg.Logger.With("component", "state-kv", "bucket", cfg.Bucket)
	kv, stream, err := openBucket(ctx, js, cfg, log)
	if err != nil {
		return nil, err
	}
	k := &KV{js: js, kv: kv, stream: stream, bucket: cfg.Bucket, log: log, stop: make(chan struct{}), compact: make(chan struct{}, 1),
		ops: newOpLayers(), recent: newRecentOps(kvRecentOps), mappings: make(map[string]kvEntry[commands.Mapping]), byDevice: make(map[string]string),
		byVM: make(map[string]map[string]struct{}), exports: make(map[string]kvEntry[commands.Export]),
		corrupt: make(map[string]Corrupt)}
	if err := k.upgrade(ctx, cfg.Logger); err != nil {
		return nil, fmt.Errorf("state: kv %s: %w", cfg.Bucket, err)
	}
	if cfg.Archive != "" {
		info := stream.CachedInfo()
		if k.archive, err = openArchive(cfg.Archive, info.Config.Name, info.Created, info.State.LastSeq, log); err != nil {
			log.Warn("no operation archive: records are read from the bucket", "dir", cfg.Archive, "err", err)
		}
	}
	if cfg.IndexCache != "" {
		k.cache, k.sealKey = cfg.IndexCache, newSealKey() // loadCache keeps the file's
	}
	cached := k.loadCache(ctx)
	if k.watcher, err = k.startWatch(ctx, cached); err != nil {
		return nil, err
	}
	select {
	case <-k.watcher.loaded:
	case <-k.watcher.r.Done():
		return nil, fmt.Errorf("state: kv load %s: %w: watcher stopped", cfg.Bucket, ErrUnavailable)
	case <-ctx.Done():
		_ = k.Close(context.Background())
		return nil, fmt.Errorf("state: kv load %s: %w: %w", cfg.Bucket, ErrUnavailable, ctx.Err())
	}
	if err := k.claimLoaded(ctx); err != nil {
		_ = k.Close(context.Background())
		return nil, err
	}
	k.mu.RLock()
	nops, nmaps := k.ops.len(), len(k.mappings)
	k.mu.RUnlock()
	k.log.Info("state store ready", "operations", nops, "mappings", nmaps)
	k.startBackfill(max(cached, k.watcher.unarchived.Load()))
	if k.cache != "" {
		if nops > 0 {
			k.mu.Lock()
			if k.ops.rebase() {
				// Read from every record or from a version 2 file
				// into the heap, which a base on disk now replaces,
				// or from a version 3 file, whose base a base file
				// now replaces.
				select {
				case k.compact <- struct{}{}:
				default: // asked already (nudge)
				}
			}
			k.mu.Unlock()
		}
		k.saver.Go(k.saveCacheEvery)
	}
	return k, nil
}

// nudge asks for a new base when the operation index's delta is full
// (opLayers.full).
// k.mu is held.
func (k *KV) nudge() {
	if k.cache != "" && k.ops.full() {
		select {
		case k.compact <- struct{}{}:
		default:
		}
	}
}

// kvCacheInfoWait bounds the periodic cache write's requests (the
// barrier, the seal).
const kvCacheInfoWait = 10 * time.Second

// saveCacheEvery writes the index cache every kvCacheEvery when the
// bucket changed since the last one, until Close.
//
// It also writes one when the operation index asks for a new base
// (KV.compact), but after a failed write, which the next tick retries.
// Once the start's is written (or at once when the start
// needed none), it returns the memory the start freed to the OS: the
// heap of the start (the embedded server's recovery, the index read into
// the heap) would otherwise stay resident.
func (k *KV) saveCacheEvery() {
	t := time.NewTicker(kvCacheEvery)
	defer t.Stop()
	freed, failed := false, false
	// When this process last wrote the file: never, at first, so that
	// the first tick writes it if the bucket changed (the file loaded may
	// be hours old).
	var last time.Time
	for {
		now := false
		if !freed && len(k.compact) == 0 {
			freed = true
			debug.FreeOSMemory()
		}
		select {
		case <-k.stop:
			return
		case <-t.C:
		case <-k.compact:
			if failed {
				// The last write failed (a full disk, no quorum):
				// the next tick tries again, not each change while
				// the delta stays full.
				continue
			}
			now = true
		}
		k.mu.RLock()
		changed, pending := k.seen != k.cached, k.ops.pending()
		k.mu.RUnlock()
		if now || cacheDue(changed, pending, time.Since(last)) {
			ctx, cancel := context.WithTimeout(context.Background(), kvCacheInfoWait)
			err := k.saveCache(ctx)
			cancel()
			failed = err != nil
			if err != nil {
				k.log.Warn("index cache not written", "err", err)
			} else {
				last = time.Now()
				k.noteArchived()
			}
		}
	}
}

// noteArchived records the last revision the watcher applied as the
// archive's through once the backfill has ended: every ended record since
// was archived as it came. Close and each periodic cache write do, so that
// a start after an unclean stop archives again only what came since.
func (k *KV) noteArchived() {
	if k.archive == nil || !k.backfilled.Load() {
		return
	}
	k.mu.RLock()
	seen := k.seen
	k.mu.RUnlock()
	if seen > k.archive.through() {
		if err := k.archive.setThrough(seen); err != nil {
			k.log.Warn("archive's progress not recorded", "err", err)
		}
	}
}

// The periodic cache write: each one writes the delta of the operation
// index and names its base file, written again only when a new base is
// due (opLayers.rebase; at a million operations, 167 MB). Every
// kvCacheEvery it is
// written when the bucket changed and the delta holds kvCachePending
// operations or more, or the last file is kvCacheStale old: a start after
// a crash reads at most that much since the file.
const (
	kvCachePending = 4096
	kvCacheStale   = time.Hour
)

// cacheDue reports whether the periodic cache write is due: the bucket
// changed, and the delta holds pending operations, kvCachePending or
// more, or the last file this process wrote is age old, kvCacheStale or
// more.
func cacheDue(changed bool, pending int, age time.Duration) bool {
	return changed && (pending >= kvCachePending || age >= kvCacheStale)
}

// fresh reports whether revision rev should replace the in-memory entry at
// revision cur. The watcher delivers every revision in order, so a write
// of this process at or below the last revision the watcher delivered is
// already applied, or overtaken by a later one. A revision the index
// cache reflects (up to k.loaded) is in the index already, or deleted
// since: should a consumer deliver it (a server that starts it below its
// start sequence), it is not applied again. k.mu is held.
func (k *KV) fresh(cur, rev uint64, fromWatcher bool) bool {
	if fromWatcher {
		k.seen = max(k.seen, rev)
	} else if rev <= k.seen {
		return false
	}
	return rev > cur && rev > k.loaded
}

// decodeRecord decodes raw, the record of id at key, nil for a delete.
func decodeRecord[T any](key, id string, raw []byte) (*T, error) {
	if raw == nil {
		return nil, nil
	}
	v := new(T)
	if err := decode(key, id, raw, v); err != nil {
		return nil, err
	}
	return v, nil
}

// applyOpValue puts revision rev of the operation op (nil: deleted),
// whose JSON is raw, in the index and the recent records unless the index
// already holds that revision or a later one: a writer's own record, or
// one the watcher delivered. The watches of its end hear of it.
func (k *KV) applyOpValue(id string, rev uint64, op *commands.Operation, raw []byte, fromWatcher bool) error {
	if k.putOpValue(id, rev, op, raw, fromWatcher) && op != nil && op.Status.Terminal() {
		k.archive.put(id, rev, opScore(completedAt(op)), raw, fromWatcher)
	}
	return nil
}

// putOpValue is applyOpValue but for the archive; it reports whether
// the index took revision rev.
func (k *KV) putOpValue(id string, rev uint64, op *commands.Operation, raw []byte, fromWatcher bool) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	cur, _, _ := k.ops.rev(id)
	if !k.fresh(cur, rev, fromWatcher) {
		return false
	}
	if op == nil || op.Status.Terminal() {
		var own []byte
		if op != nil && !fromWatcher {
			own = raw
		}
		defer k.ends.ended(id, own)
	}
	if op == nil {
		k.ops.remove(id)
		k.recent.forget(id)
		k.nudge()
		return true
	}
	k.ops.put(rev, op)
	k.recent.put(id, rev, raw)
	k.nudge()
	return true
}

// applyMapping puts revision rev of a mapping (nil raw: deleted) in the
// indexes unless they already hold that revision or a later one.
func (k *KV) applyMapping(volumeID string, rev uint64, raw []byte, fromWatcher bool) error {
	m, err := decodeRecord[commands.Mapping](kvMappingPrefix+volumeID, volumeID, raw)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.fresh(k.mappings[volumeID].rev, rev, fromWatcher) {
		return nil
	}
	k.setMapping(volumeID, kvEntry[commands.Mapping]{rev: rev, v: m, raw: raw})
	return nil
}

// applyExport puts revision rev of an export (nil raw: deleted) in memory
// unless it already holds that revision or a later one.
func (k *KV) applyExport(volumeID string, rev uint64, raw []byte, fromWatcher bool) error {
	e, err := decodeRecord[commands.Export](kvExportPrefix+volumeID, volumeID, raw)
	if err != nil {
		return err
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if !k.fresh(k.exports[volumeID].rev, rev, fromWatcher) {
		return nil
	}
	if e == nil {
		delete(k.exports, volumeID)
		return nil
	}
	k.exports[volumeID] = kvEntry[commands.Export]{rev: rev, v: e, raw: raw}
	return nil
}

// setMapping replaces the entry of a volume, moving its device and VM
// index entries; an entry without a mapping is dropped. k.mu is held.
func (k *KV) setMapping(volumeID string, e kvEntry[commands.Mapping]) {
	if old := k.mappings[volumeID].v; old != nil {
		if key := deviceKey(old.VMID, old.DevicePath); k.byDevice[key] == volumeID {
			delete(k.byDevice, key)
		}
		delete(k.byVM[old.VMID], volumeID)
		if len(k.byVM[old.VMID]) == 0 {
			delete(k.byVM, old.VMID)
		}
	}
	if e.v == nil && e.rev == 0 {
		delete(k.mappings, volumeID)
		return
	}
	k.mappings[volumeID] = e
	if e.v == nil {
		return
	}
	if e.v.DevicePath != "" {
		k.byDevice[deviceKey(e.v.VMID, e.v.DevicePath)] = volumeID
	}
	if e.v.VMID != "" {
		if k.byVM[e.v.VMID] == nil {
			k.byVM[e.v.VMID] = make(map[string]struct{})
		}
		k.byVM[e.v.VMID][volumeID] = struct{}{}
	}
}

// kvErr classifies a NATS error: a JetStream API reply, an invalid key or
// a cancelled caller pass through; anything else (closed or lost
// connection, timeouts, no responders), and the API replies of a cluster
// that cannot serve yet (formation.Transient, the one judge of that),
// wrap ErrUnavailable.
func kvErr(op string, err error) error {
	var apiErr *jetstream.APIError
	if (errors.As(err, &apiErr) && !formation.Transient(err)) || errors.Is(err, jetstream.ErrInvalidKey) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("state: kv %s: %w", op, err)
	}
	return fmt.Errorf("state: kv %s: %w: %w", op, ErrUnavailable, err)
}

// wrongRevision reports whether err is JetStream refusing a write whose
// expected last revision of the key is not the key's.
func wrongRevision(err error) bool {
	var apiErr *jetstream.APIError
	return errors.Is(err, jetstream.ErrKeyRevisionMismatch) || errors.Is(err, jetstream.ErrKeyExists) ||
		(errors.As(err, &apiErr) && isWrongLast(int(apiErr.ErrorCode)))
}

// isWrongLast reports whether a JetStream error code says a write's
// expected last revision was not the key's (10164 on replicated streams).
func isWrongLast(code int) bool {
	return code == int(jetstream.JSErrCodeStreamWrongLastSequence) || code == int(jetstream.JSErrCodeStreamWrongLastSequenceConstant)
}

// gone is the error of a compare-and-swap write on a deleted record.
func gone(what, key string) error {
	return fmt.Errorf("state: %s %s: %w: %w", what, key, ErrStale, ErrNotFound)
}

// stale is the error of a compare-and-swap write that lost.
func stale(what, key string, rev uint64) error {
	return fmt.Errorf("state: %s %s at revision %d: %w", what, key, rev, ErrStale)
}

// CreateOperation writes op with one publish on revision 0 (a KV Create);
// ErrExists if the key is taken.
func (k *KV) CreateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	if err := checkOp(&op); err != nil {
		return op, err
	}
	data, err := json.Marshal(op)
	if err != nil {
		return op, fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	// One publish on revision 0, a key without history: the KeyValue API's
	// Create but for its key check (a regular expression; validKey is the
	// same rule). A key with history (a record, or the marker a delete
	// left) goes through Create, which writes over a marker.
	key := kvOpPrefix + op.ID
	if !validKey(key) {
		return op, kvErr("create operation", jetstream.ErrInvalidKey)
	}
	rev, err := k.single(ctx, kvWrite{key: key, data: data})
	if errors.Is(err, errBatchStale) {
		rev, err = k.kv.Create(ctx, key, data)
		switch {
		case errors.Is(err, jetstream.ErrKeyExists):
			return op, fmt.Errorf("state: operation %s: %w", op.ID, ErrExists)
		case err != nil:
			return op, kvErr("create operation", err)
		}
		k.writes.Add(1)
	}
	if err != nil {
		return op, err
	}
	op.Revision = rev
	return op, k.applyOpValue(op.ID, rev, &op, data, false)
}

// UpdateOperation replaces the operation at op.Revision with one write
// conditioned on that revision, after checking the change (checkMove)
// against the record there. A lost race is ErrStale; it is never retried here.
func (k *KV) UpdateOperation(ctx context.Context, op commands.Operation) (commands.Operation, error) {
	if err := checkOp(&op); err != nil {
		return op, err
	}
	// A status move allowed from the status memory holds at this revision
	// needs no more; anything else is checked on the whole record.
	if st, held := k.statusAt(op.ID, op.Revision); !held || !CanMove(st, op.Status) {
		old, err := k.opAt(ctx, op.ID, op.Revision)
		if err != nil {
			return op, err
		}
		if err := checkMove(old, &op); err != nil {
			return op, err
		}
	}
	data, err := json.Marshal(op)
	if err != nil {
		return op, fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	// One publish on the key's revision: the KeyValue API's Update, but
	// for its key check (a regular expression; validKey is the same rule).
	key := kvOpPrefix + op.ID
	if !validKey(key) {
		return op, kvErr("update operation", jetstream.ErrInvalidKey)
	}
	rev, err := k.single(ctx, kvWrite{key: key, data: data, expect: op.Revision})
	if errors.Is(err, errBatchStale) {
		return op, stale("operation", op.ID, op.Revision)
	}
	if err != nil {
		return op, err
	}
	op.Revision = rev
	return op, k.applyOpValue(op.ID, rev, &op, data, false)
}

// statusAt returns the status of the operation at revision rev when
// memory holds that revision.
func (k *KV) statusAt(id string, rev uint64) (commands.OpStatus, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	cur, st, live := k.ops.rev(id)
	if !live || cur != rev {
		return "", false
	}
	return st, true
}

// opAt returns the operation recorded at revision rev, read from the
// bucket. ErrStale when the key has another revision.
func (k *KV) opAt(ctx context.Context, id string, rev uint64) (*commands.Operation, error) {
	e, err := k.last(ctx, kvOpPrefix+id)
	switch {
	case err != nil:
		return nil, err
	case !e.live:
		return nil, gone("operation", id)
	case e.rev != rev:
		return nil, stale("operation", id, rev)
	}
	return decodeRecord[commands.Operation](kvOpPrefix+id, id, e.data)
}

// DeleteOperation purges the operation's key if it is at revision rev.
func (k *KV) DeleteOperation(ctx context.Context, id string, rev uint64) error {
	if rev == 0 {
		// No revision matches a record: refuse unless there is none.
		_, err := k.kv.Get(ctx, kvOpPrefix+id)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			return nil
		}
		if err != nil {
			return kvErr("get operation", err)
		}
		return stale("operation", id, rev)
	}
	if err := k.purge(ctx, "operation", kvOpPrefix+id, rev); err != nil {
		return err
	}
	k.mu.Lock()
	if cur, _, live := k.ops.rev(id); live && cur == rev {
		k.ops.tombstone(id, rev)
		k.recent.forget(id)
	}
	k.mu.Unlock()
	return nil
}

// purge removes key if it is at revision rev (any revision when rev is
// 0), leaving a marker that expires; no error if the key holds nothing.
func (k *KV) purge(ctx context.Context, what, key string, rev uint64) error {
	opts := []jetstream.KVDeleteOpt{jetstream.PurgeTTL(kvMarkerTTL)}
	if rev != 0 {
		opts = append(opts, jetstream.LastRevision(rev))
	}
	err := k.kv.Purge(ctx, key, opts...)
	if wrongRevision(err) {
		if _, gerr := k.kv.Get(ctx, key); errors.Is(gerr, jetstream.ErrKeyNotFound) {
			return nil
		} else if gerr != nil {
			return kvErr("get "+what, gerr)
		}
		return stale(what, key, rev)
	}
	if err != nil {
		return kvErr("delete "+what, err)
	}
	k.writes.Add(1)
	return nil
}

// PruneOperations deletes terminal operations completed before
// completedBefore, found in the in-memory status indexes. A failover or
// rollback among them is read first: one the retention holds
// (RetainedEnd) is left out of the walks from then on, and read again,
// until its retained end is before completedBefore, by each call whose
// batch the others do not fill (the last of a pass); there are few
// (open test failovers and their failed rollbacks).
func (k *KV) PruneOperations(ctx context.Context, completedBefore time.Time, limit int) (int, error) {
	cut := opScore(completedBefore)
	n := 0
	for limit <= 0 || n < limit {
		k.held.mu.Lock()
		held := maps.Clone(k.held.ids)
		k.held.mu.Unlock()
		rest := 0
		if limit > 0 {
			rest = limit - n
		}
		k.mu.RLock()
		ids, revs, mayHold := k.ops.expired(cut, rest, held)
		k.mu.RUnlock()
		holds := 0
		for i, id := range ids {
			if mayHold[i] {
				hold, err := k.retains(ctx, id, cut)
				if err != nil {
					return n, err
				}
				if hold {
					holds++
					continue
				}
			}
			err := k.DeleteOperation(ctx, id, revs[i])
			if errors.Is(err, ErrStale) {
				continue // annotated (CanAnnotate), or deleted and created again: the next pass reads it again
			}
			if err != nil {
				return n, err
			}
			n++
		}
		if holds == 0 {
			break // else walk again: the held ones took places of the batch
		}
	}
	return PruneHeld(ctx, k, n, limit, cut, k.heldOps, func(op commands.Operation) error {
		if err := k.DeleteOperation(ctx, op.ID, op.Revision); err != nil {
			return err
		}
		k.held.mu.Lock()
		delete(k.held.ids, op.ID)
		k.held.mu.Unlock()
		return nil
	})
}

// heldOps are the ids of the operations the retention holds
// (RetainedEnd): PruneOperations learns them as it meets them.
type heldOps struct {
	mu  sync.Mutex
	ids map[string]struct{}
}

// retains reads the operation id and reports whether the retention holds
// it at the score cut; if so it is held from then on.
func (k *KV) retains(ctx context.Context, id string, cut int64) (bool, error) {
	op, err := k.GetOperation(ctx, id)
	switch {
	case errors.Is(err, ErrNotFound):
		return false, nil // DeleteOperation finds it gone
	case errors.Is(err, ErrCorrupt):
		// Pruned by its index entry, as any other corrupt record there.
		k.log.Warn("prune deletes a corrupt record", "err", err)
		return false, nil
	case err != nil:
		return false, err
	}
	end, held, err := RetainedEnd(ctx, k, op)
	if err != nil || (!held && opScore(end) < cut) {
		return false, err
	}
	k.held.mu.Lock()
	if k.held.ids == nil {
		k.held.ids = make(map[string]struct{})
	}
	k.held.ids[id] = struct{}{}
	k.held.mu.Unlock()
	return true, nil
}

var _ LocalPruner = (*KV)(nil)

// PruneLocal removes the archive's files of the days before
// completedBefore, less a day's margin (LocalPruner).
func (k *KV) PruneLocal(completedBefore time.Time) { k.archive.prune(completedBefore) }

// heldOps reads the operations the retention holds, and forgets those
// gone.
func (k *KV) heldOps(ctx context.Context) ([]commands.Operation, error) {
	k.held.mu.Lock()
	ids := slices.Collect(maps.Keys(k.held.ids))
	k.held.mu.Unlock()
	ops := make([]commands.Operation, 0, len(ids))
	for _, id := range ids {
		op, err := k.GetOperation(ctx, id)
		if errors.Is(err, ErrNotFound) || errors.Is(err, ErrCorrupt) {
			// Gone; or corrupt since it was held: the walk of the index
			// meets it again (retains).
			k.held.mu.Lock()
			delete(k.held.ids, id)
			k.held.mu.Unlock()
			continue
		}
		if err != nil {
			return nil, err
		}
		ops = append(ops, op)
	}
	return ops, nil
}

// GetOperation reads one operation: a terminal one from the archive
// (archived), any other, or one the archive misses, from the bucket.
func (k *KV) GetOperation(ctx context.Context, id string) (commands.Operation, error) {
	if op, ok := k.archived(ctx, id); ok {
		return op, nil
	}
	return k.bucketOp(ctx, id)
}

// bucketOp reads operation id from the bucket, and archives the record
// read (readThrough).
func (k *KV) bucketOp(ctx context.Context, id string) (commands.Operation, error) {
	var op commands.Operation
	rev, raw, err := get(ctx, k, kvOpPrefix+id, id, &op)
	op.Revision = rev
	if err == nil {
		k.readThrough(&op, raw)
	}
	return op, err
}

// readThrough archives raw, the record op as the bucket holds it, if the
// index holds op ended at its revision: one a start took from a cache
// file or read without archiving it (kvRecentOps), or one the archive
// lost, is then read from the bucket once. After Close it archives
// nothing.
func (k *KV) readThrough(op *commands.Operation, raw []byte) {
	if k.archive == nil || !op.Status.Terminal() {
		return
	}
	if k.heldEnded(op.ID) == op.Revision {
		k.archive.put(op.ID, op.Revision, opScore(completedAt(op)), raw, true)
	}
}

// archived returns operation id from the archive when the index holds it
// terminal, at the revision the index holds once the watcher has applied
// every entry the bucket holds (caughtUpNow: so that it reflects every
// write before the call, as a read from the bucket does), and the archive
// holds that revision whole.
func (k *KV) archived(ctx context.Context, id string) (commands.Operation, bool) {
	if k.archive == nil || id == "" {
		return commands.Operation{}, false
	}
	// After Close no watcher meets the barrier (and the archive is closed).
	if k.heldEnded(id) == 0 || k.closing() || !k.caughtUpNow(ctx) {
		return commands.Operation{}, false
	}
	rev := k.heldEnded(id)
	if rev == 0 {
		return commands.Operation{}, false
	}
	return k.archivedAt(id, rev)
}

// heldEnded is endedAt, taking k.mu.
func (k *KV) heldEnded(id string) uint64 {
	k.mu.RLock()
	defer k.mu.RUnlock()
	return k.endedAt(id)
}

// endedAt is the revision at which the index holds operation id ended,
// 0 if it does not. k.mu is held.
func (k *KV) endedAt(id string) uint64 {
	if rev, st, live := k.ops.rev(id); live && st.Terminal() {
		return rev
	}
	return 0
}

// caughtUpNow reports whether the watcher has applied every entry the
// bucket holds now, asking only the stream's info (caughtUp's barrier at
// its constant cost) and waiting at most kvCatchUpWait for the watcher to
// reach the stream's last sequence: false when it has not by then (that
// message may be gone, an expired marker, and the stream's last message
// would have to be asked for, a match over every key) or when no leader
// answered. A read by id then asks the bucket, as it would without the
// archive.
func (k *KV) caughtUpNow(ctx context.Context) bool {
	info, err := k.stream.Info(ctx)
	if err != nil || !leaderAnswered(info) {
		return false
	}
	target, known := k.knownTarget(info.State.LastSeq)
	if !known {
		target = info.State.LastSeq
	}
	ctx, cancel := context.WithTimeout(ctx, kvCatchUpWait)
	defer cancel()
	return k.reach(ctx, target) == nil
}

// kvCatchUpWait bounds caughtUpNow's wait for the watcher: about the time
// the watcher takes to deliver a write just made.
const kvCatchUpWait = 20 * time.Millisecond

// closing reports whether Close has begun.
func (k *KV) closing() bool {
	select {
	case <-k.stop:
		return true
	default:
		return false
	}
}

// archivedAt returns the record of operation id at revision rev from the
// archive, if it holds it whole (only terminal records are archived).
func (k *KV) archivedAt(id string, rev uint64) (commands.Operation, bool) {
	raw, err := k.archive.get(id, rev)
	if err != nil {
		if !errors.Is(err, errArchiveMiss) {
			k.log.Warn("archived operation read from the bucket", "id", id, "revision", rev, "err", err)
		}
		return commands.Operation{}, false
	}
	var op commands.Operation
	if decode(kvOpPrefix+id, id, raw, &op) != nil {
		return commands.Operation{}, false // the bucket's read reports it
	}
	op.Revision = rev
	return op, true
}

// get reads and decodes the record of id at key, returning its
// revision and its bytes as stored, with ErrCorrupt too: a mapping or
// export write on it replaces the record.
func get[T any](ctx context.Context, k *KV, key, id string, v *T) (uint64, []byte, error) {
	if id == "" {
		return 0, nil, fmt.Errorf("state: %s without an id: %w", key, ErrNotFound)
	}
	if k.onGet != nil {
		k.onGet(key)
	}
	e, err := k.last(ctx, key)
	if err != nil {
		return 0, nil, err
	}
	if !e.live {
		return 0, nil, fmt.Errorf("state: %s: %w", key, ErrNotFound)
	}
	return e.rev, e.data, decode(key, id, e.data, v)
}

// openBucket binds the bucket, making it if it does not exist, and brings
// its stream to what this store needs in one update, so that instances
// already running never see it without atomic batches. Replicas serve no
// reads: a read by key goes to the stream's leader, so a read after a
// write by another instance sees that write. With one replica the only
// server holding the stream is its leader, and a read is a direct get
// (AllowDirect: a raw reply, no JSON API request); with more, followers
// would answer direct gets too, so it is off and a read is the API's
// message get, which the leader answers. The replicas and AllowDirect
// change together, in one update. JetStream that does not answer yet (a
// cluster still forming) is asked again as formation.Wait does.
func openBucket(ctx context.Context, js jetstream.JetStream, cfg KVConfig, log *slog.Logger) (jetstream.KeyValue, jetstream.Stream, error) {
	var (
		kv     jetstream.KeyValue
		stream jetstream.Stream
	)
	err := formation.Wait(ctx, log, "bucket "+cfg.Bucket, func(ctx context.Context) error {
		var err error
		kv, stream, err = setupBucket(ctx, js, cfg)
		return err
	})
	if err != nil {
		return nil, nil, err
	}
	return kv, stream, nil
}

// setupBucket is one attempt of openBucket.
func setupBucket(ctx context.Context, js jetstream.JetStream, cfg KVConfig) (jetstream.KeyValue, jetstream.Stream, error) {
	streamName := "KV_" + cfg.Bucket
	stream, err := js.Stream(ctx, streamName)
	if errors.Is(err, jetstream.ErrStreamNotFound) {
		_, err = js.CreateKeyValue(ctx, jetstream.KeyValueConfig{
			Bucket: cfg.Bucket, Description: "volumed operations, device mappings, exports and leases",
			History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas, LimitMarkerTTL: kvMarkerTTL,
		})
		if err != nil && !errors.Is(err, jetstream.ErrBucketExists) {
			return nil, nil, kvErr("create bucket "+cfg.Bucket, err)
		}
		// Made now, by this member or another: a server that has not yet
		// learned of it answers that it does not exist.
		if stream, err = js.Stream(ctx, streamName); errors.Is(err, jetstream.ErrStreamNotFound) {
			err = formation.NotYet(err)
		}
	}
	if err != nil {
		return nil, nil, kvErr("bucket stream "+streamName, err)
	}
	// Mappings and their device claims are written in atomic batches,
	// which the KeyValue API does not turn on; reads go to the leader.
	scfg := stream.CachedInfo().Config
	direct := cfg.Replicas == 1
	if !scfg.AllowAtomicPublish || scfg.AllowDirect != direct || scfg.SubjectDeleteMarkerTTL < kvMarkerTTL ||
		!scfg.AllowMsgTTL || scfg.Replicas != cfg.Replicas {
		scfg.AllowAtomicPublish, scfg.AllowDirect, scfg.AllowMsgTTL = true, direct, true
		scfg.SubjectDeleteMarkerTTL, scfg.Replicas = kvMarkerTTL, cfg.Replicas
		if stream, err = js.UpdateStream(ctx, scfg); err != nil {
			return nil, nil, kvErr("update the stream of "+cfg.Bucket, err)
		}
	}
	kv, err := js.KeyValue(ctx, cfg.Bucket)
	if err != nil {
		return nil, nil, kvErr("bind bucket "+cfg.Bucket, err)
	}
	return kv, stream, nil
}

// caughtUp waits until the watcher has applied every entry the bucket
// held when it was called, so that a read from memory (lists, indexes,
// stats) reflects every write committed before it, by any process sharing
// the bucket. (A read of one key asks the bucket itself.)
//
// The stream's last sequence, which its leader gives at a constant cost,
// is the barrier; the last message of the bucket's subjects, which costs
// a match over every key, is asked only when the watcher has not seen
// that sequence, since the message there may be gone (an expired marker).
func (k *KV) caughtUp(ctx context.Context) error {
	target, err := k.barrier(ctx)
	if err != nil {
		return err
	}
	return k.reach(ctx, target)
}

// reach waits until the watcher has applied revision target.
func (k *KV) reach(ctx context.Context, target uint64) error {
	for pause := 100 * time.Microsecond; ; pause = min(2*pause, 5*time.Millisecond) {
		k.mu.RLock()
		seen := k.seen
		k.mu.RUnlock()
		if seen >= target {
			return nil
		}
		select {
		case <-ctx.Done():
			return kvErr("read barrier", ctx.Err())
		case <-time.After(pause):
		}
	}
}

// barrier returns the revision the watcher must have applied to reflect
// every entry the bucket holds now (see caughtUp).
func (k *KV) barrier(ctx context.Context) (uint64, error) {
	target, _, err := k.barrierInfo(ctx)
	return target, err
}

// barrierInfo is barrier, with the stream info it asked for (nil without
// an answer): not the stream's CachedInfo, which a concurrent read may
// have replaced.
//
// Only a leader's answer is a barrier. A member of a replicated stream
// that knows no leader (during an election, or cut off from the others)
// answers the info request too, with what it holds itself, which may lack
// writes the leader acknowledged; such an answer is asked again, 50 ms
// doubling to 500 ms apart, until a leader answers or ctx ends (at most
// the client's request timeout when ctx has no deadline), then
// ErrUnavailable. (A read by key is answered by the leader alone, once it
// has applied every entry of its log; a leaderless member refuses it.)
func (k *KV) barrierInfo(ctx context.Context) (uint64, *jetstream.StreamInfo, error) {
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, k.js.Options().DefaultTimeout)
		defer cancel()
	}
	pauses := backoff.Policy{Min: 50 * time.Millisecond, Max: 500 * time.Millisecond}.Start()
	for {
		info, err := k.stream.Info(ctx)
		if err != nil {
			return 0, nil, kvErr("read barrier", err)
		}
		if leaderAnswered(info) {
			target, err := k.barrierAt(ctx, info.State.LastSeq)
			return target, info, err
		}
		if !pauses.Wait(ctx, 0) {
			return 0, nil, fmt.Errorf("state: kv read barrier: %w: no leader of the stream answered (a member without one answered with its own state)", ErrUnavailable)
		}
	}
}

// leaderAnswered reports whether info is a leader's answer: always on a
// single server or with one replica; on a replicated stream, an answer
// naming no leader is a member's own state.
func leaderAnswered(info *jetstream.StreamInfo) bool {
	return info.Cluster == nil || len(info.Cluster.Replicas) == 0 || info.Cluster.Leader != ""
}

// barrierAt is barrier when the stream's last sequence is target.
func (k *KV) barrierAt(ctx context.Context, target uint64) (uint64, error) {
	if t, known := k.knownTarget(target); known {
		return t, nil
	}
	last, err := k.lastMsgSeq(ctx)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return 0, nil // an empty bucket
	}
	if err != nil {
		return 0, kvErr("read barrier", err)
	}
	k.mu.Lock()
	k.gap = kvGap{streamLast: target, lastMsg: last}
	k.mu.Unlock()
	return last, nil
}

// knownTarget is the barrier when the stream's last sequence is target,
// if known without asking for the stream's last message: target when
// the watcher has seen it, or the last message the last slow barrier
// found when nothing was written since.
func (k *KV) knownTarget(target uint64) (uint64, bool) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	switch {
	case k.seen >= target:
		return target, true
	case k.gap.streamLast == target:
		return k.gap.lastMsg, true
	}
	return 0, false
}

// lastMsgSeq returns the sequence of the last message on the bucket's
// subjects, asked of the stream's leader with the API's message get: a
// direct get (the stream's with one replica) takes no wildcard subject.
// jetstream.ErrMsgNotFound when the bucket holds none.
func (k *KV) lastMsgSeq(ctx context.Context) (uint64, error) {
	req, err := json.Marshal(struct {
		LastFor string `json:"last_by_subj"`
	}{k.subject(">")})
	if err != nil {
		return 0, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, k.js.Options().DefaultTimeout)
		defer cancel()
	}
	msg, err := k.js.Conn().RequestWithContext(ctx, jsget.APIPrefix(k.js.Options())+"STREAM.MSG.GET."+k.stream.CachedInfo().Config.Name, req)
	if err != nil {
		return 0, err
	}
	var resp struct {
		Message *struct {
			Seq uint64 `json:"seq"`
		} `json:"message"`
		Error *jetstream.APIError `json:"error"`
	}
	if err := json.Unmarshal(msg.Data, &resp); err != nil {
		return 0, fmt.Errorf("decode the last message: %w", err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return 0, jetstream.ErrMsgNotFound
	case resp.Error != nil:
		return 0, resp.Error
	case resp.Message == nil:
		return 0, errors.New("the last message: an answer without one")
	}
	return resp.Message.Seq, nil
}

// kvGap records that when the stream's last sequence was streamLast, the
// last message it held was at lastMsg.
type kvGap struct {
	streamLast, lastMsg uint64
}

// ListOperations walks the smallest index of f newest first from the
// cursor, keeping the operations that match f's other fields, up to the
// limit, then takes their records from the recent ones kept in memory,
// the archive (ended ones) or the bucket. A record taken from memory or
// the archive is the revision the index held after the read barrier; one
// read from the bucket that changed since is returned as it is now if it
// still matches f, and left out otherwise (as the Redis store does).
func (k *KV) ListOperations(ctx context.Context, f Filter) ([]commands.Operation, string, error) {
	after, err := parseCursor(f.Cursor)
	if err != nil {
		return nil, "", err
	}
	if err := k.caughtUp(ctx); err != nil {
		return nil, "", err
	}
	k.mu.RLock()
	hits, more := k.ops.hits(f, after, f.Limit)
	ids, revs := make([]string, len(hits)), make([]uint64, len(hits))
	raws := make([][]byte, len(hits))
	ended := make([]uint64, len(hits))
	var missing []int
	for i, h := range hits {
		ids[i], revs[i] = h.id, h.rev
		var ok bool
		if raws[i], ok = k.recent.get(h.id, h.rev); !ok {
			missing = append(missing, i)
			if k.endedAt(h.id) == h.rev {
				ended[i] = h.rev
			}
		}
	}
	k.mu.RUnlock()
	if k.afterListIndex != nil {
		k.afterListIndex()
	}
	recs := make([]commands.Operation, len(ids))
	for i, raw := range raws {
		if raw != nil {
			if err := decode(kvOpPrefix+ids[i], ids[i], raw, &recs[i]); err != nil {
				k.skipCorrupt(err)
				recs[i] = commands.Operation{}
				continue
			}
			recs[i].Revision = revs[i]
		}
	}
	if err := k.getOps(ctx, ids, ended, missing, recs); err != nil {
		return nil, "", err
	}
	out := make([]commands.Operation, 0, len(recs))
	for i := range recs {
		if recs[i].ID != "" && matches(&recs[i], f) {
			out = append(out, recs[i])
		}
	}
	// The next page starts after the last entry this one covered, not
	// after the last record kept: a page whose records were all left out
	// still has a next one.
	next := ""
	if more && len(hits) > 0 {
		last := hits[len(hits)-1]
		next = formatCursor(opRef{last.score, last.id})
	}
	return out, next, nil
}

// kvReaders bounds the reads of one listing in flight at once.
const kvReaders = 16

// getOps reads the operations ids[i] for each i of which into out[i]:
// from the archive at ended[i], the revision at which the index held it
// ended (0: not ended, not read from the archive: an entry there at its
// revision may be of a history a restore dropped), or from the bucket,
// several at once; a deleted one is left zero.
func (k *KV) getOps(ctx context.Context, ids []string, ended []uint64, which []int, out []commands.Operation) error {
	errs := make([]error, len(which))
	sem := make(chan struct{}, kvReaders)
	var wg sync.WaitGroup
	for j, i := range which {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if ended[i] != 0 {
				if op, ok := k.archivedAt(ids[i], ended[i]); ok {
					out[i] = op
					return
				}
			}
			op, err := k.bucketOp(ctx, ids[i])
			if errors.Is(err, ErrNotFound) || k.skipCorrupt(err) {
				return
			}
			out[i], errs[j] = op, err
		})
	}
	wg.Wait()
	return errors.Join(errs...)
}

// skipCorrupt logs err and reports true if it is ErrCorrupt: a listing
// leaves the record out (a read by id reports it) rather than fail.
func (k *KV) skipCorrupt(err error) bool {
	if !errors.Is(err, ErrCorrupt) {
		return false
	}
	k.log.Warn("listing skips a corrupt record", "err", err)
	return true
}

// Stats returns the in-memory counters.
func (k *KV) Stats(ctx context.Context) (Stats, error) {
	if err := k.caughtUp(ctx); err != nil {
		return Stats{}, err
	}
	k.mu.RLock()
	defer k.mu.RUnlock()
	s := k.ops.stats()
	s.Writes = k.writes.Load()
	return s, nil
}

// write creates key (rev 0) or updates it at rev, mapping a lost race to
// ErrStale.
func (k *KV) write(ctx context.Context, what, key string, data []byte, rev uint64) (uint64, error) {
	var newRev uint64
	var err error
	if rev == 0 {
		newRev, err = k.kv.Create(ctx, key, data)
	} else {
		newRev, err = k.kv.Update(ctx, key, data, rev)
	}
	switch {
	case wrongRevision(err) && rev == 0:
		return 0, fmt.Errorf("state: %s %s exists: %w", what, key, ErrStale)
	case wrongRevision(err):
		if _, gerr := k.kv.Get(ctx, key); errors.Is(gerr, jetstream.ErrKeyNotFound) {
			return 0, gone(what, key)
		}
		return 0, stale(what, key, rev)
	case err != nil:
		return 0, kvErr("put "+what, err)
	}
	k.writes.Add(1)
	return newRev, nil
}

// GetMapping reads the mapping of a volume from the bucket.
func (k *KV) GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error) {
	var m commands.Mapping
	rev, _, err := get(ctx, k, kvMappingPrefix+volumeID, volumeID, &m)
	m.Revision = rev
	return m, err
}

// GetMappingByDevice returns the indexed mapping holding a device path on
// a VM.
func (k *KV) GetMappingByDevice(ctx context.Context, vmID, devicePath string) (commands.Mapping, error) {
	var m commands.Mapping
	if err := k.caughtUp(ctx); err != nil {
		return m, err
	}
	k.mu.RLock()
	e := k.mappings[k.byDevice[deviceKey(vmID, devicePath)]]
	k.mu.RUnlock()
	if devicePath == "" || e.v == nil {
		return m, fmt.Errorf("state: mapping of device %s: %w", devicePath, ErrNotFound)
	}
	err := decode(kvMappingPrefix+e.v.VolumeID, "", e.raw, &m)
	m.Revision = e.rev
	return m, err
}

// deviceKey is the device-path index key of a path on a VM.
func deviceKey(vmID, devicePath string) string { return vmID + " " + devicePath }

// ListMappings returns the indexed mappings of one VM, or all of them.
func (k *KV) ListMappings(ctx context.Context, vmID string) ([]commands.Mapping, error) {
	if err := k.caughtUp(ctx); err != nil {
		return nil, err
	}
	k.mu.RLock()
	var rows []kvEntry[commands.Mapping]
	if vmID == "" {
		for _, e := range k.mappings {
			if e.v != nil {
				rows = append(rows, e)
			}
		}
	}
	for vol := range k.byVM[vmID] {
		rows = append(rows, k.mappings[vol])
	}
	k.mu.RUnlock()
	out := make([]commands.Mapping, len(rows))
	for i, e := range rows {
		if err := decode(kvMappingPrefix, "", e.raw, &out[i]); err != nil {
			return nil, err
		}
		out[i].Revision = e.rev
	}
	sortMappings(out)
	return out, nil
}

// PutExport writes e with one KV Create (Revision 0) or Update on
// e.Revision.
func (k *KV) PutExport(ctx context.Context, e commands.Export) (commands.Export, error) {
	if err := checkExport(e); err != nil {
		return e, err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return e, fmt.Errorf("state: encode export %s: %w", e.VolumeID, err)
	}
	rev, err := k.write(ctx, "export", kvExportPrefix+e.VolumeID, data, e.Revision)
	if err != nil {
		return e, err
	}
	e.Revision = rev
	return e, k.applyExport(e.VolumeID, rev, data, false)
}

// GetExport reads the export record of a volume from the bucket.
func (k *KV) GetExport(ctx context.Context, volumeID string) (commands.Export, error) {
	var e commands.Export
	rev, _, err := get(ctx, k, kvExportPrefix+volumeID, volumeID, &e)
	e.Revision = rev
	return e, err
}

// ListExports returns the export records held in memory.
func (k *KV) ListExports(ctx context.Context) ([]commands.Export, error) {
	if err := k.caughtUp(ctx); err != nil {
		return nil, err
	}
	k.mu.RLock()
	var rows []kvEntry[commands.Export]
	for _, e := range k.exports {
		if e.v != nil {
			rows = append(rows, e)
		}
	}
	k.mu.RUnlock()
	out := make([]commands.Export, len(rows))
	for i, e := range rows {
		if err := decode(kvExportPrefix, "", e.raw, &out[i]); err != nil {
			return nil, err
		}
		out[i].Revision = e.rev
	}
	sortExports(out)
	return out, nil
}

// DeleteExport purges the volume's export key (at revision rev unless 0).
func (k *KV) DeleteExport(ctx context.Context, volumeID string, rev uint64) error {
	k.mu.RLock()
	before := k.exports[volumeID].rev
	k.mu.RUnlock()
	if rev != 0 {
		before = rev
	}
	if err := k.purge(ctx, "export", kvExportPrefix+volumeID, rev); err != nil {
		return err
	}
	// As DeleteMapping: unindex unless the watcher has moved on.
	k.mu.Lock()
	if e := k.exports[volumeID]; e.v != nil && e.rev == before {
		k.exports[volumeID] = kvEntry[commands.Export]{rev: before}
	}
	k.mu.Unlock()
	return nil
}

// kvLease is the value of a lease key.
type kvLease struct {
	Holder string `json:"holder"`
}

// leaseKey is the key of a lease: names may hold characters keys may not.
func leaseKey(name string) string {
	return kvLeasePrefix + base64.RawURLEncoding.EncodeToString([]byte(name))
}

// AcquireLease creates the lease key with a per-key TTL, so the server
// expires it by its own clock; the token is the key's revision. The same
// holder taking a live lease again renews it.
func (k *KV) AcquireLease(ctx context.Context, name, holder string, ttl time.Duration) (Lease, error) {
	if err := checkLease(name, holder, ttl); err != nil {
		return Lease{}, err
	}
	data, err := json.Marshal(kvLease{Holder: holder})
	if err != nil {
		return Lease{}, fmt.Errorf("state: encode lease %s: %w", name, err)
	}
	key := leaseKey(name)
	l := Lease{Name: name, Holder: holder, TTL: ttl}
	start := time.Now()
	rev, err := k.kv.Create(ctx, key, data, jetstream.KeyTTL(ttl))
	// Another holder's create: ErrKeyExists, or on a replicated bucket the
	// wrong last sequence (10164) the library does not map to it.
	if wrongRevision(err) {
		e, gerr := k.kv.Get(ctx, key)
		if gerr != nil && !errors.Is(gerr, jetstream.ErrKeyNotFound) {
			return Lease{}, kvErr("get lease", gerr)
		}
		var cur kvLease
		if gerr != nil || json.Unmarshal(e.Value(), &cur) != nil || cur.Holder != holder {
			return Lease{}, fmt.Errorf("state: lease %s: %w", name, ErrLeaseHeld)
		}
		l.Token = e.Revision()
		l, err = k.RenewLease(ctx, l)
		if errors.Is(err, ErrLeaseLost) {
			return Lease{}, fmt.Errorf("state: lease %s: %w", name, ErrLeaseHeld)
		}
		return l, err
	}
	if err != nil {
		return Lease{}, kvErr("acquire lease", err)
	}
	k.writes.Add(1)
	l.Token, l.Expires = rev, start.Add(ttl)
	return l, nil
}

// RenewLease rewrites the lease key at revision l.Token with a new TTL.
// KeyValue.Update cannot set a TTL, so this publishes on the key's subject
// with the same expected-revision header Update sends.
func (k *KV) RenewLease(ctx context.Context, l Lease) (Lease, error) {
	if err := checkLease(l.Name, l.Holder, l.TTL); err != nil {
		return Lease{}, err
	}
	data, err := json.Marshal(kvLease{Holder: l.Holder})
	if err != nil {
		return Lease{}, fmt.Errorf("state: encode lease %s: %w", l.Name, err)
	}
	start := time.Now()
	msg := &nats.Msg{Subject: k.subject(leaseKey(l.Name)), Data: data}
	ack, err := k.js.PublishMsg(ctx, msg, jetstream.WithExpectLastSequencePerSubject(l.Token), jetstream.WithMsgTTL(l.TTL))
	if wrongRevision(err) {
		return Lease{}, fmt.Errorf("state: lease %s: %w", l.Name, ErrLeaseLost)
	}
	if err != nil {
		return Lease{}, kvErr("renew lease", err)
	}
	k.writes.Add(1)
	l.Token, l.Expires = ack.Sequence, start.Add(l.TTL)
	return l, nil
}

// ReleaseLease purges the lease key if it is still at revision l.Token.
func (k *KV) ReleaseLease(ctx context.Context, l Lease) error {
	err := k.kv.Purge(ctx, leaseKey(l.Name), jetstream.LastRevision(l.Token), jetstream.PurgeTTL(kvMarkerTTL))
	if wrongRevision(err) {
		return fmt.Errorf("state: lease %s: %w", l.Name, ErrLeaseLost)
	}
	if err != nil {
		return kvErr("release lease", err)
	}
	k.writes.Add(1)
	return nil
}

// Ping reads the bucket's status from the server.
func (k *KV) Ping(ctx context.Context) error {
	if _, err := k.kv.Status(ctx); err != nil {
		return kvErr("ping", err)
	}
	return nil
}

// kvCloseCatchUp bounds Close's wait for the stream's answer and the
// watcher before it writes the index cache; what the cache misses is read
// from the bucket at the next start.
const kvCloseCatchUp = 2 * time.Second

// Close waits for the watcher to apply the bucket's last writes (once it
// has loaded the bucket), stops it and removes its consumer, then writes
// the index cache unless the bucket's stream did not answer (a cluster
// member stopped last, without a quorum, could not seal it: the last cache
// written stays);
// the NATS connection stays open. Closing twice is safe.
func (k *KV) Close(ctx context.Context) error {
	var err error
	k.closeOnce.Do(func() {
		close(k.stop)
		k.saver.Wait()
		save := false
		select {
		case <-k.watcher.loaded:
			save = k.cache != ""
		default: // closed while loading: no cache
		}
		if save {
			// So that the cache holds this process's own last writes.
			cctx, cancel := context.WithTimeout(ctx, kvCloseCatchUp)
			if info, ierr := k.stream.Info(cctx); ierr != nil {
				k.log.Warn("index cache not written", "err", kvErr("stream info", ierr))
				save = false
			} else if target, berr := k.barrierAt(cctx, info.State.LastSeq); berr == nil {
				_ = k.reach(cctx, target)
			}
			cancel()
		}
		if cerr := k.watcher.r.Close(ctx); cerr != nil {
			err = fmt.Errorf("state: kv close: %w", cerr)
		}
		if save {
			if cerr := k.saveCache(ctx); cerr != nil {
				k.log.Warn("index cache not written", "err", cerr)
			}
		}
		k.noteArchived()
		// Not the index's base file: a read still in flight at shutdown
		// (an HTTP request past the server's shutdown, a NATS command)
		// reads it, and a failed read of it panics.
		k.archive.close()
	})
	return err
}
