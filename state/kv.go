package state

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/volumed/volumed/commands"
)

// DefaultKVBucket is the JetStream KeyValue bucket of the embedded store.
const DefaultKVBucket = "volumed_state"

// Key prefixes in the bucket.
const (
	kvOpPrefix      = "op."
	kvMappingPrefix = "map."
	kvExportPrefix  = "export."
)

// maxUpdateBackoff caps the random pause between UpdateOperation's
// retries on a revision race; the retries end with ctx.
const maxUpdateBackoff = 20 * time.Millisecond

// KVConfig configures a KV store.
type KVConfig struct {
	// Bucket name; default DefaultKVBucket.
	Bucket string
	// Replicas of the bucket's stream; default 1.
	Replicas int
	// Logger is the parent logger; default slog.Default().
	Logger *slog.Logger
}

// KV is the Store on a JetStream KeyValue bucket: operations under
// op.<id>, mappings under map.<volume_id>, exports under
// export.<volume_id>, each logical write one KV
// operation. The secondary indexes and Stats live in memory, built at start
// by a watcher over the bucket and kept live by it, so every process
// sharing the bucket converges; each write also updates them before it
// returns. The memory holds every record's JSON; the bucket is the truth.
type KV struct {
	kv     jetstream.KeyValue
	log    *slog.Logger
	writes atomic.Int64

	// mapMu serializes this process's mapping writes, so the device
	// check and the write happen as one step.
	mapMu sync.Mutex

	mu       sync.RWMutex
	ops      map[string]kvOp
	idx      map[string][]opRef // sorted oldest first; see opIndexes
	stats    Stats              // without Writes
	mappings map[string]kvMapping
	byDevice map[string]string
	byVM     map[string]map[string]struct{}
	exports  map[string]kvRecord // by volume id

	watcher   jetstream.KeyWatcher
	cancel    context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

var _ Store = (*KV)(nil)

// kvOp is the in-memory entry of an operation; op is nil once deleted.
type kvOp struct {
	rev uint64
	op  *commands.Operation
	raw []byte
}

// kvMapping is the in-memory entry of a mapping; m is nil once deleted.
type kvMapping struct {
	rev uint64
	m   *commands.Mapping
	raw []byte
}

// kvRecord is the in-memory entry of an unindexed record; raw is nil once
// deleted.
type kvRecord struct {
	rev uint64
	raw []byte
}

// NewKV creates or updates the bucket (file storage, one value per key),
// reads every record into the indexes and keeps watching the bucket until
// Close.
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
	kv, err := js.CreateOrUpdateKeyValue(ctx, jetstream.KeyValueConfig{
		Bucket: cfg.Bucket, Description: "volumed operations, device mappings and exports",
		History: 1, Storage: jetstream.FileStorage, Replicas: cfg.Replicas,
	})
	if err != nil {
		return nil, kvErr("create bucket "+cfg.Bucket, err)
	}
	k := &KV{kv: kv, log: cfg.Logger.With("component", "state-kv", "bucket", cfg.Bucket),
		ops: make(map[string]kvOp), idx: make(map[string][]opRef), stats: newStats(),
		mappings: make(map[string]kvMapping), byDevice: make(map[string]string),
		byVM: make(map[string]map[string]struct{}), exports: make(map[string]kvRecord), done: make(chan struct{})}
	watchCtx, cancel := context.WithCancel(context.Background())
	k.cancel = cancel
	if k.watcher, err = kv.WatchAll(watchCtx); err != nil {
		cancel()
		return nil, kvErr("watch bucket", err)
	}
	loaded := make(chan struct{})
	go k.watch(loaded)
	select {
	case <-loaded:
	case <-k.done:
		cancel()
		return nil, fmt.Errorf("state: kv load %s: %w: watcher stopped", cfg.Bucket, ErrUnavailable)
	case <-ctx.Done():
		_ = k.Close(context.Background())
		return nil, fmt.Errorf("state: kv load %s: %w: %w", cfg.Bucket, ErrUnavailable, ctx.Err())
	}
	k.log.Info("state store ready", "operations", len(k.ops), "mappings", len(k.mappings))
	return k, nil
}

// watch applies the watcher's entries until it stops, closing loaded at
// the end of the initial values.
func (k *KV) watch(loaded chan struct{}) {
	defer close(k.done)
	for e := range k.watcher.Updates() {
		if e == nil {
			close(loaded) // the watcher sends nil once, after the initial values
			continue
		}
		k.applyEntry(e)
	}
	k.log.Debug("watcher stopped")
}

// applyEntry applies one bucket entry to the indexes.
func (k *KV) applyEntry(e jetstream.KeyValueEntry) {
	raw := e.Value()
	if e.Operation() != jetstream.KeyValuePut {
		raw = nil
	}
	var err error
	switch key := e.Key(); {
	case strings.HasPrefix(key, kvOpPrefix):
		err = k.applyOp(strings.TrimPrefix(key, kvOpPrefix), e.Revision(), raw)
	case strings.HasPrefix(key, kvMappingPrefix):
		err = k.applyMapping(strings.TrimPrefix(key, kvMappingPrefix), e.Revision(), raw)
	case strings.HasPrefix(key, kvExportPrefix):
		err = k.applyExport(strings.TrimPrefix(key, kvExportPrefix), e.Revision(), raw)
	}
	if err != nil {
		k.log.Warn("skipping bad record", "key", e.Key(), "revision", e.Revision(), "error", err)
	}
}

// applyOp puts revision rev of an operation (nil raw: deleted) in the
// indexes unless they already hold that revision or a later one.
func (k *KV) applyOp(id string, rev uint64, raw []byte) error {
	var op *commands.Operation
	if raw != nil {
		op = new(commands.Operation)
		if err := decode(raw, op); err != nil {
			return err
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	cur, ok := k.ops[id]
	if ok && cur.rev >= rev {
		return nil
	}
	if cur.op != nil {
		k.indexOp(cur.op, -1)
	}
	k.ops[id] = kvOp{rev: rev, op: op, raw: raw}
	if op != nil {
		k.indexOp(op, 1)
	}
	return nil
}

// indexOp adds (sign 1) or removes (sign -1) an operation from the
// indexes and counters. k.mu is held.
func (k *KV) indexOp(op *commands.Operation, sign int64) {
	ref := opRef{score: opScore(op.CreatedAt), id: op.ID}
	for _, name := range opIndexes(op) {
		refs := k.idx[name]
		i, found := slices.BinarySearchFunc(refs, ref, compareRefs)
		switch {
		case sign > 0 && !found:
			k.idx[name] = slices.Insert(refs, i, ref)
		case sign < 0 && found && len(refs) == 1:
			delete(k.idx, name)
		case sign < 0 && found:
			k.idx[name] = slices.Delete(refs, i, i+1)
		}
	}
	k.stats.Total += sign
	k.stats.ByType[op.Type] += sign
	k.stats.ByStatus[op.Status] += sign
	if op.Status.Terminal() {
		k.stats.Terminal += sign
		k.stats.TerminalDuration += time.Duration(sign) * op.Duration()
	}
}

// applyMapping puts revision rev of a mapping (nil raw: deleted) in the
// indexes unless they already hold that revision or a later one.
func (k *KV) applyMapping(volumeID string, rev uint64, raw []byte) error {
	var m *commands.Mapping
	if raw != nil {
		m = new(commands.Mapping)
		if err := decode(raw, m); err != nil {
			return err
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if cur, ok := k.mappings[volumeID]; ok && cur.rev >= rev {
		return nil
	}
	k.setMapping(volumeID, kvMapping{rev: rev, m: m, raw: raw})
	return nil
}

// applyExport puts revision rev of an export (nil raw: deleted) in memory
// unless it already holds that revision or a later one.
func (k *KV) applyExport(volumeID string, rev uint64, raw []byte) error {
	if raw != nil {
		if err := decode(raw, new(commands.Export)); err != nil {
			return err
		}
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if cur, ok := k.exports[volumeID]; ok && cur.rev >= rev {
		return nil
	}
	k.exports[volumeID] = kvRecord{rev: rev, raw: raw}
	return nil
}

// setMapping replaces the entry of a volume, moving its device and VM
// index entries. k.mu is held.
func (k *KV) setMapping(volumeID string, e kvMapping) {
	if old := k.mappings[volumeID].m; old != nil {
		if key := deviceKey(old.VMID, old.DevicePath); k.byDevice[key] == volumeID {
			delete(k.byDevice, key)
		}
		delete(k.byVM[old.VMID], volumeID)
		if len(k.byVM[old.VMID]) == 0 {
			delete(k.byVM, old.VMID)
		}
	}
	k.mappings[volumeID] = e
	if e.m == nil {
		return
	}
	if e.m.DevicePath != "" {
		k.byDevice[deviceKey(e.m.VMID, e.m.DevicePath)] = volumeID
	}
	if e.m.VMID != "" {
		if k.byVM[e.m.VMID] == nil {
			k.byVM[e.m.VMID] = make(map[string]struct{})
		}
		k.byVM[e.m.VMID][volumeID] = struct{}{}
	}
}

// kvErr classifies a NATS error: a JetStream API reply, an invalid key or
// a cancelled caller pass through; anything else (closed or lost
// connection, timeouts, no responders) wraps ErrUnavailable.
func kvErr(op string, err error) error {
	var apiErr *jetstream.APIError
	if errors.As(err, &apiErr) || errors.Is(err, jetstream.ErrInvalidKey) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("state: kv %s: %w", op, err)
	}
	return fmt.Errorf("state: kv %s: %w: %w", op, ErrUnavailable, err)
}

// CreateOperation writes op with one KV Create; ErrExists if the key is
// taken.
func (k *KV) CreateOperation(ctx context.Context, op commands.Operation) error {
	if err := checkOp(&op); err != nil {
		return err
	}
	data, err := json.Marshal(op)
	if err != nil {
		return fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	rev, err := k.kv.Create(ctx, kvOpPrefix+op.ID, data)
	if errors.Is(err, jetstream.ErrKeyExists) {
		return fmt.Errorf("state: operation %s: %w", op.ID, ErrExists)
	}
	if err != nil {
		return kvErr("create operation", err)
	}
	k.writes.Add(1)
	return k.applyOp(op.ID, rev, data)
}

// UpdateOperation replaces op with one KV Update on its last revision,
// retrying when another writer got in between; ErrNotFound if the key was
// never created.
func (k *KV) UpdateOperation(ctx context.Context, op commands.Operation) error {
	if err := checkOp(&op); err != nil {
		return err
	}
	data, err := json.Marshal(op)
	if err != nil {
		return fmt.Errorf("state: encode operation %s: %w", op.ID, err)
	}
	key := kvOpPrefix + op.ID
	k.mu.RLock()
	cur := k.ops[op.ID]
	k.mu.RUnlock()
	rev, known := cur.rev, cur.op != nil
	for attempt := 1; ; attempt++ {
		if !known {
			e, err := k.kv.Get(ctx, key)
			if errors.Is(err, jetstream.ErrKeyNotFound) {
				return fmt.Errorf("state: operation %s: %w", op.ID, ErrNotFound)
			}
			if err != nil {
				return kvErr("update operation", err)
			}
			rev = e.Revision()
		}
		newRev, err := k.kv.Update(ctx, key, data, rev)
		if err == nil {
			k.writes.Add(1)
			return k.applyOp(op.ID, newRev, data)
		}
		if !errors.Is(err, jetstream.ErrKeyRevisionMismatch) {
			return kvErr(fmt.Sprintf("update operation (attempt %d)", attempt), err)
		}
		// Back off a random while, so that writers racing on one key
		// do not starve each other.
		select {
		case <-time.After(rand.N(min(time.Duration(attempt)*time.Millisecond, maxUpdateBackoff))):
		case <-ctx.Done():
			return kvErr("update operation", ctx.Err())
		}
		known = false
	}
}

// GetOperation reads one operation from the bucket.
func (k *KV) GetOperation(ctx context.Context, id string) (commands.Operation, error) {
	var op commands.Operation
	return op, k.get(ctx, "operation", kvOpPrefix+id, &op)
}

// get reads and decodes one key.
func (k *KV) get(ctx context.Context, what, key string, v any) error {
	e, err := k.kv.Get(ctx, key)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return fmt.Errorf("state: %s %s: %w", what, key, ErrNotFound)
	}
	if err != nil {
		return kvErr("get "+what, err)
	}
	if err := json.Unmarshal(e.Value(), v); err != nil {
		return fmt.Errorf("state: decode %s %s: %w", what, key, err)
	}
	return nil
}

// ListOperations walks the smallest index of f newest first, keeping the
// operations that match f's other fields, up to the limit.
func (k *KV) ListOperations(_ context.Context, f Filter) ([]commands.Operation, error) {
	k.mu.RLock()
	var walk []opRef
	for i, name := range filterIndexes(f) {
		if refs := k.idx[name]; i == 0 || len(refs) < len(walk) {
			walk = refs
		}
	}
	var rows [][]byte
	for i := len(walk) - 1; i >= 0 && (f.Limit <= 0 || len(rows) < f.Limit); i-- {
		if e := k.ops[walk[i].id]; matches(e.op, f) {
			rows = append(rows, e.raw)
		}
	}
	k.mu.RUnlock()
	out := make([]commands.Operation, len(rows))
	for i, raw := range rows {
		if err := decode(raw, &out[i]); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// matches reports whether op has every field f sets.
func matches(op *commands.Operation, f Filter) bool {
	return (f.Type == "" || op.Type == f.Type) && (f.Status == "" || op.Status == f.Status) &&
		(f.VolumeID == "" || op.VolumeID == f.VolumeID) && (f.VMID == "" || vmOf(op) == f.VMID)
}

// Stats returns the in-memory counters.
func (k *KV) Stats(context.Context) (Stats, error) {
	k.mu.RLock()
	defer k.mu.RUnlock()
	s := k.stats
	s.ByType, s.ByStatus = maps.Clone(k.stats.ByType), maps.Clone(k.stats.ByStatus)
	s.Writes = k.writes.Load()
	return s, nil
}

// PutMapping writes m with one KV Put; ErrConflict if the index gives its
// device path to another volume.
func (k *KV) PutMapping(ctx context.Context, m commands.Mapping) error {
	if m.VolumeID == "" {
		return errors.New("state: mapping without volume id")
	}
	data, err := json.Marshal(m)
	if err != nil {
		return fmt.Errorf("state: encode mapping %s: %w", m.VolumeID, err)
	}
	k.mapMu.Lock()
	defer k.mapMu.Unlock()
	k.mu.RLock()
	holder, held := k.byDevice[deviceKey(m.VMID, m.DevicePath)]
	k.mu.RUnlock()
	if m.DevicePath != "" && held && holder != m.VolumeID {
		return fmt.Errorf("state: device %s of volume %s held by %s: %w", m.DevicePath, m.VolumeID, holder, ErrConflict)
	}
	rev, err := k.kv.Put(ctx, kvMappingPrefix+m.VolumeID, data)
	if err != nil {
		return kvErr("put mapping", err)
	}
	k.writes.Add(1)
	return k.applyMapping(m.VolumeID, rev, data)
}

// GetMapping reads the mapping of a volume from the bucket.
func (k *KV) GetMapping(ctx context.Context, volumeID string) (commands.Mapping, error) {
	var m commands.Mapping
	return m, k.get(ctx, "mapping", kvMappingPrefix+volumeID, &m)
}

// GetMappingByDevice returns the indexed mapping holding a device path on
// a VM.
func (k *KV) GetMappingByDevice(_ context.Context, vmID, devicePath string) (commands.Mapping, error) {
	var m commands.Mapping
	k.mu.RLock()
	raw := k.mappings[k.byDevice[deviceKey(vmID, devicePath)]].raw
	k.mu.RUnlock()
	if devicePath == "" || raw == nil {
		return m, fmt.Errorf("state: mapping of device %s: %w", devicePath, ErrNotFound)
	}
	return m, decode(raw, &m)
}

// deviceKey is the device-path index key of a path on a VM.
func deviceKey(vmID, devicePath string) string { return vmID + " " + devicePath }

// ListMappings returns the indexed mappings of one VM, or all of them.
func (k *KV) ListMappings(_ context.Context, vmID string) ([]commands.Mapping, error) {
	k.mu.RLock()
	var rows [][]byte
	if vmID == "" {
		for _, e := range k.mappings {
			if e.m != nil {
				rows = append(rows, e.raw)
			}
		}
	}
	for vol := range k.byVM[vmID] {
		rows = append(rows, k.mappings[vol].raw)
	}
	k.mu.RUnlock()
	out := make([]commands.Mapping, len(rows))
	for i, raw := range rows {
		if err := decode(raw, &out[i]); err != nil {
			return nil, err
		}
	}
	sortMappings(out)
	return out, nil
}

// DeleteMapping writes a delete marker for the volume's mapping.
func (k *KV) DeleteMapping(ctx context.Context, volumeID string) error {
	k.mapMu.Lock()
	defer k.mapMu.Unlock()
	k.mu.RLock()
	before := k.mappings[volumeID].rev
	k.mu.RUnlock()
	if err := k.kv.Delete(ctx, kvMappingPrefix+volumeID); err != nil {
		return kvErr("delete mapping", err)
	}
	k.writes.Add(1)
	// Delete returns no revision: drop the entry unless the watcher has
	// already moved past the revision the delete replaced.
	k.mu.Lock()
	if k.mappings[volumeID].rev == before {
		k.setMapping(volumeID, kvMapping{rev: before})
	}
	k.mu.Unlock()
	return nil
}

// PutExport writes e with one KV Put.
func (k *KV) PutExport(ctx context.Context, e commands.Export) error {
	if err := checkExport(e); err != nil {
		return err
	}
	data, err := json.Marshal(e)
	if err != nil {
		return fmt.Errorf("state: encode export %s: %w", e.VolumeID, err)
	}
	rev, err := k.kv.Put(ctx, kvExportPrefix+e.VolumeID, data)
	if err != nil {
		return kvErr("put export", err)
	}
	k.writes.Add(1)
	return k.applyExport(e.VolumeID, rev, data)
}

// GetExport reads the export record of a volume from the bucket.
func (k *KV) GetExport(ctx context.Context, volumeID string) (commands.Export, error) {
	var e commands.Export
	return e, k.get(ctx, "export", kvExportPrefix+volumeID, &e)
}

// ListExports returns the export records held in memory.
func (k *KV) ListExports(context.Context) ([]commands.Export, error) {
	k.mu.RLock()
	var rows [][]byte
	for _, e := range k.exports {
		if e.raw != nil {
			rows = append(rows, e.raw)
		}
	}
	k.mu.RUnlock()
	out := make([]commands.Export, len(rows))
	for i, raw := range rows {
		if err := decode(raw, &out[i]); err != nil {
			return nil, err
		}
	}
	sortExports(out)
	return out, nil
}

// DeleteExport writes a delete marker for the volume's export record.
func (k *KV) DeleteExport(ctx context.Context, volumeID string) error {
	k.mu.RLock()
	before := k.exports[volumeID].rev
	k.mu.RUnlock()
	if err := k.kv.Delete(ctx, kvExportPrefix+volumeID); err != nil {
		return kvErr("delete export", err)
	}
	k.writes.Add(1)
	// As DeleteMapping: drop the entry unless the watcher has moved on.
	k.mu.Lock()
	if k.exports[volumeID].rev == before {
		k.exports[volumeID] = kvRecord{rev: before}
	}
	k.mu.Unlock()
	return nil
}

// Ping reads the bucket's status from the server.
func (k *KV) Ping(ctx context.Context) error {
	if _, err := k.kv.Status(ctx); err != nil {
		return kvErr("ping", err)
	}
	return nil
}

// Close stops the watcher and waits for it; the NATS connection stays
// open. Closing twice is safe.
func (k *KV) Close(ctx context.Context) error {
	var err error
	k.closeOnce.Do(func() {
		_ = k.watcher.Stop()
		k.cancel()
		select {
		case <-k.done:
		case <-ctx.Done():
			err = fmt.Errorf("state: kv close: %w", ctx.Err())
		}
	})
	return err
}
