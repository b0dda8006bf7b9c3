// Package memstore is an in-memory state.Store for fast tests: the
// conformance suite's rules (compare-and-swap on revisions, status moves,
// indexes, device conflicts, fenced leases, retention) without a backend.
// Records are kept as JSON, so what a read returns is what Redis or the
// KV store would return. Nothing survives the process.
package memstore

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"
	"time"

	"github.com/volumed/volumed/commands"
	"github.com/volumed/volumed/state"
)

// Store is an in-memory state.Store, safe for concurrent use.
type Store struct {
	mu       sync.Mutex
	rev      uint64 // the last revision given; never reused
	ops      map[string]record
	mappings map[string]record
	exports  map[string]record
	devices  map[device]string // (vm, device path) → volume
	leases   map[string]state.Lease
	stats    state.Stats
}

var _ state.Store = (*Store)(nil)

// record is a stored record: its JSON and its revision.
type record struct {
	raw []byte
	rev uint64
}

// device names a device path on a VM.
type device struct{ vm, path string }

// New returns an empty store.
func New() *Store {
	s := &Store{ops: map[string]record{}, mappings: map[string]record{}, exports: map[string]record{},
		devices: map[device]string{}, leases: map[string]state.Lease{}}
	s.stats.ByType, s.stats.ByStatus = map[commands.OpType]int64{}, map[commands.OpStatus]int64{}
	for _, t := range commands.OpTypes {
		s.stats.ByType[t] = 0
	}
	for _, st := range commands.OpStatuses {
		s.stats.ByStatus[st] = 0
	}
	return s
}

// encode is v's stored form.
func encode(what, key string, v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("memstore: encode %s %s: %w", what, key, err)
	}
	return b, nil
}

// decode reads a stored record and sets its revision.
func decode[T any](r record, set func(*T, uint64)) T {
	var v T
	if err := json.Unmarshal(r.raw, &v); err != nil {
		panic(fmt.Sprintf("memstore: decode %T: %v", v, err)) // we encoded it
	}
	set(&v, r.rev)
	return v
}

func setOpRev(op *commands.Operation, rev uint64) { op.Revision = rev }
func setMapRev(m *commands.Mapping, rev uint64)   { m.Revision = rev }
func setExpRev(e *commands.Export, rev uint64)    { e.Revision = rev }

func notFound(what, key string) error {
	return fmt.Errorf("memstore: %s %s: %w", what, key, state.ErrNotFound)
}

func gone(what, key string) error {
	return fmt.Errorf("memstore: %s %s is gone: %w (%w)", what, key, state.ErrStale, state.ErrNotFound)
}

func stale(what, key string, rev uint64) error {
	return fmt.Errorf("memstore: %s %s changed since revision %d: %w", what, key, rev, state.ErrStale)
}

// at returns the record of key if it is at rev: gone or stale otherwise.
func at(m map[string]record, what, key string, rev uint64) (record, error) {
	r, ok := m[key]
	switch {
	case !ok:
		return r, gone(what, key)
	case r.rev != rev:
		return r, stale(what, key, rev)
	}
	return r, nil
}

// write stores raw at a new revision and counts the write; s.mu is held.
func (s *Store) write(m map[string]record, key string, raw []byte) uint64 {
	s.rev++
	s.stats.Writes++
	m[key] = record{raw: raw, rev: s.rev}
	return s.rev
}

// count adds sign times op to the counts; s.mu is held.
func (s *Store) count(op commands.Operation, sign int64) {
	s.stats.Total += sign
	s.stats.ByType[op.Type] += sign
	s.stats.ByStatus[op.Status] += sign
	if op.Status.Terminal() {
		s.stats.Terminal += sign
		s.stats.TerminalDuration += time.Duration(sign) * op.Duration()
	}
}

// CreateOperation records a new operation; state.ErrExists if its id is taken.
func (s *Store) CreateOperation(_ context.Context, op commands.Operation) (commands.Operation, error) {
	if err := state.CheckOperation(op); err != nil {
		return op, err
	}
	raw, err := encode("operation", op.ID, op)
	if err != nil {
		return op, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.ops[op.ID]; ok {
		return op, fmt.Errorf("memstore: operation %s: %w", op.ID, state.ErrExists)
	}
	op.Revision = s.write(s.ops, op.ID, raw)
	s.count(op, 1)
	return op, nil
}

// UpdateOperation replaces the operation recorded at op.Revision.
func (s *Store) UpdateOperation(_ context.Context, op commands.Operation) (commands.Operation, error) {
	if err := state.CheckOperation(op); err != nil {
		return op, err
	}
	raw, err := encode("operation", op.ID, op)
	if err != nil {
		return op, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	r, err := at(s.ops, "operation", op.ID, op.Revision)
	if err != nil {
		return op, err
	}
	old := decode(r, setOpRev)
	if err := state.CheckMove(old, op); err != nil {
		return op, err
	}
	s.count(old, -1)
	s.count(op, 1)
	op.Revision = s.write(s.ops, op.ID, raw)
	return op, nil
}

// DeleteOperation removes the operation recorded at rev.
func (s *Store) DeleteOperation(_ context.Context, id string, rev uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.ops[id]
	if !ok {
		return nil
	}
	if r.rev != rev {
		return stale("operation", id, rev)
	}
	s.deleteOp(id, r)
	return nil
}

// deleteOp removes a stored operation and its counts; s.mu is held.
func (s *Store) deleteOp(id string, r record) {
	s.count(decode(r, setOpRev), -1)
	delete(s.ops, id)
	s.stats.Writes++
}

// PruneOperations deletes up to limit terminal operations completed
// before completedBefore, oldest completion first; it holds what
// state.RetainedEnd holds, and counts their end from it. It reads every
// operation again after a round that deleted some: the completed
// rollback of a failover deleted is due then.
func (s *Store) PruneOperations(ctx context.Context, completedBefore time.Time, limit int) (int, error) {
	n := 0
	for limit <= 0 || n < limit {
		rest := 0
		if limit > 0 {
			rest = limit - n
		}
		m, err := s.pruneRound(ctx, completedBefore, rest)
		n += m
		if err != nil || m == 0 {
			return n, err
		}
	}
	return n, nil
}

// pruneRound is one round of PruneOperations.
func (s *Store) pruneRound(ctx context.Context, completedBefore time.Time, limit int) (int, error) {
	type done struct {
		at time.Time
		op commands.Operation
	}
	var old []done
	cut := completedBefore.UnixMicro()
	v := view{byID: map[string]commands.Operation{}}
	s.mu.Lock()
	for _, r := range s.ops {
		op := decode(r, setOpRev)
		if op.Status.Terminal() {
			old = append(old, done{state.CompletedAt(op), op})
		}
		if state.MayHold(op.Type) {
			v.byID[op.ID] = op
		}
	}
	s.mu.Unlock()
	var due []done
	for _, d := range old {
		if state.MayHold(d.op.Type) {
			end, held, err := state.RetainedEnd(ctx, v, d.op)
			if err != nil {
				return 0, err
			}
			if held {
				continue
			}
			d.at = end
		}
		if d.at.UnixMicro() < cut {
			due = append(due, d)
		}
	}
	slices.SortFunc(due, func(a, b done) int { return a.at.Compare(b.at) })
	if limit > 0 && len(due) > limit {
		due = due[:limit]
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, d := range due {
		if r, ok := s.ops[d.op.ID]; ok && r.rev == d.op.Revision {
			s.deleteOp(d.op.ID, r)
			n++
		}
	}
	return n, nil
}

// view reads the failovers and rollbacks of one moment, for
// state.RetainedEnd: it lists rollbacks only.
type view struct{ byID map[string]commands.Operation }

var _ state.OperationReader = view{}

func (v view) GetOperation(_ context.Context, id string) (commands.Operation, error) {
	op, ok := v.byID[id]
	if !ok {
		return op, notFound("operation", id)
	}
	return op, nil
}

func (v view) ListOperations(_ context.Context, f state.Filter) ([]commands.Operation, string, error) {
	if f.Type != commands.OpRollback || f.Limit != 0 || f.Cursor != "" {
		return nil, "", fmt.Errorf("memstore: view lists every rollback only, not %+v", f)
	}
	var out []commands.Operation
	for _, op := range v.byID {
		if state.Matches(op, f) {
			out = append(out, op)
		}
	}
	slices.SortFunc(out, state.CompareNewestFirst)
	return out, "", nil
}

func (v view) Stats(context.Context) (state.Stats, error) {
	return state.Stats{}, errors.New("memstore: a view counts nothing")
}

// GetOperation returns one operation or state.ErrNotFound.
func (s *Store) GetOperation(_ context.Context, id string) (commands.Operation, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.ops[id]
	if !ok {
		return commands.Operation{}, notFound("operation", id)
	}
	return decode(r, setOpRev), nil
}

// ListOperations returns the operations f selects, newest first, and the
// cursor of the next page.
func (s *Store) ListOperations(_ context.Context, f state.Filter) ([]commands.Operation, string, error) {
	after, err := state.AfterCursor(f.Cursor)
	if err != nil {
		return nil, "", err
	}
	s.mu.Lock()
	var out []commands.Operation
	for _, r := range s.ops {
		if op := decode(r, setOpRev); state.Matches(op, f) && after(op) {
			out = append(out, op)
		}
	}
	s.mu.Unlock()
	slices.SortFunc(out, state.CompareNewestFirst)
	if f.Limit > 0 && len(out) > f.Limit {
		out = out[:f.Limit]
		return out, state.FormatCursor(out[len(out)-1]), nil
	}
	return out, "", nil
}

// Stats counts operations by type and status, and this store's writes.
func (s *Store) Stats(context.Context) (state.Stats, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.stats
	st.ByType, st.ByStatus = map[commands.OpType]int64{}, map[commands.OpStatus]int64{}
	for k, v := range s.stats.ByType {
		st.ByType[k] = v
	}
	for k, v := range s.stats.ByStatus {
		st.ByStatus[k] = v
	}
	return st, nil
}

// PutMapping writes the mapping of m.VolumeID by compare-and-swap, keeping
// the device index; state.ErrConflict if another volume holds the device.
func (s *Store) PutMapping(_ context.Context, m commands.Mapping) (commands.Mapping, error) {
	if err := state.CheckMapping(m); err != nil {
		return m, err
	}
	raw, err := encode("mapping", m.VolumeID, m)
	if err != nil {
		return m, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	var old commands.Mapping
	if m.Revision == 0 {
		if _, ok := s.mappings[m.VolumeID]; ok {
			return m, fmt.Errorf("memstore: mapping %s exists: %w", m.VolumeID, state.ErrStale)
		}
	} else {
		r, err := at(s.mappings, "mapping", m.VolumeID, m.Revision)
		if err != nil {
			return m, err
		}
		old = decode(r, setMapRev)
	}
	dev := device{m.VMID, m.DevicePath}
	if holder, ok := s.devices[dev]; m.DevicePath != "" && ok && holder != m.VolumeID {
		return m, fmt.Errorf("memstore: device %s on %s held by volume %s: %w", m.DevicePath, m.VMID, holder, state.ErrConflict)
	}
	if old.DevicePath != "" {
		delete(s.devices, device{old.VMID, old.DevicePath})
	}
	if m.DevicePath != "" {
		s.devices[dev] = m.VolumeID
	}
	m.Revision = s.write(s.mappings, m.VolumeID, raw)
	return m, nil
}

// GetMapping returns the mapping of a volume or state.ErrNotFound.
func (s *Store) GetMapping(_ context.Context, volumeID string) (commands.Mapping, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.mappings[volumeID]
	if !ok {
		return commands.Mapping{}, notFound("mapping", volumeID)
	}
	return decode(r, setMapRev), nil
}

// GetMappingByDevice returns the mapping holding a device path on a VM.
func (s *Store) GetMappingByDevice(_ context.Context, vmID, devicePath string) (commands.Mapping, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	vol, ok := s.devices[device{vmID, devicePath}]
	if devicePath == "" || !ok {
		return commands.Mapping{}, notFound("mapping of device", vmID+" "+devicePath)
	}
	return decode(s.mappings[vol], setMapRev), nil
}

// ListMappings returns the mappings of one VM, or all when vmID is "".
func (s *Store) ListMappings(_ context.Context, vmID string) ([]commands.Mapping, error) {
	s.mu.Lock()
	out := []commands.Mapping{}
	for _, r := range s.mappings {
		if m := decode(r, setMapRev); vmID == "" || m.VMID == vmID {
			out = append(out, m)
		}
	}
	s.mu.Unlock()
	state.SortMappings(out)
	return out, nil
}

// DeleteMapping removes a volume's mapping: any revision when rev is 0.
func (s *Store) DeleteMapping(_ context.Context, volumeID string, rev uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.mappings[volumeID]
	if !ok {
		return nil
	}
	if rev != 0 && r.rev != rev {
		return stale("mapping", volumeID, rev)
	}
	if m := decode(r, setMapRev); m.DevicePath != "" {
		delete(s.devices, device{m.VMID, m.DevicePath})
	}
	delete(s.mappings, volumeID)
	s.stats.Writes++
	return nil
}

// PutExport writes the export record of e.VolumeID by compare-and-swap.
func (s *Store) PutExport(_ context.Context, e commands.Export) (commands.Export, error) {
	if err := state.CheckExport(e); err != nil {
		return e, err
	}
	raw, err := encode("export", e.VolumeID, e)
	if err != nil {
		return e, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if e.Revision == 0 {
		if _, ok := s.exports[e.VolumeID]; ok {
			return e, fmt.Errorf("memstore: export %s exists: %w", e.VolumeID, state.ErrStale)
		}
	} else if _, err := at(s.exports, "export", e.VolumeID, e.Revision); err != nil {
		return e, err
	}
	e.Revision = s.write(s.exports, e.VolumeID, raw)
	return e, nil
}

// GetExport returns the export record of a volume or state.ErrNotFound.
func (s *Store) GetExport(_ context.Context, volumeID string) (commands.Export, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.exports[volumeID]
	if !ok {
		return commands.Export{}, notFound("export", volumeID)
	}
	return decode(r, setExpRev), nil
}

// ListExports returns every export record, sorted by volume id.
func (s *Store) ListExports(context.Context) ([]commands.Export, error) {
	s.mu.Lock()
	out := []commands.Export{}
	for _, r := range s.exports {
		out = append(out, decode(r, setExpRev))
	}
	s.mu.Unlock()
	state.SortExports(out)
	return out, nil
}

// DeleteExport removes a volume's export record: any revision when rev is 0.
func (s *Store) DeleteExport(_ context.Context, volumeID string, rev uint64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	r, ok := s.exports[volumeID]
	if !ok {
		return nil
	}
	if rev != 0 && r.rev != rev {
		return stale("export", volumeID, rev)
	}
	delete(s.exports, volumeID)
	s.stats.Writes++
	return nil
}

// AcquireLease takes the lease name for holder for ttl; state.ErrLeaseHeld
// if another holder has it and it has not expired.
func (s *Store) AcquireLease(_ context.Context, name, holder string, ttl time.Duration) (state.Lease, error) {
	if err := state.CheckLease(name, holder, ttl); err != nil {
		return state.Lease{}, err
	}
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if cur, ok := s.leases[name]; ok && cur.Holder != holder && now.Before(cur.Expires) {
		return state.Lease{}, fmt.Errorf("memstore: lease %s held by %s: %w", name, cur.Holder, state.ErrLeaseHeld)
	}
	return s.grant(name, holder, ttl, now), nil
}

// grant records a new token for the lease; s.mu is held.
func (s *Store) grant(name, holder string, ttl time.Duration, now time.Time) state.Lease {
	s.rev++
	s.stats.Writes++
	l := state.Lease{Name: name, Holder: holder, Token: s.rev, Expires: now.Add(ttl), TTL: ttl}
	s.leases[name] = l
	return l
}

// current returns l's record if l is still its last token and unexpired;
// s.mu is held.
func (s *Store) current(l state.Lease, now time.Time) error {
	cur, ok := s.leases[l.Name]
	if !ok || cur.Token != l.Token || !now.Before(cur.Expires) {
		return fmt.Errorf("memstore: lease %s (token %d): %w", l.Name, l.Token, state.ErrLeaseLost)
	}
	return nil
}

// RenewLease extends l by l.TTL from now with a new token.
func (s *Store) RenewLease(_ context.Context, l state.Lease) (state.Lease, error) {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.current(l, now); err != nil {
		return l, err
	}
	return s.grant(l.Name, l.Holder, l.TTL, now), nil
}

// ReleaseLease ends l.
func (s *Store) ReleaseLease(_ context.Context, l state.Lease) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.current(l, time.Now()); err != nil {
		return err
	}
	delete(s.leases, l.Name)
	s.stats.Writes++
	return nil
}

// Ping always succeeds.
func (s *Store) Ping(context.Context) error { return nil }

// Close does nothing; the store stays usable. Closing twice is safe.
func (s *Store) Close(context.Context) error { return nil }
